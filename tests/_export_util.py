"""Helpers for the exporter's tests: real checkpoints made here (not by `cnnx train`), from a
seed-cnn trained for a few SGD steps on real CIFAR-10 JPEGs so top-1 parity means something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnx.runtime.preprocess import load_image, make_spec
from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
from cnnx.train.zoo import Uint8Input, create_model, get_arch


def decode_folder(root: Path, spec: dict, class_names):
    """(uint8 images (N,3,H,W), labels) of root/<class>/* through the one preprocess implementation."""
    images, labels = [], []
    for ci, c in enumerate(class_names):
        for f in sorted((root / c).iterdir()):
            images.append(load_image(f, spec)[0])
            labels.append(ci)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def make_checkpoint(path: Path, arch: str, class_names, *, size=None, train_dir: Path | None = None,
                    steps: int = 60, config=None, seed: int = 0) -> Path:
    """Write a cnnx checkpoint of `arch`; when train_dir is given, train it for `steps` SGD
    steps (batch 64) on those images first."""
    a = get_arch(arch)
    spec = make_spec(size or a.image_size, a.mean, a.std)
    torch.manual_seed(seed)
    model = create_model(arch, len(class_names))
    metrics = {}
    if train_dir is not None:
        x, y = decode_folder(train_dir, spec, class_names)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        net = Uint8Input(model, spec["mean"], spec["std"]).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            metrics["train_top1"] = float((net.eval()(x).argmax(1) == y).float().mean())
    model.eval()
    ckpt = build_checkpoint(model=model, arch=arch, arch_kwargs={}, class_names=class_names, preprocess=spec,
                            epoch=1, metrics=metrics, config=dict(config or {}))
    save_checkpoint(ckpt, path)
    return Path(path)


def eager_logits(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the checkpoint in eager PyTorch, built independently of cnnx.export."""
    from cnnx.train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    net = Uint8Input(model_from_checkpoint(ckpt), ckpt["preprocess"]["mean"], ckpt["preprocess"]["std"]).eval()
    with torch.no_grad():
        return net(torch.from_numpy(images)).numpy()


def one_line_error(args, *needles):
    """Run `cnnx ARGS` in-process; assert it failed with exit 1 and exactly one `Error:` line
    (the last one), no traceback, nothing on stdout, holding every needle. Returns that line."""
    from click.testing import CliRunner

    from cnnx.cli import cli

    r = CliRunner().invoke(cli, args)
    lines = r.stderr.strip().splitlines()
    # progress talk may come first; the failure itself is the last line and the only "Error:" one
    errors = [line for line in lines if line.startswith("Error: ")]
    assert r.exit_code == 1 and errors == lines[-1:], (r.exit_code, r.output)
    assert "Traceback" not in r.output and r.stdout == ""
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def with_held_out_digest(config: dict, scratch: Path) -> dict:
    """`config` with the digests `cnnx train` records of the files its run held out (the export
    checks them before it scores a re-created split), listed with a scratch cache."""
    from cnnx.train.data import load_splits
    from cnnx.train.run import files_digest

    splits = load_splits({**config, "cache_dir": str(scratch)}, progress=False)
    return {**config, "val_files_sha256": files_digest(splits.val_paths),
            "val_relpaths_sha256": files_digest(splits.val_paths, splits.val_root)}
