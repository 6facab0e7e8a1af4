"""The main thread's samples of a py-spy raw profile (gpu_classify.py's profile stage) by the part
of `cnnx classify` they were in, as shares:

    python benchmarks/profile_parts.py benchmarks/results/gpu_profile_airnet_60d0bb0.txt

A sample goes to the first part whose marker is in its stack (the order below matters: a run's
wait inside run_in_order is "waiting on a GPU run", not the copy)."""

from __future__ import annotations

import sys
from pathlib import Path

PARTS = [  # (part, markers in the stack)
    ("discovery", ("Discovery", "_files_only")),
    ("waiting on a GPU run", ("oldest",)),
    ("softmax / top-k", ("softmax",)),
    ("CSV rows and write", ("PredictionWriter",)),
    ("sending decode tasks", ("_Run.start",)),
    ("assembling batches", ("_Run.assemble", "_Run.lent")),
    ("waiting on decode processes", ("_Run.wait",)),
    ("copy into pinned memory + submit", ("run_in_order",)),
    ("other per-batch", ("_write_rows", "Classification")),
]


def raw_profile(path: Path):
    """py-spy's raw format, a line a stack with its sample count last ("thread (ID)[: NAME];frame;
    ...;frame N") -> ([(thread, [frames], count)], samples by thread, the main thread: the one
    py-spy named MainThread, else the one with the most samples, as it lives longest). A thread
    is its "thread (ID)", whatever name py-spy gave it (it names a thread once it knows)."""
    rows, threads, named_main = [], {}, None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(")")[0] + ")"
        if frames[0].endswith(": MainThread"):
            named_main = thread
        threads[thread] = threads.get(thread, 0) + int(count)
        rows.append((thread, frames, int(count)))
    return rows, threads, named_main or max(threads, key=threads.get)


def parts(path: Path) -> dict:
    rows, _threads, main = raw_profile(path)
    out = {}
    for thread, frames, count in rows:
        if thread == main:
            stack = ";".join(frames)
            part = next((name for name, marks in PARTS if any(m in stack for m in marks)), "start-up and the rest")
            out[part] = out.get(part, 0) + count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    for name in (argv if argv is not None else sys.argv[1:]):
        got = parts(Path(name))
        total = sum(got.values())
        print(f"{name}: {total} main-thread samples")
        for part, n in got.items():
            print(f"  {part}: {n} ({n / total:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
