"""Where `cnnx classify`'s CPU time goes, process by process, for two versions of cnnx in the
same interleaved rounds: the command itself, the decode processes, multiprocessing's forkserver
and resource tracker. On a 2-core machine every core-second the command spends on its own
(imports, discovery, writing rows) is taken from the decode processes, so this is the figure a
change to the command's own work moves.

    python benchmarks/classify_cpu_by_process.py --tree /tmp/base --tree . --rounds 6

A tree is a checkout of this repository (git worktree add /tmp/base <commit>); each runs
`python -m cnnx classify` on the CIFAR-10 JPEGs with the seeded seed-cnn of bench_classify.py.
CPU seconds are read from /proc/<pid>/stat every 5 ms until the command exits (the last
reading of each process, so a process's final few ms may be missed). Writes
benchmarks/results/classify_cpu_by_process.json.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import git_commit, tree_arguments, tree_env, write_result  # noqa: E402
from bench_classify import CACHE, build_model, log, process_tree  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_and_cmdline(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            _head, tail = f.read().rsplit(")", 1)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = tail.split()
    return (int(fields[11]) + int(fields[12])) / TICK, cmd


def _kind(cmd: str, depth: int) -> str:
    if depth == 0:
        return "command"
    if depth >= 2:  # a worker is a fork of the forkserver: the same command line, one level down
        return "decode_processes"
    return "resource_tracker" if "resource_tracker" in cmd else "forkserver"


def run_once(tree: Path, model: Path, cifar: Path) -> dict:
    out = CACHE / "cpu-by-process.csv"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "cnnx", "classify", str(cifar), "--model", str(model), "-o", str(out),
           "--topk", "1", "--device", "cpu"]
    env = tree_env(tree)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stderr=subprocess.PIPE)
    seen = {}  # pid -> (cpu s, kind)
    while proc.poll() is None:
        for pid, depth in process_tree(proc.pid):
            got = _cpu_and_cmdline(pid)
            if got:
                seen[pid] = (got[0], _kind(got[1], depth))
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"cnnx classify in {tree} failed ({proc.returncode}): {stderr}")
    cpu = {}
    for seconds, kind in seen.values():
        cpu[kind] = cpu.get(kind, 0.0) + seconds
    return {"wall_s": round(wall, 3), **{f"cpu_{k}_s": round(v, 3) for k, v in sorted(cpu.items())},
            "cpu_all_s": round(sum(cpu.values()), 3)}


def main(argv=None):
    args = tree_arguments(__doc__.split("\n")[0], 6, "classify_cpu_by_process.json").parse_args(argv)
    model, cifar = build_model(), cifar_folder(args.cifar)
    trees = [t.resolve() for t in args.tree]
    runs = {str(t): [] for t in trees}
    for r in range(args.rounds):
        for t in trees:
            runs[str(t)].append(run_once(t, model, cifar))
            log(f"round {r + 1}/{args.rounds} {t}: {runs[str(t)][-1]}")
    summary = {}
    for t in trees:
        rows = runs[str(t)]
        keys = sorted({k for row in rows for k in row})
        summary[str(t)] = {"git_commit": git_commit(t), "rounds": rows,
                           "median": {k: round(statistics.median(row.get(k, 0.0) for row in rows), 3) for k in keys}}
    write_result(args.out, {"files": sum(1 for _ in cifar.rglob("*.jpg")), "trees": summary},
                 None if argv is None else [__file__, *argv])


if __name__ == "__main__":
    main()
