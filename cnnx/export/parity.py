"""The parity gate: every exported backend against eager PyTorch, on real images and on
random uint8 batches of several sizes. Backends are plain callables uint8 (N,3,H,W) numpy ->
float32 logits numpy, so this module needs neither torch nor onnxruntime itself."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

RANDOM_BATCH_SIZES = (1, 7, 256)
RANDOM_SEED = 0
# Real images the fp16/int8 bounds need before they rest on them alone: below this, the largest
# random batch is gated too (one image that agrees proves nothing; int8 is calibrated on them).
MIN_QUANTISED_GATE_IMAGES = 100
FP16_MAX = 65504.0  # float16's largest finite number


@dataclass(frozen=True)
class Bound:
    max_abs: float | None  # max |logit difference|; None: reported, not gated
    min_top1: float  # fraction of inputs whose top-1 class must agree with eager


# fp32 must reproduce the checkpoint (max_abs relative to the logits' scale: the bound is
# max_abs x max(1, |largest eager logit|), float32's rounding grows with it); fp16/int8 are
# approximations judged by their decisions. Every variant must give finite logits.
BOUNDS = {
    "fp32": Bound(max_abs=1e-4, min_top1=1.0),
    "fp16": Bound(max_abs=None, min_top1=0.995),
    "int8": Bound(max_abs=None, min_top1=0.99),
}


@dataclass(frozen=True)
class Backend:
    name: str  # e.g. "onnxruntime-cpu"
    variant: str  # a key of BOUNDS
    run: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ParityRow:
    backend: str
    variant: str
    inputs: str  # "real" or "random b=<batch size>"
    n: int
    max_abs: float
    mean_abs: float
    top1_agreement: float
    accuracy: float | None  # on labelled real images
    accuracy_change: float | None  # accuracy - eager accuracy, in points of top-1 (0..100)
    gated: bool  # whether the variant's bound applies to this row
    failure: str | None  # why the bound is broken, or None


@dataclass(frozen=True)
class ParityReport:
    rows: tuple
    inputs: dict
    eager_accuracy: float | None
    notes: tuple = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(r.failure is None for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.failure]

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "bounds": {k: asdict(v) for k, v in BOUNDS.items()},
            "inputs": self.inputs,
            "eager_accuracy": self.eager_accuracy,
            "notes": list(self.notes),
            "results": [asdict(r) for r in self.rows],
        }

    def table(self) -> str:
        head = ("backend", "variant", "inputs", "n", "max abs", "mean abs", "top-1 agree", "acc change", "status")
        lines = [head]
        for r in self.rows:
            acc = "" if r.accuracy_change is None else f"{r.accuracy_change:+.2f} pt"
            status = "FAIL" if r.failure else ("ok" if r.gated else "report")
            lines.append((r.backend, r.variant, r.inputs, str(r.n), f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}",
                          f"{100 * r.top1_agreement:.2f}%", acc, status))
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
        if self.eager_accuracy is not None:  # what the checkpoint itself scores: a wrong mean/std or class order shows here
            text += f"\neager (the checkpoint) top-1 on the {self.inputs['real']['count']} labelled real images: " \
                    f"{self.eager_accuracy:.2f}%"
        return text


def _batched(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
    outs = [np.asarray(fn(images[i:i + batch_size]), dtype=np.float32) for i in range(0, len(images), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _accuracy(logits, labels):
    return float((logits.argmax(1) == labels).mean() * 100.0)


def compare(reference: np.ndarray, got: np.ndarray, *, backend: Backend, inputs: str, gated: bool,
            labels=None, eager_accuracy=None, activation_peak: float | None = None) -> ParityRow:
    """activation_peak: the eager model's largest |activation| on these inputs (writers.
    activation_peak), for fp16: beyond FP16_MAX the fp16 model overflows where it computes in
    float16, whatever this backend's logits show."""
    bound = BOUNDS[backend.variant]
    if got.shape != reference.shape:
        return ParityRow(backend.name, backend.variant, inputs, len(reference), float("inf"), float("inf"), 0.0,
                         None, None, gated, f"{backend.name} returned shape {got.shape}, eager {reference.shape}")
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    finite = np.isfinite(got).all(axis=1) if got.ndim == 2 else np.isfinite(got)
    if not finite.all():
        max_abs = mean_abs = float("inf")
    agree = float((got.argmax(1) == reference.argmax(1)).mean()) if len(got) else 1.0
    acc = change = None
    if labels is not None:
        acc = _accuracy(got, labels)
        change = acc - eager_accuracy
    failure = None
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    if gated:
        what = f"{backend.name} ({backend.variant}) on {inputs} inputs"
        if not finite.all():
            failure = f"{what}: non-finite logits (inf or NaN) for {int((~finite).sum())} of {len(got)} images"
        elif backend.variant == "fp16" and activation_peak is not None and activation_peak > FP16_MAX:
            failure = (f"{what}: the model's activations reach {activation_peak:.3g}, beyond float16's "
                       f"{FP16_MAX:,.0f}: the fp16 model overflows (inf/NaN) where it computes in float16")
        elif bound.max_abs is not None and not max_abs <= bound.max_abs * scale:
            failure = (f"{what}: max abs logit difference {max_abs:.3g} > {bound.max_abs:g}"
                       + (f" x {scale:.3g} (the largest eager logit)" if scale > 1 else ""))
        elif agree < bound.min_top1:
            failure = (f"{what}: top-1 agreement {100 * agree:.2f}% < {100 * bound.min_top1:g}% "
                       f"({int(round((1 - agree) * len(got)))} of {len(got)} differ)")
    return ParityRow(backend.name, backend.variant, inputs, len(got), max_abs, mean_abs, agree, acc, change, gated,
                     failure)


def run_parity(eager, backends, *, real=None, size, batch_sizes=RANDOM_BATCH_SIZES, batch_size: int = 256,
               progress: bool = False, notes=(), activation_peak=None) -> ParityReport:
    """Compare every backend with `eager` (a callable like theirs).

    real: cnnx.export.images.ParityImages or None. fp32 bounds apply to every input set; the
    fp16/int8 agreement bounds apply to the real images (random noise is far from what a
    quantised model is calibrated for), to the largest random batch when there are none, and
    to both when there are fewer than MIN_QUANTISED_GATE_IMAGES real ones.
    activation_peak: a callable uint8 images -> the eager model's largest |activation| on them
    (writers.activation_peak), asked for the gated inputs when an fp16 backend is checked.
    """
    sets = []  # (name, images, labels or None)
    if real is not None:
        sets.append(("real", real.images, real.labels if real.labelled else None))
    for i, b in enumerate(batch_sizes):
        from cnnx.export.images import random_images

        sets.append((f"random b={b}", random_images(b, size, RANDOM_SEED + i), None))
    largest = f"random b={max(batch_sizes)}"
    gate_sets = {"real"} if real is not None else {largest}
    if real is not None and len(real.images) < MIN_QUANTISED_GATE_IMAGES:
        gate_sets.add(largest)
    fp16 = activation_peak is not None and any(be.variant == "fp16" for be in backends)

    steps = len(sets) * (1 + len(backends))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="parity", unit="run", file=sys.stderr, leave=False)
    rows, eager_accuracy = [], None
    try:
        for name, images, labels in sets:
            # random batches go through whole, to exercise that exact batch size
            bs = batch_size if name == "real" else len(images)
            ref = _batched(eager, images, bs)
            if bar:
                bar.update()
            acc0 = _accuracy(ref, labels) if labels is not None else None
            if name == "real":
                eager_accuracy = acc0
            peak = activation_peak(images) if fp16 and name in gate_sets else None
            for be in backends:
                got = _batched(be.run, images, bs)
                gated = be.variant == "fp32" or name in gate_sets
                rows.append(compare(ref, got, backend=be, inputs=name, gated=gated, labels=labels,
                                    eager_accuracy=acc0, activation_peak=peak))
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()
    order = {be.name: i for i, be in enumerate(backends)}
    rows.sort(key=lambda r: order[r.backend])  # grouped by backend; inputs keep their order
    inputs = {
        "real": None if real is None else {"source": real.source, "count": int(len(real.images)),
                                           "labelled": real.labelled, "notes": list(real.notes)},
        "random": {"batch_sizes": list(batch_sizes), "seed": RANDOM_SEED, "dtype": "uint8"},
        "quantised_gate": sorted(gate_sets),
    }
    return ParityReport(tuple(rows), inputs, eager_accuracy, tuple(notes))
