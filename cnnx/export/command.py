"""`cnnx export` and `cnnx info`. Thin: the work is in cnnx.export.api and cnnx.export.modelinfo;
heavy imports happen inside the functions (`cnnx --help` must not import torch)."""

from __future__ import annotations

from pathlib import Path

import click

from cnnx.export.api import DEFAULT_PARITY_IMAGES, FORMATS
from cnnx.runtime.files import ends_as_terminated, printable


def newest_checkpoint(root: Path = Path("runs")) -> Path:
    found = [p for p in root.glob("*/best.pt") if p.is_file()]
    if not found:
        raise click.UsageError(f"no CHECKPOINT given and no {root}/*/best.pt here: run `cnnx train` or name a checkpoint")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


FUTURE_SLACK_S = 60  # a file time this far ahead of the clock is no clock's jitter


def newest_checkpoint_notes(checkpoint: Path, now: float) -> list:
    """What the user should know of the checkpoint newest_checkpoint picked for them: a run
    still training (its lock held: the best.pt so far, another may come), a file time in the
    future (unpacked from elsewhere, a skewed clock: it stays "newest" until that time, whatever
    is trained meanwhile)."""
    import time

    from cnnx.runtime.files import held_by_a_writer
    from cnnx.train.run import LOCK_NAME

    notes = []
    if held_by_a_writer(checkpoint.parent / LOCK_NAME):
        notes.append(f"{checkpoint.parent} is still training: this is its best checkpoint so far")
    mtime = checkpoint.stat().st_mtime
    if mtime > now + FUTURE_SLACK_S:
        notes.append(f"{checkpoint} is dated in the future ({time.strftime('%Y-%m-%d %H:%M', time.localtime(mtime))}): "
                     "it is the newest by date until then; name the checkpoint to export another")
    return notes


def _a_folder(ctx, param, value):
    """click's file_okay=False refuses a regular file only: a device or FIFO (/dev/null) passed."""
    if value is not None and not value.is_dir():
        raise click.BadParameter(f"{value} is not a folder", ctx=ctx, param=param)
    return value


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--format", "formats", multiple=True, default=("onnx",), show_default=True,
              type=click.Choice(FORMATS + ("all",)), help="What to write; repeat the option for several.")
@click.option("--out", "out_dir", type=click.Path(),
              help="Output folder, replaced whole by the new export; it must be new, empty or a previous "
                   "export [default: export/ beside the checkpoint].")
@click.option("--opset", type=int, help="ONNX opset [default: the exporter's].")
@click.option("--verify-data", type=click.Path(exists=True, file_okay=False, path_type=Path), callback=_a_folder,
              help="Image folder (DIR/<class>/*, flat, or DIR/{train,val,test}/<class>/*: its val/) for the parity "
                   "gate and int8 calibration [default: the run's validation split, for checkpoints your own cnnx "
                   "wrote, while its files are those the run held out].")
@click.option("--fp16", is_flag=True, help="Also write a float16 ONNX variant (input stays uint8).")
@click.option("--int8", is_flag=True, help="Also write a statically quantised int8 ONNX variant for the CPU.")
@click.option("--parity-images", type=click.IntRange(min=1), default=DEFAULT_PARITY_IMAGES, show_default=True,
              help="At most this many real images in the parity gate.")
@click.option("--tta", type=click.Choice(["1", "2", "6"]),
              help="Test-time views per image in the exported model: 1 none, 2 + mirror, 6 mirror x 1-px "
                   "shifts (archs with views, e.g. airnet) [default: the checkpoint's]. Each view costs a forward pass.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache of the run's decoded validation images (default as for cnnx train; pass the run's "
                   "--cache-dir to reuse its cache).")
@ends_as_terminated
def export(checkpoint, formats, out_dir, opset, verify_data, fp16, int8, parity_images, tta, cache_dir):
    """Export CHECKPOINT (default: the newest runs/*/best.pt) behind a parity gate.

    Every export is compared with eager PyTorch on real and random images; a broken bound
    fails the export and leaves the output folder as it was. Written files go to stdout.
    """
    from cnnx.export.errors import ExportError, ParityError
    from cnnx.export.onnx import check_opset

    if out_dir == "":  # Path("") is the current folder: not what an empty --out meant
        raise click.BadParameter("needs a folder name", param_hint="--out")
    out_dir = None if out_dir is None else Path(out_dir)
    try:
        check_opset(opset)
    except ExportError as e:
        raise click.BadParameter(str(e), param_hint="--opset") from None
    if checkpoint is None:
        import time

        checkpoint = newest_checkpoint()
        click.echo(f"checkpoint: {checkpoint} (newest runs/*/best.pt)", err=True)
        for note in newest_checkpoint_notes(checkpoint, time.time()):
            click.echo(printable(f"note: {note}"), err=True)

    import contextlib
    import tempfile

    from cnnx.export.api import export_checkpoint
    from cnnx.runtime.files import os_error_line, remove_stale_temps, temp_files_kept_apart

    if not int8:  # (temp_files_kept_apart sweeps them itself)
        remove_stale_temps(tempfile.gettempdir())  # what an --int8 export killed there left, whatever this one writes
    try:
        with temp_files_kept_apart() if int8 else contextlib.nullcontext():  # onnxruntime's quantization temps
            result = export_checkpoint(checkpoint, out_dir, formats, opset=opset, verify_data=verify_data, fp16=fp16,
                                       int8=int8, progress=True, parity_images=parity_images,
                                       log=lambda msg: click.echo(printable(msg), err=True),
                                       tta=None if tta is None else int(tta), cache_dir=cache_dir)
    except ParityError as e:
        click.echo(e.report.table(), err=True)
        raise click.ClickException(str(e)) from None
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # the temporary folder: export_checkpoint says its own in an ExportError
        raise click.ClickException(os_error_line(e)) from None
    click.echo(result.parity.table(), err=True)
    click.echo(f"parity gate passed; wrote {len(result.paths)} files to {result.out_dir}", err=True)
    for path in result.paths.values():
        click.echo(str(path))


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the information as one JSON object.")
def info(model, as_json):
    """Show MODEL's inputs, outputs, metadata, and the onnxruntime providers it runs on here."""
    import json

    from cnnx.export.modelinfo import ModelInfoError, describe, format_info

    try:
        d = describe(model)
    except ModelInfoError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))
