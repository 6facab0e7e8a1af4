"""What the HTML report costs a default `cnnx train` run (goal: <= 2% of its wall time).

`cnnx train` rewrites runs/<name>/report.html after every epoch. This measures
write_training_report for the default CIFAR-10 run's shape: 10 classes, the 5,000-image
validation split (real CIFAR-10 JPEGs decoded by the runtime's load_image), and the history
growing from 1 to 17 epochs (the default recipe's length), each call a complete atomic write.
The per-epoch time of the default run is read from benchmarks/results/recipe_airnet.json
(`cnnx train` itself, measured under the CPU lock), not re-measured here.

The validation probabilities are drawn to give the default run's accuracy (~88.6% top-1,
confident mostly right, some confident mistakes): what the page does with them (one argmax,
two sorts, 48 thumbnails) does not depend on which model produced them.

Also recorded: the page of a 50,000-image classify job (`cnnx classify --report`), read back
from a predictions CSV over the real JPEGs, and both pages' sizes.

    flock /tmp/cnnx-cpu.lock python benchmarks/bench_report.py [--cifar DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, write_result  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

GOAL_SHARE = 0.02
EPOCHS = 17
VAL_PER_CLASS = 500
VAL_TOP1 = 0.886


def val_split(cifar: Path):
    from cnnx.runtime.preprocess import load_image, make_spec

    spec = make_spec(32, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))
    classes = sorted(p.name for p in cifar.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((cifar / name).iterdir())[-VAL_PER_CLASS:]
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    images = np.stack([load_image(p, spec)[0] for p in paths])
    return classes, images, np.asarray(labels, np.int64), paths, spec


def probabilities(labels, num_classes: int, seed: int = 0):
    """Softmax rows with ~VAL_TOP1 top-1: logits of noise plus a margin for the true class."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (len(labels), num_classes))
    logits[np.arange(len(labels)), labels] += rng.normal(4.05, 1.8, len(labels))
    logits *= 1.6
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def history_rows(num_classes: int) -> list:
    """17 rows with the keys cnnx.train.run writes (values shaped like the default run's)."""
    rows, total = [], 0.0
    for e in range(1, EPOCHS + 1):
        f = e / EPOCHS
        total += 29.3
        rows.append({"epoch": e, "lr": 0.4 * min(1, f / 0.2) * (1 - f), "train_loss": 2.0 - 1.1 * f,
                     "train_top1": 0.33 + 0.6 * f, "train_top5": 0.8 + 0.19 * f, "val_loss": 1.46 - 0.92 * f,
                     "val_top1": 0.47 + 0.41 * f, "val_top5": 0.9 + 0.09 * f, "seconds": 29.3, "eval_seconds": 4.3,
                     "train_seconds_total": total, "train_per_class": [0.33 + 0.6 * f] * num_classes,
                     "val_per_class": [0.47 + 0.41 * f] * num_classes})
    return rows


def default_run_epoch_seconds() -> dict:
    """Per-epoch seconds of the recorded default `cnnx train` run (recipe_airnet.json)."""
    doc = json.loads((RESULTS / "recipe_airnet.json").read_text())
    run = doc["run"]
    hist = run["history"]
    epochs = len(hist)
    train = hist[-1]["train_seconds"]  # cumulative training seconds
    evals = sum(r["eval_seconds"] for r in hist)
    return {"source": "benchmarks/results/recipe_airnet.json", "source_command": doc.get("command"),
            "epochs": epochs, "wall_seconds": run["wall_seconds"],
            "wall_seconds_per_epoch": run["wall_seconds"] / epochs,
            "train_plus_eval_seconds_per_epoch": (train + evals) / epochs}


def time_training_reports(folder: Path, classes, images, labels, paths, probs, rounds: int) -> dict:
    from cnnx.report import Predictions, write_training_report

    confusion = np.zeros((len(classes),) * 2, np.int64)
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    history = history_rows(len(classes))
    val = Predictions(images=images, labels=labels, probs=probs, paths=paths)
    config = {"arch": "airnet", "data": "cifar10", "epochs": EPOCHS, "num_classes": len(classes),
              "class_names": classes, "train_images": 45000, "val_images": len(labels)}
    out = folder / "report.html"
    per_round = []
    for _ in range(rounds):
        calls = []
        for e in range(1, EPOCHS + 1):
            t = time.perf_counter()
            write_training_report(out, title="bench", config=config, history=history[:e], class_names=classes,
                                  confusion=confusion.tolist(), val=val, summary={"best_epoch": e})
            calls.append(time.perf_counter() - t)
        per_round.append(calls)
    per_call = [c for calls in per_round for c in calls]
    return {"rounds": rounds, "calls_per_round": EPOCHS,
            "seconds_per_call_median": statistics.median(per_call), "seconds_per_call_max": max(per_call),
            "seconds_per_run_median": statistics.median(sum(c) for c in per_round),
            "report_bytes": out.stat().st_size,
            "val_top1_of_the_drawn_probabilities": float((probs.argmax(1) == labels).mean())}


def time_classify_report(folder: Path, cifar: Path, classes, spec) -> dict:
    from cnnx.report import write_classify_report
    from cnnx.runtime.output import PredictionWriter

    files = sorted(str(p) for p in cifar.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    out = folder / "pred.csv"
    writer = PredictionWriter(str(out), "csv", classes, 5)
    for start in range(0, len(files), 5000):
        chunk = files[start:start + 5000]
        probs = probabilities(rng.integers(0, len(classes), len(chunk)), len(classes), seed=start)
        idx = np.argsort(-probs, axis=1)[:, :5]
        writer.write_batch(chunk, idx, np.take_along_axis(probs, idx, 1))
    writer.close()
    page = folder / "classify.html"
    t = time.perf_counter()
    write_classify_report(page, output=str(out), fmt="csv", errors=None, class_names=classes, spec=spec)
    return {"predictions": len(files), "seconds": time.perf_counter() - t, "report_bytes": page.stat().st_size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cifar", help="CIFAR-10 JPEG folder (DIR/<class>/*.jpg); default: see cifar_jpegs.py")
    ap.add_argument("--rounds", type=int, default=3, help="times the 17-epoch sequence of reports is written")
    ap.add_argument("--results", type=Path, default=RESULTS / "bench_report.json")
    args = ap.parse_args(argv)
    cifar = cifar_folder(args.cifar)
    classes, images, labels, paths, spec = val_split(cifar)
    probs = probabilities(labels, len(classes))
    run = default_run_epoch_seconds()
    with tempfile.TemporaryDirectory(prefix="cnnx-bench-report-") as tmp:
        training = time_training_reports(Path(tmp), classes, images, labels, paths, probs, args.rounds)
        classify = time_classify_report(Path(tmp), cifar, classes, spec)
    per_epoch = training["seconds_per_call_median"]
    share = per_epoch / run["wall_seconds_per_epoch"]
    summary = {
        "report_seconds_per_epoch": round(per_epoch, 4),
        "default_run_wall_seconds_per_epoch": round(run["wall_seconds_per_epoch"], 2),
        "share_of_wall_time": round(share, 5),
        "share_of_train_plus_eval_time": round(per_epoch / run["train_plus_eval_seconds_per_epoch"], 5),
        "goal_share": GOAL_SHARE,
        "met": share <= GOAL_SHARE,
        "training_report_bytes": training["report_bytes"],
        "classify_report_bytes_50k": classify["report_bytes"],
    }
    write_result(args.results, {"summary": summary, "training_report": training, "default_run": run,
                                "classify_report": classify,
                                "setup": {"classes": len(classes), "val_images": len(labels), "epochs": EPOCHS}})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
