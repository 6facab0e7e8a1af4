"""One-core CPU time a file of the decoders' own loop (`pipeline.decode_into`: read, decode,
write into a batch's rows, as the decode processes and threads run it) for versions of cnnx
side by side, in interleaved rounds: a change to decoding moves this figure, where a whole
`cnnx classify` on a 2-core machine whose speed varies from moment to moment does not show it.

    python benchmarks/decode_by_tree.py --tree /tmp/base --tree . --rounds 7

A tree is a checkout of this repository (git worktree add /tmp/base <commit>). Each round runs
each tree in a fresh Python: every 5th CIFAR-10 JPEG (10,000 files, the page cache warm),
decoded in batches of 256 at the seed-cnn's 32 px, the least of 3 passes (process CPU time).
Writes benchmarks/results/decode_by_tree.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import git_commit, tree_arguments, tree_env, write_result  # noqa: E402
from bench_classify import log  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

EVERY = 5
PASSES = 3

# Run in the tree's own Python: its cnnx, nothing of this process's imports.
ONE_TREE = f"""
import json, sys, time
import numpy as np
from cnnx.runtime.pipeline import decode_into
from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS, make_spec
from pathlib import Path
files = sorted(str(p) for p in Path(sys.argv[1]).rglob("*.jpg"))[::{EVERY}]
spec = make_spec(32, (0.5,) * 3, (0.25,) * 3)
rows = np.zeros((256, 3, 32, 32), np.uint8)
best = None
for _ in range({PASSES}):
    t0 = time.process_time()
    for i in range(0, len(files), 256):
        ok, failed, _notes = decode_into(files[i:i + 256], spec, DEFAULT_MAX_PIXELS, rows)
        assert not failed, failed
    spent = time.process_time() - t0
    best = spent if best is None else min(best, spent)
print(json.dumps({{"files": len(files), "us_per_file": round(best / len(files) * 1e6, 3)}}))
"""


def run_once(tree: Path, cifar: Path) -> dict:
    # cwd: `python -c` puts the current folder first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", ONE_TREE, str(cifar)], env=tree_env(tree), cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None):
    args = tree_arguments(__doc__.split("\n")[0], 7, "decode_by_tree.json").parse_args(argv)
    cifar = cifar_folder(args.cifar)
    trees = [t.resolve() for t in args.tree]
    runs = {str(t): [] for t in trees}
    for r in range(args.rounds):
        for t in (trees if r % 2 == 0 else trees[::-1]):  # neither tree always runs first
            runs[str(t)].append(run_once(t, cifar))
            log(f"round {r + 1}/{args.rounds} {t}: {runs[str(t)][-1]}")
    first = runs[str(trees[0])]
    summary = {str(t): {"git_commit": git_commit(t), "rounds": runs[str(t)],
                        "median_us_per_file": round(statistics.median(x["us_per_file"] for x in runs[str(t)]), 3),
                        # each round's figure over the first tree's in the same round
                        "ratio_to_first_by_round": [round(x["us_per_file"] / f["us_per_file"], 3)
                                                    for x, f in zip(runs[str(t)], first)]}
               for t in trees}
    for s in summary.values():
        s["ratio_to_first_median"] = round(statistics.median(s["ratio_to_first_by_round"]), 3)
    write_result(args.out, {"files": first[0]["files"], "passes": PASSES, "trees": summary},
                 None if argv is None else [__file__, *argv])


if __name__ == "__main__":
    main()
