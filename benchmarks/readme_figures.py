"""Write every measured figure of README.md from benchmarks/results/*.json.

Each block of the README between `<!-- figures:NAME:begin ... -->` and `<!-- figures:NAME:end -->`
is generated here from the results JSONs: the figure, the goal it is held against, whether it
is met (computed from the JSON's values), the command that produced the JSON and the machine
it recorded. A figure whose JSON is absent is not shown; the block says which command makes it.
A result measured with a recipe other than today's RECIPES says so, with the command to rerun.

    python benchmarks/readme_figures.py            # rewrite README.md's blocks
    python benchmarks/readme_figures.py --check    # exit 1 when README.md differs from this

No torch: reads JSON and cnnx.train.config only.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import json
import re
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

# The project's goals (issues 2-4); the scripts' own copies decide nothing shown here.
AIRNET_TARGET, AIRNET_BUDGET_S = 0.88, 600.0
FRONTIER_TARGET = 0.91                   # issue 7: default airnet on the 2-core CPU, same budget
FRONTIER_SEEDS = 3                       # ... as the mean of this many seeds
SEED_TARGET, SEED_BUDGET_S = 0.69, 60.0
TRAIN_SPEEDUP = 1.6                      # seed-cnn training images/s vs the tutorial loop
EXPORT_FP32_SPEEDUP = 2.0                # onnxruntime fp32 vs eager, every batch size measured
EXPORT_INT8_SPEEDUP, EXPORT_INT8_LOSS_PT = 1.5, 0.5
FIRST_ROW_S = 1.0                        # cnnx classify start-up to its first prediction row
REPORT_SHARE = 0.02                      # report.html writing, share of a default cnnx train run's wall time
RAY_VS_LOCAL = 0.8                       # --engine ray img/s vs the local pipeline once Ray is up
TRANSFER_GAIN_PT = 10.0                  # fine-tuned with --weights vs scratch, val top-1 points
BIGDATA_ANON_RATIO = 1.2                 # peak anonymous memory, 10x the data beyond memory vs in-size
DISK_VS_MEMORY = 0.9                     # disk-cache img/s vs in-memory, cache in the page cache
CACHE_BUILD_VS_DECODE = 0.9              # decoding into the cache vs the cores' decode ceiling
GPU_TRAIN_TARGET, GPU_TRAIN_BUDGET_S = 0.94, 3.0  # issue 7: the GPU recipe, mean of >= 5 seeds, one H100
GPU_DECODE_SPEEDUP = 3.0                 # issue 8: GPU decoding vs the CPU-decode pipeline, where decoding limits
GPU_DECODE_AGREEMENT = 0.995             # top-1 of GPU- vs CPU-decoded predictions
GPU_CLASSIFY_RATIO = 0.8                 # issue 8: cnnx classify img/s vs the pure-inference ceiling
GPU_MEMORY_RATIO = 1.1                   # issue 8: peak memory, the large vs the small folder, --device cuda
CUDA_ROWS_AGREEMENT = 0.999              # classify's CUDA rows vs the CPU provider's, top-1
# Recipe keys whose change makes a recipe measurement stale.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "label_smoothing", "schedule",
               "warmup", "final_lr", "aug", "crop_pad", "cutout", "channels_last", "bf16")
RERUN = {
    "recipe_airnet.json": "python benchmarks/recipe_airnet.py",
    "airnet_epochs.json": "python benchmarks/recipe_airnet.py --epochs-sweep 16 17 18",
    "recipe_seed_cnn.json": "python benchmarks/recipe_seed_cnn.py",
    "bench_train.json": "python benchmarks/bench_train.py",
    "export-seed-cnn.json": "python benchmarks/bench_export.py --arch seed-cnn",
    "bench_classify.json": "python benchmarks/bench_classify.py",
    "bench_report.json": "python benchmarks/bench_report.py",
    "bench_ray.json": "python benchmarks/bench_ray.py",
    "bench_transfer.json": "python benchmarks/bench_transfer.py",
    "bench_bigdata.json": "python benchmarks/bench_bigdata.py",
    "recipe_airnet_frontier.json": "python benchmarks/recipe_airnet_frontier.py",
}
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+):begin[^>]*-->\n)(?P<body>.*?)(<!-- figures:(?P=name):end -->)",
                   re.S)


class FiguresError(Exception):
    pass


# --- formatting ---------------------------------------------------------------------------------

def pct(fraction) -> str:
    return f"{100 * fraction:.2f}%"


def num(x) -> str:
    """A count or rate: whole numbers with thousands separators, one decimal below 100."""
    return f"{x:,.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.1f}"


def ratio(x) -> str:
    return f"{x:.2f}x"


def secs(x) -> str:
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def goal_pct(fraction) -> str:
    return f"{100 * fraction:g}%"


def goal_ratio(x) -> str:
    return f"{x:g}x"


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def _wrap(text: str, **kw) -> str:
    """textwrap.fill at 100 columns that never breaks inside a `code span` (commands stay pasteable)."""
    kept = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    return textwrap.fill(kept, 100, break_long_words=False, break_on_hyphens=False, **kw).replace("\0", " ")


def para(text: str) -> str:
    return _wrap(text)


def bullets(items) -> str:
    return "\n".join(_wrap(item, initial_indent="- ", subsequent_indent="  ") for item in items)


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def code(text: str) -> str:
    return f"`{text.strip()}`"


def table(head: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; `align` holds one of l/r per column (default all left)."""
    align = align or "l" * len(head)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, rule, *rows])


def machine_text(doc: dict) -> str:
    """What the JSON recorded about its machine, nothing added."""
    m = doc.get("machine")
    if isinstance(m, str):
        return m
    parts = [m.get("processor") or m.get("cpu") or m.get("platform")]
    cores = m.get("cores", m.get("cpus"))
    if cores:
        parts.append(f"{cores} cores")
    for key in ("torch", "onnxruntime"):
        version = m.get(key) or (doc.get(key) if key == "onnxruntime" else None)
        if version:
            parts.append(f"{key} {version}")
    if threads := m.get("threads") or doc.get("threads"):
        parts.append(plural(threads, "thread"))
    if m.get("nvidia_driver") is False:
        parts.append("no GPU")
    return ", ".join(p for p in parts if p)


def measured(doc: dict, part: str) -> dict:
    """The results of a benchmark run in parts, with the command, machine and commit of the
    part that measured `part` (bench_classify: doc["parts"][part]; bench_bigdata: doc[part]["measured"])."""
    prov = doc.get("parts", {}).get(part) or (doc.get(part) or {}).get("measured")
    return {**doc, **prov} if prov else doc


def source(name: str, doc: dict) -> str:
    return f"`results/{name}`: {code(doc['command'])} on {machine_text(doc)}"


# --- reading --------------------------------------------------------------------------------------

class Results:
    """The JSONs of one results folder, loaded on first use; absent ones are remembered."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.docs = {}
        self.missing = []

    def get(self, name: str):
        if name not in self.docs:
            path = self.folder / name
            try:
                self.docs[name] = json.loads(path.read_text())
            except FileNotFoundError:
                self.docs[name] = None
            except (OSError, ValueError) as e:
                raise FiguresError(f"{path}: {e}") from None
            if self.docs[name] is not None:
                lacking = [k for k in ("command", "machine") if not self.docs[name].get(k)]
                if lacking:
                    raise FiguresError(f"{path} does not record its {' or '.join(lacking)}: rerun the benchmark")
            if self.docs[name] is None:
                self.missing.append(name)
        return self.docs[name]

    def exports(self) -> list[tuple[str, dict]]:
        return [(p.name, self.get(p.name)) for p in sorted(self.folder.glob("export-*.json"))]


def stale_note(name: str, run_config: dict, ignore=()) -> str:
    """'' when the run used today's recipe for its arch (`ignore`: keys the run chose on purpose),
    else what changed and the command to rerun."""
    from cnnx.train.config import resolve_config

    now = resolve_config(run_config["arch"]).to_dict()
    changed = [f"{k} {run_config.get(k)!r} -> {now[k]!r}" for k in RECIPE_KEYS
               if k not in ignore and run_config.get(k) != now[k]]
    if not changed:
        return ""
    return (f"; measured with an older recipe ({', '.join(changed)} since): rerun "
            f"{code(RERUN.get(name, 'its command'))}")


def data_text(cfg: dict) -> str:
    return f"{num(cfg['train_images'])} train / {num(cfg['val_images'])} val images"


def not_measured(res: Results, names) -> str:
    return bullets(f"not measured yet (no `results/{n}`): {code(RERUN[n])}" for n in names if n in res.missing)


# --- blocks ---------------------------------------------------------------------------------------

def block_results(res: Results) -> str:
    rows, notes = [], []

    def row(what, result, goal, ok, name, doc):
        rows.append([what, result, goal, met(ok) if ok is not None else "", code(doc["command"]), machine_text(doc)])

    if d := res.get("recipe_airnet.json"):
        s, cfg = d["summary"], d["run"]["config"]
        ok = s["val_top1"] >= AIRNET_TARGET and s["train_seconds"] <= AIRNET_BUDGET_S
        row("default `airnet`, val top-1 / training time",
            f"**{pct(s['val_top1'])}** in {secs(s['train_seconds'])} ({plural(cfg['epochs'], 'epoch')}, "
            f"{data_text(cfg)})"
            + stale_note("recipe_airnet.json", cfg),
            f">= {goal_pct(AIRNET_TARGET)} within {AIRNET_BUDGET_S:.0f} s", ok, "recipe_airnet.json", d)
    if d := res.get("airnet_epochs.json"):
        for run in d["runs"]:
            last, cfg = run["history"][-1], run["config"]
            ok = last["val_top1"] >= AIRNET_TARGET and last["train_seconds"] <= AIRNET_BUDGET_S
            row(f"`airnet`, default recipe with {plural(cfg['epochs'], 'epoch')}",
                f"{pct(last['val_top1'])} in {secs(last['train_seconds'])} ({data_text(cfg)})"
                + stale_note("airnet_epochs.json", cfg, ignore=("epochs",)),
                f">= {goal_pct(AIRNET_TARGET)} within {AIRNET_BUDGET_S:.0f} s", ok, "airnet_epochs.json", d)
    if d := res.get("recipe_airnet_frontier.json"):
        for c in d["summary"]:
            ok = (c["mean_val_top1"] >= FRONTIER_TARGET and c["mean_train_seconds"] <= AIRNET_BUDGET_S
                  and c["seeds"] >= FRONTIER_SEEDS)
            row(f"`airnet` default recipe + `{c['flags']}` (issue 7's CPU candidate), mean of "
                f"{plural(c['seeds'], 'seed')}",
                f"**{pct(c['mean_val_top1'])}** in {secs(c['mean_train_seconds'])} of training "
                f"({num(c['train_images_per_second'][0])} img/s; curve in the JSON)",
                f">= {goal_pct(FRONTIER_TARGET)} within {AIRNET_BUDGET_S:.0f} s, mean of {FRONTIER_SEEDS} seeds", ok,
                "recipe_airnet_frontier.json", d)
    if d := res.get("gpu_recipe_on_cpu.json"):
        run = d["runs"][0]
        ok = run["final_val_top1"] >= FRONTIER_TARGET and run["train_seconds"] <= AIRNET_BUDGET_S
        row(f"`airnet` with the GPU recipe (64/256/256, whitening, Muon, 6 views) on this CPU, "
            f"{plural(run['epochs'], 'epoch')} (about what {AIRNET_BUDGET_S:.0f} s allows), one seed",
            f"**{pct(run['final_val_top1'])}** in {secs(run['train_seconds'])} of training "
            f"({secs(run['train_seconds'] / run['epochs'])} a training epoch)",
            f">= {goal_pct(FRONTIER_TARGET)} within {AIRNET_BUDGET_S:.0f} s", ok, "gpu_recipe_on_cpu.json", d)
    if d := res.get("recipe_seed_cnn.json"):
        s, cfg = d["summary"], d["runs"]["recipe"]["config"]
        hit = s["recipe_seconds_to_target"]
        ok = hit is not None and hit <= SEED_BUDGET_S
        tutorial = ""
        if s.get("tutorial_seconds_to_target"):
            tutorial = (f"; the tutorial's hyperparameters through `cnnx train`: {secs(s['tutorial_seconds_to_target'])}"
                        f" ({ratio(s['speedup_to_target'])} longer)")
        row(f"`seed-cnn` (the tutorial net), training time to {goal_pct(SEED_TARGET)} val top-1",
            f"**{secs(hit) if hit is not None else 'not reached'}** ({pct(s['val_top1'])} after {plural(cfg['epochs'], 'epoch')}, {data_text(cfg)})"
            f"{tutorial}"
            + stale_note("recipe_seed_cnn.json", cfg),
            f"within {SEED_BUDGET_S:.0f} s", ok, "recipe_seed_cnn.json", d)
    if d := res.get("bench_train.json"):
        t, r = d["throughput_img_s"], d["ratios"]
        row("`seed-cnn` training images/s vs the tutorial loop (ImageFolder + DataLoader, Adam, batch 128)",
            f"**{ratio(r['cnnx_recipe_vs_tutorial'])}** with its recipe ({num(t['cnnx_recipe_img_s'])} vs "
            f"{num(t['tutorial_img_s'])} img/s); {ratio(r['cnnx_same_hparams_vs_tutorial'])} with the tutorial's "
            f"fp32/batch-128 settings, whose compute bound is {ratio(r['bound_same_hparams_vs_tutorial'])}",
            f">= {goal_ratio(TRAIN_SPEEDUP)}", r["cnnx_recipe_vs_tutorial"] >= TRAIN_SPEEDUP, "bench_train.json", d)
    if d := res.get("export-seed-cnn.json"):
        fp32 = d["speedup"]["onnxruntime-fp32_vs_eager"]
        row("export, `seed-cnn` onnxruntime fp32 vs eager PyTorch",
            ", ".join(f"**{ratio(v)}** (batch {b})" for b, v in fp32.items()),
            f">= {goal_ratio(EXPORT_FP32_SPEEDUP)}", all(v >= EXPORT_FP32_SPEEDUP for v in fp32.values()),
            "export-seed-cnn.json", d)
        int8, refused = d["speedup"]["int8_vs_onnxruntime-fp32"], d.get("refused_by_parity_gate")
        if refused and not int8:
            why = refused["error"] if isinstance(refused, dict) else refused
            row("export, `seed-cnn` onnxruntime int8 vs fp32", f"refused by the parity gate ({why})",
                f">= {goal_ratio(EXPORT_INT8_SPEEDUP)}, <= {EXPORT_INT8_LOSS_PT:g} pt lost", False,
                "export-seed-cnn.json", d)
        if int8:
            loss = -d["top1_change_vs_eager_pt"]["onnxruntime-int8"]
            row("export, `seed-cnn` onnxruntime int8 vs fp32",
                ", ".join(f"**{ratio(v)}** (batch {b})" for b, v in int8.items()) + f"; top-1 {-loss:+.2f} pt",
                f">= {goal_ratio(EXPORT_INT8_SPEEDUP)}, <= {EXPORT_INT8_LOSS_PT:g} pt lost",
                all(v >= EXPORT_INT8_SPEEDUP for v in int8.values()) and loss <= EXPORT_INT8_LOSS_PT,
                "export-seed-cnn.json", d)
        if gate := d.get("parity_gate"):
            fp32_rows = [g for g in gate["results"] if g["variant"] == "fp32"]
            worst = {}
            for g in fp32_rows:
                worst[g["backend"]] = max(worst.get(g["backend"], 0.0), g["max_abs"])
            bound = gate["bounds"]["fp32"]
            images = sum(g["n"] for g in fp32_rows if g["backend"] == fp32_rows[0]["backend"])
            agree = min(g["top1_agreement"] for g in fp32_rows)
            row("parity gate of that export, fp32 max abs logit difference",
                ", ".join(f"{b} {v:.1e}" if v else f"{b} 0" for b, v in worst.items()) + f"; top-1 agreement {pct(agree)} "
                f"on {num(images)} images",
                f"<= {bound['max_abs']:g}, {goal_pct(bound['min_top1'])} agreement",
                max(worst.values()) <= bound["max_abs"] and agree >= bound["min_top1"], "export-seed-cnn.json", d)
        else:
            notes.append("the parity gate's figures of the seed-cnn export: `results/export-seed-cnn.json` is from "
                         f"a version of the benchmark that did not record them; rerun {code(RERUN['export-seed-cnn.json'])}")
    if d := res.get("bench_classify.json"):
        goals = d["goals"]
        if b := d.get("bound"):
            goal = goals["cpu_bound_ratio_min"]
            row(f"`cnnx classify --topk 1`, {num(b['files'])} CIFAR-10 JPEGs, vs the CPU bound (onnxruntime alone on ready "
                f"batches + single-core decode / {b['cores']} cores, same run)",
                f"**{b['ratio_process']:.2f}** as a process ({secs(b['classify_process_s'])} vs a "
                f"{secs(b['bound_s'])} bound: {secs(b['ort_only_s'])} + {secs(b['decode_one_core_s'])} / "
                f"{b['cores']}); {b['ratio_summary']:.2f} without start-up"
                + (f"; median of each round's own ratio: {b['ratio_same_round_median']:.2f}; "
                   f"vs the bound plus the {secs(b['startup_floor_s'])} any process needs to start "
                   f"(Python, numpy, onnxruntime, the model): {b['ratio_process_vs_bound_with_startup_floor']:.2f}"
                   if "startup_floor_s" in b else "")
                + (f"; timed while its memory is polled, as this figure was before: "
                   f"{b['ratio_process_memory_polled']:.2f}" if "ratio_process_memory_polled" in b else "")
                + (f"; decode threads instead of processes: {b['ratio_process_decode_threads']:.2f}; vs the bound "
                   f"with the default session ({secs(b['bound_default_session_s'])}): "
                   f"{b['ratio_process_default_session_bound']:.2f}" if "ratio_process_decode_threads" in b else "")
                + (f"; vs the bound with whole-batch runs ({secs(b['bound_whole_batch_runs_s'])}), the lowest before "
                   f"the decode processes ran their batches in slices: {b['ratio_process_whole_batch_runs_bound']:.2f}"
                   if "bound_whole_batch_runs_s" in b else ""),
                f">= {goal:g}", b["ratio_process"] >= goal, "bench_classify.json", measured(d, "bound"))
        if m := d.get("memory"):
            limit = goals["memory_50k_vs_5k_max_ratio"]
            row(f"`cnnx classify` peak memory, {num(m['files_50k'])} vs {num(m['files_5k'])} files",
                f"{m['files_50k_peak_rss_mib']:.1f} vs {m['files_5k_peak_rss_mib']:.1f} MiB ({m['ratio']:.3f}x)",
                f"<= {goal_ratio(limit)}", m["ratio"] <= limit, "bench_classify.json", measured(d, "memory"))
        row("`cnnx classify` start-up to its first prediction row", secs(d["first_batch_latency_s"]),
            f"< {FIRST_ROW_S:g} s", d["first_batch_latency_s"] < FIRST_ROW_S, "bench_classify.json",
            measured(d, "bound"))
    if d := res.get("bench_ray.json"):
        m = d["marginal"]
        row(f"`cnnx classify --engine ray` (local Ray, {d['cores']} cores) vs the local pipeline, "
            f"{num(d['images'])} CIFAR-10 JPEGs, once Ray is up (the second {num(m['ray']['images_full'] - m['ray']['images_half'])} "
            "files: fixed costs out)",
            f"**{ratio(d['ray_marginal_vs_local'])}** ({num(m['ray']['images_per_s'])} vs "
            f"{num(m['local']['images_per_s'])} img/s); Ray's start-up {secs(d['ray_fixed_s'])} (ray.init "
            f"{secs(d['ray_startup_s'])}); whole runs {ratio(d['ray_vs_local'])}",
            f">= {goal_ratio(RAY_VS_LOCAL)}", d["ray_marginal_vs_local"] >= RAY_VS_LOCAL, "bench_ray.json", d)
    if d := res.get("bench_transfer.json"):
        row(f"fine-tuning with `--weights` ({d['arch']} pretrained on {num(d['pretrain_images'])} animal images) vs "
            f"scratch, {num(d['finetune_train_images'])} vehicle images",
            f"**{d['gain_points_median']:+.1f} points** (median of {len(d['seeds'])} seeds: "
            f"{', '.join(format(s['gain_points'], '+.1f') for s in d['seeds'])})", f">= +{TRANSFER_GAIN_PT:g} points",
            d["gain_points_median"] >= TRANSFER_GAIN_PT, "bench_transfer.json", d)
    if d := res.get("bench_bigdata.json"):
        b, sp, dec = d["beyond-memory"], d["speed"], d["decode"]
        row(f"training beyond memory ({b['cache_over_limit']:.1f}x the cgroup limit), peak anonymous memory vs a 10x "
            "smaller folder", f"**{b['peak_anon_ratio_big_over_small']:.2f}x**", f"<= {BIGDATA_ANON_RATIO:g}x",
            b["peak_anon_ratio_big_over_small"] <= BIGDATA_ANON_RATIO, "bench_bigdata.json",
            measured(d, "beyond-memory"))
        row("disk cache (page cache) vs in-memory training images/s", f"**{sp['disk_over_memory']:.2f}x**",
            f">= {DISK_VS_MEMORY:g}x", sp["disk_over_memory"] >= DISK_VS_MEMORY, "bench_bigdata.json",
            measured(d, "speed"))
        row("decoding photos into the cache vs the cores' decode ceiling",
            f"**{dec['build_over_ceiling']:.3f}x** (median of {len(dec['build_over_ceiling_by_round'])} paired rounds)",
            f">= {CACHE_BUILD_VS_DECODE:g}x", dec["build_over_ceiling"] >= CACHE_BUILD_VS_DECODE, "bench_bigdata.json",
            measured(d, "decode"))
    if d := res.get("bench_report.json"):
        share = d["summary"]["share_of_wall_time"]
        row("report.html written after every epoch, share of a default `cnnx train` run's wall time",
            f"**{share:.2%}** ({secs(d['summary']['report_seconds_per_epoch'])} per epoch)",
            f"<= {REPORT_SHARE:.0%}", share <= REPORT_SHARE, "bench_report.json", d)
    out = [table(["what", "result", "goal", "", "command", "machine (as recorded)"], rows)]
    missing = [f"not measured yet (no `results/{n}`): {code(RERUN[n])}" for n in RERUN if n in res.missing]
    if missing + notes:
        out.append(bullets(missing + notes))
    return "\n\n".join(out)


def gpu_machine(doc: dict) -> str:
    """machine_text plus the card, and the onnxruntime the run really imported (the card record)."""
    card = doc.get("card") or {}
    name = card.get("name") or (card.get("nvidia_smi") or "").split(",")[0] or "GPU not recorded"
    text = machine_text(doc)
    ort = (card.get("onnxruntime") or {}).get("version")
    if ort:
        text = re.sub(r"onnxruntime [\w.]+", f"onnxruntime {ort}", text)
    return f"{name}; {text}"


def block_gpu(res: Results) -> str:
    """issue 7's and issue 8's GPU figures, each with the card it ran on."""
    rows, notes = [], []

    def row(what, result, goal, ok, doc):
        rows.append([what, result, goal, met(ok) if ok is not None else "", code(doc["command"]), gpu_machine(doc)])

    def train_row(what, d, goal=True):
        s = d["summary"]
        runs = d["runs"]
        ok = s["met"] if goal else None
        spread = f" (std {100 * s['std_final_val_top1']:.2f} pt)" if s["std_final_val_top1"] is not None else ""
        row(what, f"**{pct(s['mean_final_val_top1'])}**{spread} in "
                  f"{secs(s['mean_train_seconds'])} of training per run, mean of {plural(len(runs), 'seed')}, "
                  f"{plural(runs[0]['epochs'], 'epoch')}; torch.compile {secs(max(s['compile_seconds']))} once, not "
                  "counted",
            f">= {goal_pct(GPU_TRAIN_TARGET)} in <= {GPU_TRAIN_BUDGET_S:g} s, >= 5 seeds" if goal else "(the bound: more epochs)",
            ok, d)

    if d := res.get("gpu_train.json"):
        train_row("`cnnx train` GPU recipe (`airnet`, the CIFAR-10 JPEGs, train's validation split), final val top-1", d)
    if d := res.get("gpu_train_9epochs.json"):
        train_row("the same with airbench94_muon's step count (9 epochs here)", d)
    if d := res.get("gpu_train_30epochs.json"):
        train_row("the same recipe trained 30 epochs: what this net reaches on this data", d, goal=False)
    if d := res.get("gpu_classify.json"):
        gpu_classify_rows(d, res.get(OTHER_GPU_RUN), row, notes)
    # In the order they were measured: each row says what the changes since the one above gave.
    for name in sorted((p.name for p in res.folder.glob("gpu_steady_state_*.json")),
                       key=lambda n: (res.get(n).get("recorded_at") or "", n)):
        steady_state_ab_row(res.get(name), name, row)
        shared_decode_row(res.get(name), name, row)
    missing = [f"not measured yet (no `results/{n}`)" for n in ("gpu_train.json", "gpu_classify.json") if n in res.missing]
    out = [table(["what", "result", "goal", "", "command", "machine (as recorded)"], rows)] if rows else []
    if missing + notes:
        out.append(bullets(missing + notes))
    return "\n\n".join(out)


OTHER_GPU_RUN = "gpu_classify_h200.json"  # the same script's whole run on the other card


def _version_label(commit: str) -> str:
    """A commit's short hash; a variant's own words (its COMMIT file, e.g. "slots=3 on <commit>") as they are."""
    return commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def steady_state_ab_row(d: dict, name: str, row):
    """A steady-state A/B of gpu_classify.py --baseline: each version's marginal rate, same
    run, same card, rounds interleaved. None where the run did not get to that stage (cut by
    its budget, or not in its --stages): its other figures are rows of their own."""
    st = d.get("steady_state_airnet_fp32")
    if not st or "large" not in st:
        return
    versions = [(_version_label(b["commit"]), b) for b in st.get("baselines", [])]
    if "baseline" in st:  # the first runs' one baseline
        versions.append((st["baseline"]["commit"][:7], st["baseline"]))
    versions.append(((d.get("tree_commit") or d["git_commit"])[:7], st))
    row(f"steady state by version, `airnet` fp32, {num(st['large']['files'])} vs {num(st['small']['files'])} files, "
        f"same run (`results/{name}`)", "; ".join(f"{c}: {num(v['marginal_img_s'])} img/s "
                                                   f"({v['marginal_ratio_to_ceiling']:.3f})" for c, v in versions),
        "(what each change gave)", None, d)


def shared_decode_row(d: dict, name: str | None, row):
    """--decoder auto (each batch shared by nvImageCodec and CPU threads) against --decoder cpu
    and gpu, from one gpu_classify.py run that measured it (name: its file, where not the main run)."""
    g = d.get("gpu_decode_classify_resnet18")
    if not g or "auto_decode" not in g:
        return
    a, cpu = g["auto_decode"], g["cpu_decode"]
    where = f" (`results/{name}`)" if name else ""
    row(f"`cnnx classify --decoder auto` (nvImageCodec and CPU threads share each batch) vs `--decoder cpu`, "
        f"`resnet18` 224 px, {num(a['files'])} 2-12 MP photos, the classify pipeline{where}",
        f"**{g['auto_vs_cpu_decode']:.2f}x** ({num(a['img_s'])} vs {num(cpu['img_s'])} img/s; files decoded by the "
        f"GPU {num(a['on_gpu'])}, by the CPU {num(sum(a['to_cpu'].values()))}); `--decoder gpu` alone "
        f"{g['gpu_vs_cpu_decode']:.2f}x ({num(g['gpu_decode']['img_s'])} img/s)", f">= {goal_ratio(GPU_DECODE_SPEEDUP)}",
        g["auto_vs_cpu_decode"] >= GPU_DECODE_SPEEDUP, d)


def gpu_classify_rows(d: dict, other_run: dict | None, row, notes):
    """Issue 8's figures from one gpu_classify.py run: the ceilings, cnnx classify against them
    and against what bounds it (start-up, CPU decoding), GPU decoding, agreement, memory."""
    for key in sorted(k for k in d if k.startswith("ceiling_")):
        model, variant = key[len("ceiling_"):].rsplit("_", 1)
        c = d[key]
        row(f"onnxruntime CUDA, `{model}` {variant}: pure-inference ceiling (IOBinding, batch {c['batch']} already on "
            f"the GPU, {c.get('ceiling_slots', 2)} in flight)", f"{num(c['ceiling_img_s'])} img/s (plain `session.run`: "
            f"{num(c['session_run_img_s'])})", "(the reference)", None, d)
    for arch in ("resnet18", "airnet"):
        e = d.get(f"export_{arch}") or {}
        worst = {}
        for r in (e.get("parity") or {}).get("rows", []):
            if r["backend"].startswith("onnxruntime-cuda"):
                w = worst.setdefault(r["variant"], [0.0, 1.0])
                w[0], w[1] = max(w[0], r["max_abs"]), min(w[1], r["top1_agreement"])
        if worst:
            weights = "trained" if e["weights"].startswith("trained") else e["weights"].split(" (")[0]
            row(f"`cnnx export --fp16` parity gate on CUDA, `{arch}` {e['size']} px ({weights} weights)",
                "; ".join(f"{v} max abs logit difference {m:.1e}, top-1 agreement {pct(a)}" for v, (m, a) in worst.items()),
                "the gate's bounds", e["parity"]["passed"], d)
    for variant in ("fp32", "fp16"):
        k, c = d.get(f"classify_airnet_{variant}"), d.get(f"ceiling_airnet_{variant}")
        if k and c:
            r = k["img_s"] / c["ceiling_img_s"]
            row(f"`cnnx classify --device cuda --topk 1`, trained `airnet` {variant}, {num(k['files'])} CIFAR-10 JPEGs, "
                "whole process", f"{num(k['img_s'])} img/s ({secs(k['wall_s'])}): **{r:.3f}** of the ceiling",
                f">= {goal_ratio_plain(GPU_CLASSIFY_RATIO)} of the ceiling", r >= GPU_CLASSIFY_RATIO, d)
    f, c, k = d.get("startup_floor_airnet"), d.get("ceiling_airnet_fp32"), d.get("classify_airnet_fp32")
    if f and c and k:
        infer_s = k["files"] / c["ceiling_img_s"]
        row("the start-up floor: a fresh Python importing numpy and onnxruntime, creating the CUDA session, running "
            "one batch (best of 3)", f"{secs(f['process_s'])}: with the ceiling's {secs(infer_s)} for "
            f"{num(k['files'])} files, a process reaches at most **{infer_s / (infer_s + f['process_s']):.3f}** of "
            "the ceiling", f"(the bound of the {goal_ratio_plain(GPU_CLASSIFY_RATIO)} goal for {num(k['files'])} files)",
            None, d)
    if st := d.get("steady_state_airnet_fp32"):
        big = st["large"]
        row(f"`cnnx classify --device cuda --topk 1` steady state, `airnet` fp32: {num(big['files'])} files (10 hard-linked "
            f"copies of the CIFAR JPEGs) vs {num(st['small']['files'])}, marginal rate (start-up taken out)",
            f"{num(st['marginal_img_s'])} img/s: **{st['marginal_ratio_to_ceiling']:.3f}** of the ceiling (whole "
            f"process on {num(big['files'])} files: {num(big['img_s'])} img/s, {big['ratio_to_ceiling']:.3f})",
            f">= {goal_ratio_plain(GPU_CLASSIFY_RATIO)} of the ceiling", st["marginal_ratio_to_ceiling"] >= GPU_CLASSIFY_RATIO,
            d)
    if (b := d.get("decode_bound_cifar")) and c:
        row(f"CPU decoding alone, {num(b['files'])} CIFAR JPEGs: `load_image` in {b['cores']} processes; cnnx's "
            f"{b['procdecode_workers']} decode processes without a model", f"{num(b['load_image_img_s'])} img/s "
            f"({b['load_image_img_s'] / c['ceiling_img_s']:.2f} of the fp32 ceiling); {num(b['procdecode_img_s'])} "
            f"img/s ({b['procdecode_img_s'] / c['ceiling_img_s']:.2f})", "(the decode bound)", None, d)
    dec = d.get("decode_only_photos")
    for variant in ("fp32", "fp16"):
        k, c = d.get(f"classify_resnet18_{variant}"), d.get(f"ceiling_resnet18_{variant}")
        if k and c and dec:
            r = k["img_s"] / c["ceiling_img_s"]
            row(f"`cnnx classify --device cuda --topk 1`, `resnet18` {variant} 224 px, {num(k['files'])} 2-12 MP JPEG photos, "
                "whole process", f"{num(k['img_s'])} img/s: {r:.3f} of the ceiling; the CPU decode pipeline alone: "
                f"{num(dec['img_s'])} img/s ({dec['img_s'] / c['ceiling_img_s']:.3f}): decoding is the limit",
                f">= {goal_ratio_plain(GPU_CLASSIFY_RATIO)} of the ceiling, or GPU decoding >= "
                f"{goal_ratio(GPU_DECODE_SPEEDUP)} where decoding limits", None, d)
    if (g := d.get("gpu_decode_ceiling")) and dec:
        row(f"nvImageCodec alone on {num(g['files'])} 2-12 MP JPEG photos ({g['mean_megapixels']:g} MP mean) vs cnnx's "
            f"CPU decode pipeline ({dec['threads']} threads)",
            f"{num(g['img_s'])} vs {num(dec['img_s'])} img/s: **{g['img_s'] / dec['img_s']:.2f}x**, the most GPU "
            f"decoding can give here ({goal_ratio(GPU_DECODE_SPEEDUP)} would be {num(GPU_DECODE_SPEEDUP * dec['img_s'])} "
            "img/s)", f"(the bound of the {goal_ratio(GPU_DECODE_SPEEDUP)} goal)", None, d)
    if (o := d.get("gpu_decode_only_photos")) and dec:
        ratio_ = o["img_s"] / dec["img_s"]
        row("`--decoder gpu` pipeline (nvImageCodec + crop/resize on the GPU) vs the CPU decode pipeline, same photos",
            f"**{ratio_:.2f}x** ({num(o['img_s'])} vs {num(dec['img_s'])} img/s)",
            f">= {goal_ratio(GPU_DECODE_SPEEDUP)}", ratio_ >= GPU_DECODE_SPEEDUP, d)
    shared_decode_row(d, None, row)
    for key, what in (("gpu_decode_classify_airnet_cifar", "the CIFAR JPEGs"),
                      ("gpu_decode_classify_airnet_photos", "the 2-12 MP photos (resized to 32 px)")):
        if g := d.get(key):
            row(f"`--decoder gpu` vs `--decoder cpu` top-1 agreement, trained `airnet`, {num(g['n'])} files: {what}",
                f"**{pct(g['top1_agreement'])}** ({g['distinct_top1_classes']} classes given); "
                f"{num(g['gpu_decode']['img_s'])} vs {num(g['cpu_decode']['img_s'])} img/s",
                f">= {pct(GPU_DECODE_AGREEMENT)}", g["top1_agreement"] >= GPU_DECODE_AGREEMENT, d)
    if px := d.get("gpu_decode_pixels"):
        row(f"`--decoder gpu` model input vs `load_image`'s, {px['n']} photos",
            f"{px['mean_abs']:.2f} levels mean (max {px['max_abs']})", "(how close the pixels are)", None, d)
    if rows_ := d.get("classify_rows_cuda_vs_cpu_airnet"):
        row(f"`cnnx classify` rows, CUDA (IOBinding) vs the CPU provider, trained `airnet`, {num(rows_['n'])} files",
            f"top-1 agreement **{pct(rows_['top1_agreement'])}** ({rows_['distinct_top1_classes']} classes given)",
            "every batch runs its own pixels", rows_["top1_agreement"] >= CUDA_ROWS_AGREEMENT, d)
    if m := d.get("memory_airnet"):
        row(f"`cnnx classify --device cuda` peak memory (host, the whole process tree), {num(m['files_large']['files'])} "
            f"vs {num(m['files_small']['files'])} files", f"{m['files_large']['peak_rss_mib']:.0f} vs "
            f"{m['files_small']['peak_rss_mib']:.0f} MiB ({m['ratio']:.3f}x)", f"<= {GPU_MEMORY_RATIO:g}x",
            m["ratio"] <= GPU_MEMORY_RATIO, d)
    if sw := d.get("sweep_classify_airnet"):
        best = max(sw, key=lambda b: sw[b])
        row("`cnnx classify --device cuda --batch-size B`, `airnet` on the CIFAR JPEGs, whole process",
            "; ".join(f"{b}: {num(v)}" for b, v in sw.items()) + f" img/s (best {best}; the default is "
            f"{d['batch_default']})", "(the default's choice)", None, d)
    if t := d.get("pytest_gpu"):
        row("the CUDA, diagnosis and GPU-decode tests on that machine", t["tail"][-1].strip("= "), "pass",
            t["returncode"] == 0, d)
    k1, k2 = (other_run or {}).get("classify_airnet_fp32"), d.get("classify_airnet_fp32")
    s1, s2 = (other_run or {}).get("steady_state_airnet_fp32"), d.get("steady_state_airnet_fp32")
    if k1 and k2:
        steady = (f"; steady state {num(s1['marginal_img_s'])} img/s ({s1['marginal_ratio_to_ceiling']:.3f} of its "
                  f"ceiling) there, {num(s2['marginal_img_s'])} ({s2['marginal_ratio_to_ceiling']:.3f}) here"
                  if s1 and s2 else "")
        notes.append(f"The same script's whole run on the other card (`results/{OTHER_GPU_RUN}`, "
                     f"{gpu_machine(other_run).split(';')[0]}, commit "
                     f"{(other_run.get('tree_commit') or other_run['git_commit'])[:7]}): `airnet` fp32 classify of "
                     f"{num(k1['files'])} files {num(k1['img_s'])} img/s ({secs(k1['wall_s'])}), here "
                     f"{num(k2['img_s'])} img/s ({secs(k2['wall_s'])}){steady}. Whole-process figures also vary from "
                     "run to run on one kind of machine, mostly in the start-up (first batch after "
                     + ", ".join(re.search(r"first batch after ([\d.]+ s)", k["summary"]).group(1) for k in (k1, k2))
                     + ").")


def goal_ratio_plain(x) -> str:
    return f"{x:g}"


def block_train_throughput(res: Results) -> str:
    d = res.get("bench_train.json")
    if d is None:
        return not_measured(res, ["bench_train.json"])
    t, r = d["throughput_img_s"], d["ratios"]
    base = t["tutorial_img_s"]
    rows = [[what, num(t[key]), ratio(t[key] / base)] for what, key in (
        ("tutorial loop (ImageFolder + DataLoader, fp32, Adam, batch 128)", "tutorial_img_s"),
        ("cnnx loop, tutorial hyperparameters (fp32, Adam, batch 128, crop+flip on the batch)",
         "cnnx_same_hparams_img_s"),
        ("compute bound, tutorial hyperparameters (one resident batch, fwd+bwd+step)", "bound_same_hparams_img_s"),
        ("**cnnx loop, seed-cnn recipe**", "cnnx_recipe_img_s"),
        ("compute bound, recipe settings", "bound_recipe_img_s"))]
    return "\n\n".join([
        table(["seed-cnn training throughput", "images/s", "vs tutorial"], rows, "lrr"),
        para(f"{plural(d['batches'], 'measured batch', 'measured batches')} per figure after "
             f"{plural(d['warmup'], 'warm-up batch', 'warm-up batches')}; the cnnx loop with its "
        f"recipe runs at {ratio(r['cnnx_recipe_vs_bound_recipe'])} of its own compute bound. At its rate the "
        f"tutorial loop needs {secs(d['tutorial_3_epochs_estimated_s'])} for its 3 epochs. "
        f"Goal >= {goal_ratio(TRAIN_SPEEDUP)} the tutorial loop: "
        f"{met(r['cnnx_recipe_vs_tutorial'] >= TRAIN_SPEEDUP)}. Source: " + source("bench_train.json", d) + ".")])


def block_recipes(res: Results) -> str:
    """The recipes as cnnx.train.config resolves them today (not a measurement; kept beside the figures)."""
    from cnnx.train.config import resolve_config

    cfgs = {arch: resolve_config(arch).to_dict() for arch in ("seed-cnn", "airnet")}

    def each(fn):
        return [fn(c) for c in cfgs.values()]

    rows = [
        ["optimizer"] + each(lambda c: f"{OPTIMIZERS[c['optimizer']]}, momentum {c['momentum']:g}, lr {c['lr']:g}, "
                                       f"weight decay {c['weight_decay']:g}"),
        ["schedule"] + each(schedule_text),
        ["batch, epochs"] + each(lambda c: f"{c['batch_size']}, {c['epochs']}"),
        ["augmentation"] + each(lambda c: " + ".join(c["aug"]) + (f" (crop after {c['crop_pad']}-px reflect padding)"
                                                                 if "crop" in c["aug"] else "")),
        ["label smoothing"] + each(lambda c: f"{c['label_smoothing']:g}"),
        ["bf16 autocast, channels_last"] + each(lambda c: f"{on(c['bf16'])}, {on(c['channels_last'])}"),
    ]
    return table([""] + [f"`{a}`" for a in cfgs], rows)


OPTIMIZERS = {"sgd": "SGD Nesterov", "adamw": "AdamW", "adam": "Adam"}  # as cnnx.train.loop.make_optimizer builds them


def on(flag) -> str:
    return {True: "on", False: "off", None: "CUDA only"}[flag]


def schedule_text(c: dict) -> str:
    end = "0" if c["final_lr"] == 0 else f"{c['final_lr']:g} x the peak"
    if c["schedule"] == "onecycle":
        return f"linear warm-up over {c['warmup']:.0%} of the steps, then linear decay to {end}"
    return f"{c['schedule']}, warm-up {c['warmup']:.0%} of the steps, final lr {end}"


def block_training_speed(res: Results) -> str:
    out = []
    if d := res.get("recipe_airnet.json"):
        if d["throughput"]:
            base = d["throughput"][0]["images_per_second"]
            by_width = {}
            for t in d["throughput"]:
                cell = f"{num(t['images_per_second'])} ({ratio(t['images_per_second'] / base)})"
                by_width.setdefault("/".join(map(str, t["widths"])), {})[t["bf16"]] = cell
            rows = [[w, c.get(False, ""), c.get(True, "")] for w, c in by_width.items()]
            out.append(table(["AirNet widths", "fp32, contiguous", "bf16 autocast, channels_last"], rows, "lrr"))
            out.append(para("Images/s of one SGD step at batch 512 (fast quartile of 8 steps; the first row is "
                            "airbench94's widths, the baseline)."))
        if d.get("run"):
            out.append(para(f"`airnet` over whole `cnnx train` epochs: {num(d['summary']['train_images_per_second'])} "
                            f"images/s. Source: {source('recipe_airnet.json', d)}."))
    if d := res.get("recipe_seed_cnn.json"):
        s = d["summary"]
        if "tutorial_images_per_second" in s:
            out.append(para(f"`seed-cnn` over whole `cnnx train` epochs: {num(s['recipe_images_per_second'])} "
                            f"images/s with its recipe vs {num(s['tutorial_images_per_second'])} with the tutorial's "
                            f"hyperparameters. Source: {source('recipe_seed_cnn.json', d)}."))
    if missing := not_measured(res, ["recipe_airnet.json", "airnet_epochs.json", "recipe_seed_cnn.json"]):
        out.append(missing)
    return "\n\n".join(out)


def block_export(res: Results) -> str:
    out = []
    if d := res.get("export-seed-cnn.json"):
        ips, top1, change = d["images_per_s"], d["top1"], d["top1_change_vs_eager_pt"]
        sizes = list(ips["eager"])
        rows = [[name] + [num(ips[name][b]) for b in sizes] + [f"{top1[name]:.2f}%",
                                                               "" if name == "eager" else f"{change[name]:+.2f} pt"]
                for name in ips]
        out.append(table(["seed-cnn", *[f"images/s, batch {b}" for b in sizes],
                          f"top-1 ({num(d['validation_images'])} val)", "vs eager"], rows, "l" + "r" * (len(sizes) + 2)))
        tr = d["training"]
        secs_text = ", ".join(f"{k} {v:.2f}" for k, v in d["export_seconds"].items() if k != "total_with_parity_gate")
        out.append(para(f"The model: seed-cnn trained in the benchmark, {plural(tr['epochs'], 'epoch')} of plain SGD on "
                   f"{num(tr['train_images'])} CIFAR-10 JPEGs; top-1 on {num(d['validation_images'])} others. "
                   f"Export seconds: {secs_text}; {secs(d['export_seconds']['total_with_parity_gate'])} in all with "
                   f"the parity gate. Source: {source('export-seed-cnn.json', d)}."))
    others = [(n, d) for n, d in res.exports() if n != "export-seed-cnn.json"]
    if others:
        rows = []
        for _, d in others:
            ips, sp = d["images_per_s"], d["speedup"]
            b1, bn = list(ips["eager"])
            fp32 = sp["onnxruntime-fp32_vs_eager"]
            int8 = sp["int8_vs_onnxruntime-fp32"]
            refused = d.get("refused_by_parity_gate")
            if int8:
                int8_cell = (f"{num(ips['onnxruntime-int8'][b1])} / {num(ips['onnxruntime-int8'][bn])} "
                             f"({ratio(int8[b1])} / {ratio(int8[bn])})")
                change = f"{d['top1_change_vs_eager_pt']['onnxruntime-int8']:+.2f} pt"
            else:
                int8_cell, change = "refused by the parity gate" if refused else "not exported", ""
            rows.append([f"{d['arch']} ({'x'.join(map(str, d['input_size']))}, {plural(d['training']['epochs'], 'epoch')})",
                         f"{num(ips['eager'][b1])} / {num(ips['eager'][bn])}",
                         f"{num(ips['onnxruntime-fp32'][b1])} / {num(ips['onnxruntime-fp32'][bn])} "
                         f"({ratio(fp32[b1])} / {ratio(fp32[bn])})",
                         int8_cell, change, f"{d['top1']['eager']:.1f}%", f"{d['export_seconds']['onnx']:.1f}"])
        out.append(table(["arch (briefly trained)", "eager b=1 / b=256", "ORT fp32 b=1 / b=256 (x eager)",
                          "ORT int8 b=1 / b=256 (x fp32)", "int8 top-1 change", "eager top-1", "ONNX export s"],
                         rows, "lrrrrrr"))
        out.append(bullets(f"{d['arch']}: {source(n, d)}" for n, d in others))
    if missing := not_measured(res, ["export-seed-cnn.json"]):
        out.append(missing)
    return "\n\n".join(out)


def classify_set(d: dict, key: str) -> str:
    """How bench_classify.json describes one of its image sets."""
    if key == "cifar":
        return f"{num(d['cifar']['files'])} CIFAR-10 JPEGs (32x32)"
    ps = d.get("photos_set", {})
    return f"{num(d['photos']['files'])} photos ({ps.get('megapixels', '?')} MP, mean {ps.get('mean_mb', '?')} MB)"


def _reachable_note(a: dict, goal: float) -> str:
    """The accounting part's reachable ratio: what any whole process adds to the bound."""
    rounds = a["rounds"]

    def spread(key, fmt="{:.3f}"):
        # statistics.median, as the JSON's *_median keys (numpy's): the two agree on an even count
        values = sorted(r[key] for r in rounds)
        return statistics.median(values), f"from {fmt.format(values[0])} to {fmt.format(values[-1])}", values

    floor, _, _ = spread("startup_floor_s")
    work, _, _ = spread("command_work_core_s")
    reachable, reachable_range, _ = spread("ratio_reachable")
    interleave, interleave_range, values = spread("interleave_core_s", "{:+.2f}")
    to_reachable, to_reachable_range, _ = spread("ratio_to_reachable")
    below = sum(r["ratio_reachable"] < goal for r in rounds)
    return (f" What any whole process adds to the bound, measured in each round (medians): starting "
            f"(Python, numpy, onnxruntime, the model, and the exit) {secs(floor)}, and walking the folder and "
            f"writing a row a file {work:.2f} core-s, which adds to the wall on busy cores. So a whole process "
            f"can reach at most {reachable:.3f} of the bound (median; {reachable_range}): the goal's {goal:g} "
            f"is above that in {below} of {plural(len(rounds), 'round')}. cnnx classify reaches {to_reachable:.3f} "
            f"of that (median; {to_reachable_range}). Decoding a batch and then running the model on it, on one "
            f"core, against doing each for all the files apart (as the bound measures them): {interleave:+.2f} "
            f"core-s (median; {interleave_range}"
            + ("; both signs, so not established on this host)." if values[0] < 0 < values[-1] else ").")
            + (_run_extra_note(rounds) if all("run_extra_share" in r["interleave"] for r in rounds) else ""))


def _run_extra_note(rounds) -> str:
    """The model's runs alone (thread CPU) after a decode, against back to back."""
    shares = sorted(r["interleave"]["run_extra_share"] for r in rounds)
    more = sum(s > 0 for s in shares)
    return (f" The model's runs alone, when each follows its batch's decoding against all of them back to back: "
            f"{statistics.median(shares):+.1%} CPU (median; from {shares[0]:+.1%} to {shares[-1]:+.1%}; more in "
            f"{more} of {plural(len(shares), 'round')}).")


def block_classify(res: Results) -> str:
    d = res.get("bench_classify.json")
    if d is None:
        return not_measured(res, ["bench_classify.json"])
    goals, rows = d["goals"], []
    for key in ("cifar", "photos"):
        c = d.get(key)
        if c is None:
            continue
        rows.append([classify_set(d, key), f"{num(c['per_image_baseline_images_per_s'])} img/s",
                     f"{num(c['batched_baseline_images_per_s'])} img/s", f"{num(c['cnnx_classify_images_per_s'])} img/s",
                     ratio(c["speedup_vs_per_image"]), ratio(c["speedup_vs_batched"])])
    out = [table(["set", "per-image loop", "batched loop", "cnnx classify", "vs per-image", "vs batched"],
                 rows, "lrrrrr")] if rows else []
    if rows:  # a part of its own, often of another tree than the bound below
        m = measured(d, "baselines")
        out.append(para(f"The table: the baselines (information) and cnnx classify interleaved, best of each, batch "
                        f"{d['batch_size']}, at `{m['git_commit'][:7]}`; {source('bench_classify.json', m)}."))
    notes = []
    if m := d.get("memory"):
        limit = goals["memory_50k_vs_5k_max_ratio"]
        notes.append(f"Peak memory (VmHWM summed over the classify process and its decode processes): "
                     f"{m['files_50k_peak_rss_mib']:.1f} MiB for "
                     f"{num(m['files_50k'])} files vs {m['files_5k_peak_rss_mib']:.1f} MiB for {num(m['files_5k'])} "
                     f"(ratio {m['ratio']:.3f}; goal <= {limit:g}: {met(m['ratio'] <= limit)}).")
    notes.append(f"Start-up to the first prediction row: {secs(d['first_batch_latency_s'])} (best of 3).")
    if b := d.get("bound"):
        goal = goals["cpu_bound_ratio_min"]
        notes.append(f"CPU bound ({num(b['files'])} CIFAR JPEGs, batch {b['batch_size']}, best of "
                     f"{len(b['rounds'])} interleaved rounds): onnxruntime alone on ready uint8 batches "
                     f"{secs(b['ort_only_s'])} ({b['ort_only_how']}) + single-core "
                     f"`load_image` {secs(b['decode_one_core_s'])} / {b['cores']} cores = {secs(b['bound_s'])}; "
                     f"cnnx classify {secs(b['classify_process_s'])} as a process ({b['ratio_process']:.2f} of the "
                     f"bound), {secs(b['classify_summary_s'])} by its summary line ({b['ratio_summary']:.2f}); "
                     f"goal >= {goal:g}: {met(b['ratio_process'] >= goal)}."
                     + (f" Each round's own ratio (its bound over its classify): median "
                        f"{b['ratio_same_round_median']:.2f}, best {b['ratio_same_round_best']:.2f}. The least a "
                        f"process needs to start (Python, numpy, onnxruntime, the model), which the bound leaves "
                        f"out: {secs(b['startup_floor_s'])}, so start-up alone lets a whole process reach at most "
                        f"{b['ratio_reachable_by_a_process']:.2f} of the bound on these files."
                        if "startup_floor_s" in b else "")
                     + (f" Timed while the benchmark polls its memory (/proc, 100 times a second, as this figure was "
                        f"timed before): {secs(b['classify_process_memory_polled_s'])} "
                        f"({b['ratio_process_memory_polled']:.2f})." if "classify_process_memory_polled_s" in b else "")
                     + (f" With `--decode threads` in the same rounds: {secs(b['classify_decode_threads_process_s'])} "
                        f"({b['ratio_process_decode_threads']:.2f})." if "classify_decode_threads_process_s" in b else ""))
    if a := d.get("accounting"):
        r, k = a["median_round"], a["cores"]
        notes.append(f"Where a whole process's time beyond the bound goes, in core-seconds, the median of "
                     f"{len(a['rounds'])} rounds each against its own bound ({code(measured(d, 'accounting')['command'])}): "
                     f"{k} cores x {secs(r['wall_s'])} = the bound's work {r['bound_work_core_s']:.2f} "
                     f"({r['ratio']:.2f} of the wall) + CPU beyond it {r['extra_cpu_core_s']:.2f} (the command "
                     f"itself used {r['main_cpu_s']:.2f}, the processes it started {r['others_cpu_s']:.2f}) + idle "
                     f"cores {r['idle_core_s']:.2f}."
                     + (_reachable_note(a, goals["cpu_bound_ratio_min"]) if "ratio_reachable_median" in a else ""))
    if w := d.get("writers"):
        each = [f"{fmt.upper()} top-{k} {w[f'{fmt}_top{k}']['cnnx_us_per_row']:.2f} µs "
                f"({w[f'{fmt}_top{k}']['reference_us_per_row']:.2f} µs, {ratio(w[f'{fmt}_top{k}']['speedup'])})"
                for fmt in ("csv", "jsonl") for k in (1, 5)]
        notes.append(f"Writing the prediction rows, one-core time a row over {num(w['rows'])} rows in batches of "
                     f"{w['batch_size']}, median of {w['rounds']} rounds, against the same bytes written a row at a "
                     f"time by `csv.writer` or `json.dumps` ({code(measured(d, 'writers')['command'])}): "
                     + "; ".join(each) + ". On a GPU machine the command's one process writes every row.")
    for name in ("classify_cpu_by_process.json", "classify_cpu_by_process_500k.json",
                 "classify_cpu_by_process_small_jobs.json"):
        if c := res.get(name):
            trees = list(c["trees"].values())
            by_tree = [f"`{t['git_commit'][:7]}`: the command {secs(t['median']['cpu_command_s'])}, the decode "
                       f"processes {secs(t['median']['cpu_decode_processes_s'])}, the forkserver "
                       f"{secs(t['median']['cpu_forkserver_s'])} ({secs(t['median']['wall_s'])} wall)" for t in trees]
            notes.append(f"CPU seconds by process of `cnnx classify` on {num(c['files'])} CIFAR JPEGs"
                         f"{' (10 hard-linked copies)' if c['files'] > 50_000 else ''}, median of "
                         f"{len(trees[0]['rounds'])} interleaved rounds ({code(c['command'])}): " + "; ".join(by_tree)
                         + ". On 2 cores what the command spends on its own is taken from the decode processes; on "
                         "a GPU machine the command's own work per file bounds the steady state.")
    if c := res.get("decode_by_tree.json"):
        trees = list(c["trees"].values())
        by_tree = [f"`{t['git_commit'][:7]}` {t['median_us_per_file']:.1f} µs"
                   + (f" ({t['ratio_to_first_median']:.3f} of the first, median of the rounds' own ratios)" if i else "")
                   for i, t in enumerate(trees)]
        notes.append(f"The decoders' own loop (`decode_into`: read, decode, write the batch's rows), one-core CPU a "
                     f"file over {num(c['files'])} CIFAR JPEGs, median of {len(trees[0]['rounds'])} interleaved "
                     f"rounds ({code(c['command'])}): " + "; ".join(by_tree) + ".")
    if c := res.get("classify_startup.json"):
        by_tree = [f"`{t['git_commit'][:7]}`: one JPEG {secs(t['median']['one_file_s'])} (first batch after "
                   f"{secs(t['median']['first_batch_s'])}), 50,000 {secs(t['median']['cifar_s'])}, of which "
                   f"{secs(t['median']['exit_s'])} after the summary line; the --device cuda package check "
                   f"{secs(t['median']['ort_distributions_s'])}"
                   + (f"; the Python API's `Classifier(...).classify([one JPEG])` as a whole process "
                      f"{secs(t['median']['api_one_file_s'])}" if "api_one_file_s" in t["median"] else "")
                   for t in c["trees"].values()]
        notes.append(f"A whole `cnnx classify` process around its images, median of "
                     f"{len(next(iter(c['trees'].values()))['rounds'])} interleaved rounds ({code(c['command'])}): "
                     + "; ".join(by_tree) + ".")
    if c := res.get("small_jobs.json"):
        from cnnx.runtime.workers import PROCESS_DECODE_MIN_FILES

        by_files = [f"{num(r['files'])} {'file' if r['files'] == 1 else 'files'}: threads {secs(r['threads_median_s'])}, processes "
                    f"{secs(r['processes_median_s'])}, auto {secs(r['auto_median_s'])}" for r in c["by_files"]]
        first = c["processes_first_faster_at_files"]
        notes.append(f"`cnnx classify` of small folders (the first N CIFAR JPEGs) by `--decode` mode, whole "
                     f"processes, median of {c['rounds']} interleaved rounds ({code(c['command'])}): "
                     + "; ".join(by_files) + ". "
                     + (f"Processes first finish before threads at {num(first)} files"
                        if first else "Processes finished before threads at none of these counts")
                     + f"; `--decode auto` takes threads up to {num(PROCESS_DECODE_MIN_FILES)} files to decode.")
    if c := res.get("ort_ops.json"):
        g = c["group_share"]
        ops = collections.Counter()
        for n in c["nodes"]:
            if n["group"] == "input":
                ops[n["op"]] += n["share"]
        notes.append(f"The model's own time by operator, as a decode process runs it (one thread, {c['rows']} "
                     f"images a run, onnxruntime's profiler over {c['runs']} runs, {code(c['command'])}): "
                     f"convolutions and pooling {pct(g['convolution'])}, dense layers {pct(g['dense'])}, the "
                     f"blocked-layout reorders {pct(g['layout'])}, the input made float and normalized in the "
                     f"graph {pct(g['input'])} ("
                     + ", ".join(f"{op} {pct(share)}" for op, share in ops.most_common()) + "). So a channels-last "
                     f"input, or the normalization folded into the first convolution, could take at most "
                     f"{pct(g['input'])} off the bound's onnxruntime part (and the fold is not exact where that "
                     "convolution pads with zeros, which stand for other pixels before the normalization); the "
                     "rest is the layers' arithmetic.")
    if c := res.get("classify_worker_rows.json"):
        by_tree = [f"`{t['git_commit'][:7]}`{' ' + spec.split('::', 1)[1] if '::' in spec else ''}: "
                   f"{secs(t['best']['cifar_s'])} best, {secs(t['median']['cifar_s'])} median"
                   for spec, t in c["trees"].items()]
        notes.append(f"Decode processes running their batches 64 images a run against whole-batch runs, `cnnx "
                     f"classify` of the 50,000 CIFAR JPEGs as a whole process, "
                     f"{len(next(iter(c['trees'].values()))['rounds'])} interleaved rounds ({code(c['command'])}): "
                     + "; ".join(by_tree) + ".")
    agree = [f"{pct(d[key]['top1_agreement_with_batched_baseline'])} on {label}"
             for key, label in (("cifar", "CIFAR"), ("photos", "the photos")) if key in d]
    if agree:
        notes.append("Top-1 agreement with the baseline's Pillow full-size decode: " + ", ".join(agree) + ".")
    if dec := d.get("decode_only"):
        parts = []
        for name, rates in dec.items():
            subset, n = name.rsplit("_", 1)
            parts.append(f"{subset} ({num(int(n))} files) " + " -> ".join(num(v) for v in rates.values()) + " img/s")
        notes.append("Decoding only (`load_image`, 1 -> 2 threads): " + "; ".join(parts) + ".")
    cuda = d.get("cuda")
    if isinstance(cuda, str):
        notes.append(f"CUDA: {cuda}.")
    elif cuda:
        notes.append("CUDA: " + "; ".join(f"{k} {num(v['images_per_s'])} img/s" for k, v in cuda.items()) + ".")
    out.append(bullets(notes))
    out.append(para(f"Source of the bound, the memory and the start-up: "
                    f"{source('bench_classify.json', measured(d, 'bound') if 'bound' in d else d)}."))
    return "\n\n".join(out)


def block_report(res: Results) -> str:
    d = res.get("bench_report.json")
    if d is None:
        return not_measured(res, ["bench_report.json"])
    sm = d["summary"]
    # the default run's epoch as recipe_airnet.json holds it now (bench_report.json keeps the copy it was run against)
    air, kept = res.get("recipe_airnet.json"), d["default_run"]
    wall, epochs = (air["run"]["wall_seconds"], len(air["run"]["history"])) if air else (kept["wall_seconds"],
                                                                                          kept["epochs"])
    epoch_s = wall / epochs
    share = sm["report_seconds_per_epoch"] / epoch_s
    return "\n\n".join([bullets([
        f"Writing report.html after every epoch: {secs(sm['report_seconds_per_epoch'])} per epoch for "
        f"{num(d['setup']['val_images'])} validation images and {d['setup']['classes']} classes, "
        f"**{share:.2%}** of a default `cnnx train` epoch's wall time ({secs(epoch_s)}: "
        f"{secs(wall)} over {plural(epochs, 'epoch')}, from "
        f"`benchmarks/results/recipe_airnet.json`); goal <= {REPORT_SHARE:.0%}: {met(share <= REPORT_SHARE)}.",
        f"Page sizes: training {sm['training_report_bytes'] / 1e3:,.0f} kB; a classify job of "
        f"{num(d['classify_report']['predictions'])} predictions {sm['classify_report_bytes_50k'] / 1e3:,.0f} kB "
        f"(written in {secs(d['classify_report']['seconds'])}).",
    ]), para(f"Source: {source('bench_report.json', d)}.")])


def block_ray(res: Results) -> str:
    d = res.get("bench_ray.json")
    if d is None:
        return not_measured(res, ["bench_ray.json"])
    local, ray, m = d["local"], d["ray"], d["marginal"]
    rows = [[f"{num(m['ray']['images_full'] - m['ray']['images_half'])} more files (once up: fixed costs out)",
             f"{num(m['local']['images_per_s'])} img/s", f"{num(m['ray']['images_per_s'])} img/s",
             f"**{ratio(d['ray_marginal_vs_local'])}**",
             f">= {goal_ratio(RAY_VS_LOCAL)}: {met(d['ray_marginal_vs_local'] >= RAY_VS_LOCAL)}"],
            [f"whole runs on {num(d['images'])} files (Ray from ray.init returned)",
             f"{num(local['images_per_s'])} img/s", f"{num(ray['images_per_s'])} img/s",
             ratio(d["ray_vs_local"]), "(start-up included)"]]
    return "\n\n".join([
        table(["CIFAR-10 JPEGs", "local pipeline", "--engine ray", "ray vs local", "goal"], rows, "lrrrl"),
        para(f"Ray's fixed cost on this machine: {secs(d['ray_fixed_s'])} (ray.init {secs(d['ray_startup_s'])}, then "
             f"the actor pool, model loading and the first blocks). The marginal rate is ({num(m['ray']['images_full'])} - "
             f"{num(m['ray']['images_half'])}) files over the extra seconds the full folder takes over its "
             f"{num(m['ray']['images_half'])}-file half, best of "
             f"{len(d['rounds']['local'])} interleaved rounds each. Same labels for every file: "
             f"{'yes' if d['same_labels'] else '**no**'}. Batch {d['batch_size']}, {d['cores']} cores. "
             f"Source: {source('bench_ray.json', d)}."),
    ])


def block_transfer(res: Results) -> str:
    notes = []
    if d := res.get("bench_transfer.json"):
        runs = "; ".join(f"seed {s['seed']}: **{pct(s['finetune']['best_val_top1'])}** vs "
                         f"{pct(s['scratch']['best_val_top1'])} ({s['gain_points']:+.1f})" for s in d["seeds"])
        notes.append(
            f"Transfer beats scratch: `{d['arch']}` pretrained on {num(d['pretrain_images'])} animal images "
            f"({pct(d['pretrain']['best_val_top1'])} val), then trained on {num(d['finetune_train_images'])} vehicle "
            f"images, with `--weights` vs from scratch ({num(d['val_images'])} val images): {runs}. Median gain "
            f"**{d['gain_points_median']:+.1f} points**; goal >= +{TRANSFER_GAIN_PT:g}: "
            f"{met(d['gain_points_median'] >= TRANSFER_GAIN_PT)} ({d['note']}). "
            + (f"The same fine-tunes with the ImageNet archs' settings (`{d['imagenet_recipe_flags']}`): "
               + "; ".join(f"seed {s['seed']}: {pct(s['finetune_imagenet_recipe']['best_val_top1'])} "
                           f"({s['imagenet_recipe_gain_points']:+.1f})" for s in d["seeds"])
               + f", median {d['imagenet_recipe_gain_points_median']:+.1f} points. "
               if "imagenet_recipe_gain_points_median" in d else "")
            + f"Source: {source('bench_transfer.json', d)}.")
    if d := res.get("bench_bigdata.json"):
        b, sp, dec = d["beyond-memory"], d["speed"], d["decode"]
        notes.append(
            f"Beyond memory: {num(b['images_big'])} images at {b['side']} px (a {b['decoded_cache_bytes_big'] / 1e9:.2f} GB "
            f"decoded cache, {b['cache_over_limit']:.1f}x the {b['memory_limit_bytes'] / 2**20:.0f} MiB cgroup limit) "
            f"trained; peak anonymous memory **{b['peak_anon_ratio_big_over_small']:.2f}x** that of "
            f"{num(b['images_small'])} images (goal <= {BIGDATA_ANON_RATIO:g}x: "
            f"{met(b['peak_anon_ratio_big_over_small'] <= BIGDATA_ANON_RATIO)}).")
        notes.append(
            f"Disk cache (in the page cache) vs in memory: **{sp['disk_over_memory']:.2f}x** "
            f"({num(sp['epoch2_img_per_s_disk'])} vs {num(sp['epoch2_img_per_s_memory'])} img/s; goal >= "
            f"{DISK_VS_MEMORY:g}x: {met(sp['disk_over_memory'] >= DISK_VS_MEMORY)}). Decoding {num(dec['images'])} "
            f"{dec['source_side']} px JPEGs into the cache: **{dec['build_over_ceiling']:.3f}x** the decode ceiling of "
            f"{dec['processes']} processes ({num(dec['cache_build_img_per_s'])} vs {num(dec['decode_only_img_per_s'])} "
            f"img/s; goal >= {CACHE_BUILD_VS_DECODE:g}x: {met(dec['build_over_ceiling'] >= CACHE_BUILD_VS_DECODE)}). "
            f"{d['note'][:1].upper()}{d['note'][1:]}. Source: {source('bench_bigdata.json', d)}.")
    missing = not_measured(res, ["bench_transfer.json", "bench_bigdata.json"])
    return "\n\n".join(x for x in (bullets(notes) if notes else "", missing) if x)


BLOCKS = {
    "results": block_results,
    "gpu": block_gpu,
    "train-throughput": block_train_throughput,
    "recipes": block_recipes,
    "training-speed": block_training_speed,
    "export": block_export,
    "classify": block_classify,
    "report": block_report,
    "ray": block_ray,
    "transfer": block_transfer,
}


def render(readme_text: str, results: Path) -> str:
    """readme_text with every figures block regenerated from the JSONs in `results`."""
    res = Results(results)
    found = set()

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise FiguresError(f"README block figures:{name} has no generator (known: {', '.join(BLOCKS)})")
        found.add(name)
        return m.group(1) + BLOCKS[name](res).rstrip() + "\n" + m.group(4)

    text = BLOCK.sub(fill, readme_text)
    if missing := [n for n in BLOCKS if n not in found]:
        raise FiguresError(f"README has no figures block for: {', '.join(missing)}")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the README differs from what would be written")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    try:
        old = a.readme.read_text()
        new = render(old, a.results)
    except (OSError, FiguresError, KeyError) as e:
        print(f"Error: {e if not isinstance(e, KeyError) else f'a results JSON lacks the field {e}'}",
              file=sys.stderr)
        return 1
    if a.check:
        if new == old:
            return 0
        sys.stderr.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(a.readme),
                                                   "generated"))
        print(f"{a.readme} differs from its results: run python benchmarks/readme_figures.py", file=sys.stderr)
        return 1
    if new != old:
        from cnnx.runtime.files import atomic_write

        atomic_write(a.readme, new, keep_mode_of_target=True)
        print(f"updated {a.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
