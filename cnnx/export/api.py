"""export_checkpoint: the one entry point of the exporter (the CLI, tests and benchmarks call it).

A checkpoint becomes a complete export (every file and parity.json) in a hidden staging folder
beside the output folder; the parity gate runs on those files; only when every bound holds is
the staging folder swapped in for the output folder (cnnx.export.publish). The output folder
is at every moment the complete previous export or the complete new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cnnx.export import images
from cnnx.export.errors import ExportError, ParityError
from cnnx.export.onnx import check_opset
from cnnx.export.parity import RANDOM_BATCH_SIZES, run_parity
from cnnx.export.publish import discard, make_staging, publish, resolve_out_dir
from cnnx.export.writers import EXPORT_FILES, FILENAMES, WRITERS, Job, activation_peak, run_writer, torch_runner
from cnnx.runtime.files import os_error_line

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_PARITY_IMAGES = 1000
CALIBRATION_IMAGES = 512  # int8 calibration: enough for stable min/max, seconds on a CPU


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    paths: dict  # artifact name (a key of FILENAMES) -> Path of the published file
    parity: object  # cnnx.export.parity.ParityReport
    checkpoint: Path
    seconds: dict = field(default_factory=dict)  # artifact -> seconds to export it


def resolve_formats(formats, *, fp16=False, int8=False) -> tuple:
    if isinstance(formats, str):
        formats = (formats,)
    out = []
    for f in formats:
        for name in (FORMATS if f == "all" else (f,)):
            if name not in FORMATS:
                raise ExportError(f"unknown format {name!r}; valid: {', '.join(FORMATS + ('all',))}")
            if name not in out:
                out.append(name)
    if (fp16 or int8) and "onnx" not in out:
        out.insert(0, "onnx")  # the variants are converted from the fp32 ONNX file
    if not out:
        raise ExportError(f"no format given; valid: {', '.join(FORMATS + ('all',))}")
    return tuple(out)


def _artifacts(formats, fp16: bool, int8: bool) -> list:
    """Names from the WRITERS table, in its order."""
    wanted = set(formats) | ({"onnx-fp16"} if fp16 else set()) | ({"onnx-int8"} if int8 else set())
    return [name for name in WRITERS if name in wanted]


def _load(checkpoint_path: Path, tta: int | None):
    """(checkpoint dict, uint8-input module, the file's sha256); ExportError for a bad checkpoint
    or a view count the arch cannot run. tta: test-time views the exported model runs per image
    (None: the checkpoint's own)."""
    from cnnx.train.checkpoint import CheckpointError, load_checkpoint_and_sha256, model_from_checkpoint
    from cnnx.train.zoo import Uint8Input, set_tta_views

    try:
        ckpt, sha256 = load_checkpoint_and_sha256(checkpoint_path)
        model = model_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if tta is not None:
        try:
            set_tta_views(model, tta)
        except ValueError as e:
            raise ExportError(f"--tta {tta}: {e}") from None
    spec = ckpt["preprocess"]
    return ckpt, Uint8Input(model, spec["mean"], spec["std"]).eval(), sha256


def _parity_images(ckpt, sha256, verify_data, int8: bool, limit: int, say, notes: list, cache_dir=None):
    """The real images of the gate: --verify-data, else the run's validation split when the
    checkpoint is this user's own (cnnx.export.images.validation_images, its decoded images
    cached in cache_dir), else None (random inputs only, said in notes), which int8 cannot do without."""
    if verify_data is not None:
        real = images.load_verify_data(verify_data, ckpt["preprocess"], ckpt["class_names"], limit)
    else:
        real, why = images.validation_images(ckpt, sha256, limit, cache_dir)
        if real is None and int8:
            raise ExportError(f"--int8 needs real calibration images and {why}: pass --verify-data DIR")
        if real is None:
            notes.append(f"no real images for the parity gate: {why}; random uint8 inputs only "
                         f"(pass --verify-data DIR to check on real images)")
            say(notes[-1])
            return None
    say(f"parity images: {real.source}")
    for n in real.notes:
        say(n)
    return real


def _gate(job, backends, real, batch_sizes, progress: bool, notes: list, checkpoint_path: Path):
    """Run the parity gate and write parity.json into the staging folder; ParityError when a
    bound is broken (the staging folder is then discarded with it)."""
    job.say(f"running the parity gate ({job.tta_views} test-time view(s) per image) ...")
    report = run_parity(torch_runner(job.module), backends, real=real, size=job.ckpt["preprocess"]["size"],
                        batch_sizes=batch_sizes, progress=progress, notes=notes,
                        activation_peak=lambda x: activation_peak(job.module, x))
    doc = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": job.sha256,
        "arch": job.ckpt["arch"],
        "files": {k: FILENAMES[k] for k in job.paths},
        "export_seconds": job.seconds,
        "opset": job.opset,
        "tta_views": job.tta_views,
        **report.to_json(),
    }
    try:
        job.path("parity").write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as e:
        raise ExportError(f"cannot write parity.json: {os_error_line(e)}") from None
    job.paths["parity"] = job.path("parity")
    if not report.passed:
        first = report.failures[0].failure
        more = len(report.failures) - 1
        raise ParityError(f"parity gate failed: {first}" + (f" (and {more} more)" if more else ""), report)
    if "onnx" in job.paths:
        # written last: `cnnx classify` without --model takes the newest *.onnx under runs/,
        # which must be the fp32 model, not a variant beside it (renames keep mtimes)
        os.utime(job.path("onnx"))
    return report


def export_checkpoint(checkpoint_path, out_dir=None, formats=("onnx",), *, opset=None, verify_data=None,
                      fp16=False, int8=False, progress=False, parity_images: int = DEFAULT_PARITY_IMAGES,
                      random_batch_sizes=None, log: Callable[[str], None] | None = None,
                      tta: int | None = None, cache_dir=None) -> ExportResult:
    """Export a cnnx checkpoint and gate it on parity with eager PyTorch.

    formats: names from FORMATS or "all"; fp16/int8 add ONNX variants. verify_data: a folder
    of images (DIR/<class>/*) for the gate and int8 calibration. Without it the gate uses the
    run's validation split only when the checkpoint is this user's own (its sha256 is in the
    file cnnx.train.checkpoint.own_checkpoints_file() that this user's cnnx writes), and says
    so; a checkpoint from anyone else is gated on random inputs only (int8 then needs
    verify_data): the paths stored in it are never read, and never decide where anything is
    written. parity_images caps the real images (fewer for the big torchvision models in
    tests; the bounds never change). tta: test-time views per image the exported models run
    (cnnx.train.zoo.TTA_VIEWS; None keeps the checkpoint's), written to their metadata and
    parity.json: the cost of views is a choice made here, never hidden. cache_dir: where the
    run's validation split is decoded and cached (default: as for `cnnx train`, never the folder
    stored in the checkpoint; pass the run's --cache-dir to reuse its cache). out_dir (default
    export/ beside the checkpoint) must be new, empty or a previous export. Raises ExportError (ParityError when a bound is broken);
    on failure the output folder is as it was.
    """
    say = log or (lambda msg: None)
    if not (isinstance(parity_images, int) and parity_images >= 1):
        raise ValueError(f"parity_images must be a whole number >= 1, got {parity_images!r}")
    if random_batch_sizes is not None and not (
            random_batch_sizes and all(isinstance(b, int) and b >= 1 for b in random_batch_sizes)):
        raise ValueError(f"random_batch_sizes must be whole numbers >= 1, got {random_batch_sizes!r}")
    artifacts = _artifacts(resolve_formats(formats, fp16=fp16, int8=int8), fp16, int8)
    opset = check_opset(opset)
    checkpoint_path = Path(checkpoint_path)
    ckpt, module, sha256 = _load(checkpoint_path, tta)
    shown = Path(out_dir) if out_dir is not None else checkpoint_path.parent / "export"  # as the user wrote it
    target = resolve_out_dir(shown, EXPORT_FILES)
    staging, created = make_staging(target)
    try:
        notes = []
        real = _parity_images(ckpt, sha256, verify_data, int8, parity_images, say, notes, cache_dir)
        calibration = None if real is None else real.images[
            images.spread(len(real.images), CALIBRATION_IMAGES, real.labels.tolist())]  # every class, where known
        example = images.random_images(2, ckpt["preprocess"]["size"], seed=1)
        job = Job(ckpt, sha256, module, example, staging, opset, calibration, say)
        backends = []
        for name in artifacts:
            backends += run_writer(name, job)
        if int8:
            notes.append(f"int8 calibrated on {len(calibration)} of the parity images")
        report = _gate(job, backends, real, tuple(random_batch_sizes or RANDOM_BATCH_SIZES), progress, notes,
                       checkpoint_path)
        publish(staging, target, EXPORT_FILES)
    except BaseException:
        discard(staging, created)
        raise
    paths = {name: shown / p.name for name, p in job.paths.items()}
    return ExportResult(out_dir=shown, paths=paths, parity=report, checkpoint=checkpoint_path, seconds=job.seconds)

