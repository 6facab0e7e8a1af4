"""Ctrl-C on `cnnx classify`, many times over: how each run ends.

    python benchmarks/sigint_runs.py --runs 100

Each run is tests/test_classify_hardening.py's test_sigint_exits_130_and_the_run_resumes as a
process: 100 CIFAR-10 JPEGs (10 a class, --cifar), the tests' tiny model, --batch-size 1,
--workers 1; SIGINT once the output holds 3 lines. A run ends cleanly when it exits 130 with
"interrupted" as its last line; any other ending (the grace timer's line after a hung cleanup,
another exit status, no exit within 60 s) is listed. Writes benchmarks/results/sigint_runs.json.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _results import RESULTS, write_result  # noqa: E402
from bench_classify import linked_subset  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402


def one_run(folder: Path, model: Path, work: Path, i: int) -> dict | None:
    """None for a clean ending, else what happened."""
    out = work / f"p{i}.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model),
                             "-o", str(out), "--batch-size", "1", "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        _stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"run": i, "ending": "no exit within 60 s"}
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if proc.returncode == 130 and last == "interrupted":
        return None
    return {"run": i, "returncode": proc.returncode, "last_line": last, "seconds_after_sigint": round(time.monotonic() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG folder (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    a = ap.parse_args(argv)
    from tests._runtime_util import tiny_onnx_model

    folder = linked_subset(cifar_folder(a.cifar), 10)
    with tempfile.TemporaryDirectory(prefix="cnnx-sigint-") as tmp:
        work = Path(tmp)
        model = tiny_onnx_model(work / "model.onnx")
        others = [r for i in range(a.runs) if (r := one_run(folder, model, work, i)) is not None]
    write_result(RESULTS / "sigint_runs.json", {"runs": a.runs, "clean": a.runs - len(others), "others": others},
                 None if argv is None else [__file__, *argv])
    print(f"{a.runs - len(others)} of {a.runs} runs ended cleanly; others: {others}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
