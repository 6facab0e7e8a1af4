"""Bring one GPU run of gpu_classify.py into benchmarks/results/ under names that carry the commit
whose files ran (the JSON's tree_commit, else git_commit), then write the README's figures again:

    python benchmarks/gpu_collect.py FILES_AT/results

  gpu_classify.json              -> gpu_steady_state_<commit7>.json
  profile_<stage>.txt (py-spy)   -> gpu_profile_<stage without _fp32>_<commit7>.txt, and every
                                    "file" field of the JSON that named it renamed to match
                                    (profile_airnet_fp32.txt -> gpu_profile_airnet_<commit7>.txt)

An existing file of the same name is never overwritten (exit 1: the run was collected already,
or two runs measured one commit: --suffix=-2 tells them apart). --dest: another folder;
--no-readme: leave the README as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS  # noqa: E402

RUN_JSON = "gpu_classify.json"


def profile_name(name: str, commit7: str) -> str:
    """profile_airnet_fp32.txt -> gpu_profile_airnet_<commit7>.txt (the names earlier runs kept)."""
    stem = Path(name).stem.replace("_fp32", "")
    return f"gpu_{stem}_{commit7}.txt"


def _renamed(value, names: dict):
    """The JSON with every {"file": old} among `names` renamed, at any depth."""
    if isinstance(value, dict):
        return {k: (names.get(v, v) if k == "file" and isinstance(v, str) else _renamed(v, names))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


def collect(run_dir: Path, dest: Path, suffix: str = "") -> list[Path]:
    """Copy one run's JSON and profiles into `dest` under their commit's names -> the paths
    written. FileExistsError before anything is written when one of them is there already."""
    from cnnx.runtime.files import atomic_write

    doc = json.loads((run_dir / RUN_JSON).read_text())
    commit = doc.get("tree_commit") or doc.get("git_commit")
    if not commit:
        raise ValueError(f"{run_dir / RUN_JSON} names no commit (tree_commit or git_commit)")
    tag = commit[:7] + suffix
    profiles = sorted(run_dir.glob("profile_*.txt"))
    names = {p.name: profile_name(p.name, tag) for p in profiles}
    targets = [dest / f"gpu_steady_state_{tag}.json", *(dest / names[p.name] for p in profiles)]
    there = [str(t) for t in targets if t.exists()]
    if there:
        raise FileExistsError(f"already there: {', '.join(there)}")
    dest.mkdir(parents=True, exist_ok=True)
    for p in profiles:
        atomic_write(dest / names[p.name], p.read_text())
    atomic_write(targets[0], json.dumps(_renamed(doc, names), indent=2) + "\n")
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help=f"the folder holding the run's {RUN_JSON} (files_at/results)")
    ap.add_argument("--dest", type=Path, default=RESULTS)
    ap.add_argument("--suffix", default="", help="added to the commit in the names (a second run of one commit)")
    ap.add_argument("--no-readme", action="store_true", help="do not write the README's figures again")
    a = ap.parse_args(argv)
    try:
        written = collect(a.run_dir, a.dest, a.suffix)
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if a.no_readme:
        return 0
    import readme_figures

    return readme_figures.main([])


if __name__ == "__main__":
    sys.exit(main())
