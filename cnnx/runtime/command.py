"""`cnnx classify`: batch-classify image files and folders through onnxruntime.

Thin on purpose: options are checked here, the work happens in cnnx.runtime.{discover,
pipeline,model,output}. Imports stay inside the function so `cnnx --help` stays cheap;
nothing here (or anywhere under cnnx/runtime/) imports torch.
"""

from __future__ import annotations

import os
import sys
import time

import click


def _default_errors_path(output: str):
    if output == "-":
        return None
    root, _ext = os.path.splitext(output)
    return root + ".errors.csv"


class _Progress:
    """A one-line counter on stderr (the total is unknown while discovery streams): redrawn
    in place on a terminal, a plain line every 10 s otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.every = 0.25 if self.tty else 10.0
        self.start = self.last = time.perf_counter()

    def update(self, done: int, skipped: int, force: bool = False):
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"classified {done:,}  skipped {skipped:,}  {rate:,.0f} images/s"
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=str), metavar="PATH...")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=str),
              help="Exported .onnx model. Default: the newest one under runs/.")
@click.option("--output", "-o", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Predictions file, or - for stdout. An existing file is only continued with --resume.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True,
              help="Output rows as CSV (path,label,score,top-k) or one JSON object per line.")
@click.option("--topk", type=click.IntRange(1), default=5, show_default=True,
              help="Labels and scores per image (capped at the number of classes).")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Images per onnxruntime call; every call has this shape (the last is padded).")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Decode threads; 0 = one per CPU core.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime's CUDA provider loads, else CPU. cuda: CUDA or an error.")
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False),
              help="CSV of files not classified (path,stage,error). Default: OUTPUT's name + .errors.csv, "
                   "or warnings on stderr when OUTPUT is stdout.")
@click.option("--resume", is_flag=True, help="Continue OUTPUT: skip paths already in it (or in the errors file).")
@click.option("--strict", is_flag=True, help="Exit 1 when any file was skipped.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks inside folders (cycles are still refused).")
def classify(paths, model_path, output, fmt, topk, batch_size, workers, device, errors_path, resume, strict,
             follow_symlinks):
    """Batch-classify image files and folders (recursively) through onnxruntime.

    Rows come out in sorted path order, flushed as each batch finishes: CSV
    (path,label,score, then label_i,score_i up to --topk) or JSONL. Files that cannot be
    classified go to the errors file and the summary; exit 0 when the run finished
    (skips are warnings), 1 on a fatal error or, with --strict, on any skip.
    """
    t0 = time.perf_counter()
    from cnnx.runtime.model import ModelError, find_newest_model, open_model, softmax_topk
    from cnnx.runtime.output import ErrorsWriter, PredictionWriter, ResumeError, read_done
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import PipelineConfig, batched_paths, decoded_batches

    if errors_path is None:
        errors_path = _default_errors_path(output)
    if resume and output == "-":
        raise click.UsageError("--resume needs --output FILE (it reads back what that file already holds)")
    if errors_path is not None and output != "-" and os.path.abspath(errors_path) == os.path.abspath(output):
        raise click.UsageError("--errors and --output must be different files")
    for label, target in (("--output", output), ("--errors", errors_path)):
        if target not in (None, "-") and os.path.exists(target) and not resume:
            raise click.UsageError(f"{label} {target} already exists: pass --resume to continue it, or remove it")

    try:
        if model_path is None:
            model_path = str(find_newest_model("runs"))
            click.echo(f"model: {model_path} (newest under runs/)", err=True)
        session, info, provider = open_model(model_path, device)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    topk = min(topk, len(info.class_names))

    done = set()
    if resume:
        try:
            if os.path.exists(output):
                done, n = read_done(output, fmt, topk)
                click.echo(f"resume: {n:,} images already in {output}", err=True)
            if errors_path is not None and os.path.exists(errors_path):
                done |= read_done(errors_path, "errors", None)[0]
        except ResumeError as e:
            raise click.ClickException(f"cannot resume: {e}") from None
        except OSError as e:
            raise click.ClickException(f"cannot resume: {e.strerror or e}: {e.filename}") from None

    config = PipelineConfig(batch_size=batch_size, workers=workers)
    writer = PredictionWriter(output, fmt, info.class_names, topk, append=resume)
    errors = ErrorsWriter(errors_path, append=resume)
    skipped: dict = {}
    counts = {"found": 0, "resumed": 0, "noted": 0}

    def skip(path, stage, message):
        skipped[stage] = skipped.get(stage, 0) + 1
        errors.write(path, stage, message)

    def on_discovery_skip(item):
        counts["found"] += 1
        if item.path not in done:
            skip(item.path, "discover", item.reason)

    def todo(found):
        for item in found:
            if item.reason is None:
                counts["found"] += 1
                if item.path in done:
                    counts["resumed"] += 1
                    continue
            yield item

    discovery = Discovery(paths, follow_symlinks=follow_symlinks)
    progress = _Progress()
    classified, first_batch_s = 0, None
    try:
        batches = batched_paths(todo(discovery), batch_size, on_discovery_skip)
        for batch in decoded_batches(batches, info.spec, config):
            for path, stage, message in batch.failed:
                skip(path, stage, message)
            for path, note in batch.notes:
                counts["noted"] += 1
                errors.write(path, "note", note)
            if batch.paths:
                logits = session.run([info.output_name], {info.input_name: batch.images})[0]
                n = len(batch.paths)
                idx, scores = softmax_topk(logits[:n], topk)
                writer.write_batch(batch.paths, idx, scores)
                classified += n
                if first_batch_s is None:
                    first_batch_s = time.perf_counter() - t0
            progress.update(classified, sum(skipped.values()))
    except BrokenPipeError:
        # stdout closed early (`| head`): stop quietly, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        raise click.ClickException(f"cannot write: {e.strerror or e}: {e.filename or output}") from None
    finally:
        progress.close()
        writer.close()
        errors.close()

    if counts["found"] == 0:
        what = "files" if discovery.ignored == 0 else f"image files ({discovery.ignored} other files ignored)"
        raise click.ClickException(f"no {what} found under {', '.join(paths)}")
    wall = time.perf_counter() - t0
    n_skipped = sum(skipped.values())
    parts = [f"classified {classified:,} images"]
    if n_skipped:
        parts.append(f"skipped {n_skipped:,} (" + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")")
    else:
        parts.append("skipped 0")
    if counts["resumed"]:
        parts.append(f"{counts['resumed']:,} already done (--resume)")
    if counts["noted"]:
        parts.append(f"{counts['noted']} with notes")
    if discovery.ignored:
        parts.append(f"{discovery.ignored:,} non-image files ignored")
    parts.append(f"provider {provider}")
    parts.append(f"{wall:.2f} s")
    parts.append(f"{classified / wall:,.0f} images/s")
    if first_batch_s is not None:
        parts.append(f"first batch after {first_batch_s:.2f} s")
    click.echo("; ".join(parts), err=True)
    if n_skipped and errors_path is not None:
        click.echo(f"skipped files are listed in {errors_path}", err=True)
    if strict and n_skipped:
        raise click.ClickException(f"--strict: {n_skipped} file(s) skipped")
