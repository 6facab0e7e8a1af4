"""Benchmark `--engine ray` (cnnx.runtime.ray_engine) against the local pipeline on one machine.

The issue's goal: on the 50,000 CIFAR-10 training JPEGs, the Ray engine's images/s once Ray
is up is at least 0.8x local `cnnx classify`'s, with Ray's start-up seconds reported beside it.

  local   `python -m cnnx classify DIR --device cpu` (decode threads, one session); its rate
          is the summary line's (classified / the command's own wall time, imports excluded)
  ray     a driver process: imports Ray and Ray Data (classify_with_ray does so before it
          starts Ray), ray.init(num_cpus=cores) timed as the start-up, then
          classify_with_ray(DIR, num_workers=cores) in that session timed as the run (actors
          created, model loaded, every file decoded, classified and written); also its rate
          after the first rows came back (actors up), Ray's cost per image alone
  engine  the same Ray Data plan (blocks, actor pool, ordered rows back to the driver) with a
          trivial actor that neither decodes nor classifies: what Ray itself costs on this
          machine, in seconds after ray.init and in CPU-seconds of every process of the session

Each Ray run also records the CPU-seconds its processes spent after ray.init returned, by role
(actors, the driver, Ray Data's helper actors, idle workers, raylet/GCS/agents): where the
seconds go. Two ceilings follow from them:
  ray_cpu_bound_vs_local  local seconds / (the Ray run's CPU-seconds / cores): the ratio that
                          run would reach with every core busy from ray.init to the end
  ray_ceiling_vs_local    local seconds / (local seconds + engine CPU-seconds / cores): local
                          classify keeps the cores busy (`cores_busy`), so the CPU Ray's own
                          processes spend (engine only) adds about that much wall time, if
                          decoding and classifying cost the actors what they cost local classify

Once Ray is up: both engines also classify a 25,000-file half of the folder (hard links to
the first half of each class) in the same rounds. The extra seconds the second 25,000 files
cost are the per-image cost with every fixed cost (process and Ray start-up, the actor pool,
model loading, the first blocks' latency) taken out:
  marginal img/s          (50,000 - 25,000) / (best seconds on 50,000 - best on 25,000)
  fixed_s                 best seconds on 50,000 - 50,000 / marginal img/s (the start-up)
  ray_marginal_vs_local   Ray's marginal img/s over local's: Ray's rate once it is up, its
                          start-up (ray.init + fixed_s) reported beside it
  ray_vs_local            whole runs: Ray from ray.init returned to the end (start-up included)

Both write a CSV of --topk 1 with the same seeded, untrained seed-cnn model (built once, as
bench_classify does), and their labels are compared file by file. Rounds alternate local and
ray and the best of each is kept: the machine is shared. Run it alone on the machine:
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_ray.py
Writes benchmarks/results/bench_ray.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, write_result  # noqa: E402
from bench_classify import CACHE, build_model, linked_subset  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

# CPU-seconds of this process and its descendants (a private Ray's GCS and raylet are the
# driver's children, its workers the raylet's), by role; a process that ended between two
# snapshots is not counted (none does in these runs: the pool lives to the end).
CPU_BY_ROLE = """
import os, psutil
ROLES = (("actors", ("MapWorker",)), ("ray data helpers", ("_StatsActor", "AutoscalingCoordinator",
         "ActorLocationTracker")), ("idle workers", ("ray::IDLE",)))
def cpu_snapshot():
    me = psutil.Process()
    out = {{}}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        out[p.pid] = (cmd, t.user + t.system)
    return out
def cpu_by_role(before, after):
    roles = {{}}
    for pid, (cmd, cpu) in after.items():
        role = "driver" if pid == os.getpid() else next(
            (name for name, marks in ROLES if any(m in cmd for m in marks)), "ray system")
        roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (cmd, 0.0))[1]
    return {{k: round(v, 2) for k, v in sorted(roles.items())}}
"""

RAY_DRIVER = textwrap.dedent("""
    import json, logging, sys, time
    sys.path.insert(0, {root!r})
    from cnnx.runtime.ray_engine import classify_with_ray, import_ray
    ray = import_ray()  # ray and Ray Data, imported before ray.init as classify_with_ray does when it starts Ray
""") + CPU_BY_ROLE + textwrap.dedent("""
    t0 = time.perf_counter()
    ray.init(num_cpus={cores}, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    startup = time.perf_counter() - t0
    cpu0 = cpu_snapshot()
    first = []  # (time, classified) when the first rows came back: actors up, model loaded
    def progress(classified, skipped):
        if not first:
            first.append((time.perf_counter(), classified))
    s = classify_with_ray([{folder!r}], {model!r}, output={out!r}, topk=1, device="cpu", num_workers={cores},
                          batch_size={batch_size}, on_progress=progress)
    end = time.perf_counter()
    cpu = cpu_by_role(cpu0, cpu_snapshot())
    ray.shutdown()
    print(json.dumps({{"ray_init_s": startup, "run_s": s.seconds, "first_rows_s": s.startup_seconds,
                      "steady_images_per_s": (s.classified - first[0][1]) / (end - first[0][0]),
                      "classified": s.classified, "summary": s.line(), "cpu_s": cpu}}))
""")

# The engine alone: classify_with_ray's plan (_dataset's blocks and pool, _data_context's
# ordered rows, _blocks' conversion) with an actor that returns zero scores without opening
# a file, on the same paths (listed by Discovery before the clock starts: local classify
# lists them too).
ENGINE_DRIVER = textwrap.dedent("""
    import json, logging, os, sys, time
    sys.path.insert(0, {root!r})
    import numpy as np, pyarrow as pa
    from ray.data import ActorPoolStrategy
    from cnnx.runtime import ray_engine as eng
    ray = eng.import_ray()
    from cnnx.runtime.discover import Discovery
""") + CPU_BY_ROLE + textwrap.dedent("""
    class _NoopActor:
        def __call__(self, batch):
            n = len(batch["path"])
            empty = np.array([""] * n, dtype=object)
            return eng._result_table({{"path": batch["path"], "stage": empty, "message": empty}},
                                     np.zeros((n, 1), np.int64), np.zeros((n, 1)), "none", "none")

    t0 = time.perf_counter()
    ray.init(num_cpus={cores}, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    startup = time.perf_counter() - t0
    todo = [f.path for f in Discovery([{folder!r}]) if f.reason is None]  # local classify lists them too
    cpu0 = cpu_snapshot()
    t1 = time.perf_counter()
    rows = eng._block_rows(len(todo), {batch_size}, {cores})
    n = 0
    with eng._data_context():
        ds = ray.data.from_blocks([pa.table({{"path": pa.array(list(map(os.fsencode, todo[i:i + rows])), pa.binary())}})
                                   for i in range(0, len(todo), rows)])
        ds = ds.map_batches(_NoopActor, compute=ActorPoolStrategy(size={cores}), batch_size={batch_size},
                            batch_format="numpy", num_cpus=1)
        for block in eng._blocks(ray, ds):
            n += len(block["path"])
    seconds = time.perf_counter() - t1
    cpu = cpu_by_role(cpu0, cpu_snapshot())
    ray.shutdown()
    print(json.dumps({{"ray_init_s": startup, "run_s": seconds, "rows": n, "cpu_s": cpu}}))
""")


GOAL = 0.8  # issue 9, goal 3: Ray engine img/s >= 0.8x the local pipeline's once Ray is up


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def labels(out: Path) -> dict:
    with open(out, newline="") as f:
        return {row["path"]: row["label"] for row in csv.DictReader(f)}


def fresh(out: Path) -> Path:
    for p in (out, out.with_name(out.stem + ".errors.csv")):
        if p.exists():
            p.unlink()
    return out


def run_local(model: Path, folder: Path, batch_size: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model), "-o", str(fresh(out)),
           "--topk", "1", "--device", "cpu", "--batch-size", str(batch_size)]
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    cpu, wall = _children_cpu() - cpu0, time.perf_counter() - wall0
    if proc.returncode != 0:
        raise SystemExit(f"cnnx classify failed ({proc.returncode}): {proc.stderr}")
    summary = [line for line in proc.stderr.splitlines() if line.startswith("classified")][-1]
    seconds = float(re.search(r"; ([0-9.]+) s;", summary).group(1))
    classified = int(re.match(r"classified ([0-9,]+)", summary).group(1).replace(",", ""))
    # how busy it kept the cores over the whole process (imports included, which run on one)
    busy = cpu / (wall * len(os.sched_getaffinity(0)))
    return {"seconds": seconds, "images_per_s": classified / seconds, "classified": classified, "summary": summary,
            "process_cpu_s": round(cpu, 2), "process_wall_s": round(wall, 2), "cores_busy": round(busy, 3)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_driver(script: str, what: str) -> dict:
    """Run a driver script in a fresh Python; -> the JSON object of its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ray(model: Path, folder: Path, batch_size: int, cores: int, out: Path) -> dict:
    script = RAY_DRIVER.format(root=str(ROOT), folder=str(folder), model=str(model), out=str(fresh(out)),
                               cores=cores, batch_size=batch_size)
    r = run_driver(script, "ray driver")
    return {"seconds": r["run_s"], "images_per_s": r["classified"] / r["run_s"], "ray_init_s": r["ray_init_s"],
            "first_rows_s": r["first_rows_s"], "steady_images_per_s": r["steady_images_per_s"],
            "classified": r["classified"], "summary": r["summary"], "cpu_s_after_init": r["cpu_s"]}


def run_engine(folder: Path, batch_size: int, cores: int) -> dict:
    """Ray's own cost: the engine's plan with a no-op actor (ENGINE_DRIVER)."""
    script = ENGINE_DRIVER.format(root=str(ROOT), folder=str(folder), cores=cores, batch_size=batch_size)
    r = run_driver(script, "engine-only driver")
    return {"seconds": r["run_s"], "images_per_s": r["rows"] / r["run_s"], "rows": r["rows"],
            "ray_init_s": r["ray_init_s"], "cpu_s_after_init": r["cpu_s"],
            "cpu_s_total": round(sum(r["cpu_s"].values()), 2)}


def marginal(full_runs, half_runs) -> dict:
    """The per-image rate with fixed costs taken out: the best run of each size."""
    full = min(full_runs, key=lambda r: r["seconds"])
    half = min(half_runs, key=lambda r: r["seconds"])
    extra = full["classified"] - half["classified"]
    rate = extra / (full["seconds"] - half["seconds"])
    return {"images_per_s": rate, "fixed_s": full["seconds"] - full["classified"] / rate,
            "seconds_full": full["seconds"], "seconds_half": half["seconds"], "images_full": full["classified"],
            "images_half": half["classified"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG folder (see cifar_jpegs.py)")
    ap.add_argument("--model", type=Path, default=None, help="cnnx .onnx model (default: a seeded seed-cnn)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine-rounds", type=int, default=1, help="engine-only (no-op actor) runs, in the first rounds")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_ray.json")
    args = ap.parse_args(argv)

    folder = cifar_folder(args.cifar)
    model = args.model or build_model()
    cores = len(os.sched_getaffinity(0))
    CACHE.mkdir(parents=True, exist_ok=True)
    half = linked_subset(folder, per_class=2500)
    local_runs, ray_runs, engine_runs, half_local, half_ray = [], [], [], [], []
    for i in range(args.rounds):
        half_local.append(run_local(model, half, args.batch_size, CACHE / "local-half.csv"))
        half_ray.append(run_ray(model, half, args.batch_size, cores, CACHE / "ray-half.csv"))
        log(f"round {i + 1} on the half: local {half_local[-1]['seconds']:.2f} s, ray {half_ray[-1]['seconds']:.2f} s")
        local_runs.append(run_local(model, folder, args.batch_size, CACHE / "local.csv"))
        log(f"round {i + 1} local: {local_runs[-1]['summary']}")
        ray_runs.append(run_ray(model, folder, args.batch_size, cores, CACHE / "ray.csv"))
        log(f"round {i + 1} ray: ray.init {ray_runs[-1]['ray_init_s']:.2f} s; {ray_runs[-1]['summary']}; "
            f"CPU-s after init {ray_runs[-1]['cpu_s_after_init']}")
        if i < args.engine_rounds:
            engine_runs.append(run_engine(folder, args.batch_size, cores))
            log(f"round {i + 1} engine only: {engine_runs[-1]['seconds']:.2f} s, "
                f"{engine_runs[-1]['images_per_s']:,.0f} rows/s; CPU-s after init {engine_runs[-1]['cpu_s_after_init']}")
    a, b = labels(CACHE / "local.csv"), labels(CACHE / "ray.csv")
    best_local = max(local_runs, key=lambda r: r["images_per_s"])
    best_ray = max(ray_runs, key=lambda r: r["images_per_s"])
    payload = {
        "images": best_local["classified"],
        "cores": cores,
        "batch_size": args.batch_size,
        "local": best_local,
        "ray": best_ray,
        "ray_vs_local": best_ray["images_per_s"] / best_local["images_per_s"],
        # after the first rows came back (actors started, model loaded in each): Ray's overhead per image.
        # Rows come back in order, a block at a time, so by then the other actors' first blocks are
        # nearly done too: this rate runs high, and can pass local's.
        "ray_steady_vs_local": best_ray["steady_images_per_s"] / best_local["images_per_s"],
        "ray_startup_s": best_ray["ray_init_s"],
        # the best ratio that run's own CPU-seconds allow on these cores (every core busy all the time)
        "ray_cpu_bound_vs_local": best_local["seconds"] / (sum(best_ray["cpu_s_after_init"].values()) / cores),
        "same_labels": a == b,
        "rounds": {"local": local_runs, "ray": ray_runs, "engine_only": engine_runs, "local_half": half_local,
                   "ray_half": half_ray},
        "note": "best of the rounds; measured while other engineers shared the 2 cores (noisy)",
    }
    if engine_runs:
        # the cheapest engine run (least CPU): the most favourable ceiling
        engine = min(engine_runs, key=lambda r: r["cpu_s_total"])
        payload["engine_only"] = engine
        payload["ray_ceiling_vs_local"] = best_local["seconds"] / (best_local["seconds"]
                                                                   + engine["cpu_s_total"] / cores)
    payload["marginal"] = {name: marginal(full, halves) for name, full, halves in
                           (("local", local_runs, half_local), ("ray", ray_runs, half_ray))}
    payload["ray_marginal_vs_local"] = (payload["marginal"]["ray"]["images_per_s"]
                                        / payload["marginal"]["local"]["images_per_s"])
    payload["ray_fixed_s"] = payload["marginal"]["ray"]["fixed_s"] + best_ray["ray_init_s"]
    payload["goal"] = GOAL
    # "img/s once Ray is up, start-up reported beside it": the marginal rate; whole runs beside it
    payload["goal_met"] = payload["ray_marginal_vs_local"] >= GOAL
    payload["goal_met_whole_run"] = payload["ray_vs_local"] >= GOAL
    write_result(args.out, payload)
    keys = ("images", "ray_marginal_vs_local", "ray_fixed_s", "goal_met", "ray_vs_local", "goal_met_whole_run", "ray_steady_vs_local", "ray_startup_s", "ray_cpu_bound_vs_local",
            "ray_ceiling_vs_local", "same_labels")
    print(json.dumps({k: payload[k] for k in keys if k in payload}, indent=2))
    print(f"local {best_local['images_per_s']:,.0f} img/s; ray {best_ray['images_per_s']:,.0f} img/s once ray.init "
          f"returned ({payload['ray_vs_local']:.2f}x), {best_ray['steady_images_per_s']:,.0f} img/s after the first "
          f"rows ({payload['ray_steady_vs_local']:.2f}x); ray.init {best_ray['ray_init_s']:.2f} s")
    print(f"once up (the second 25,000 files): local {payload['marginal']['local']['images_per_s']:,.0f} img/s, ray "
          f"{payload['marginal']['ray']['images_per_s']:,.0f} img/s ({payload['ray_marginal_vs_local']:.2f}x); Ray's "
          f"start-up {payload['ray_fixed_s']:.2f} s (ray.init and the pool)")


if __name__ == "__main__":
    main()
