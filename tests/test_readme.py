"""The README's figures are the results JSONs' (benchmarks/readme_figures.py), and it stands alone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
GENERATOR = ROOT / "benchmarks" / "readme_figures.py"
RESULT_FILES = sorted(RESULTS.glob("*.json"))


def figures(*args, readme=README, results=RESULTS):
    return subprocess.run([sys.executable, str(GENERATOR), "--readme", str(readme), "--results", str(results), *args],
                          capture_output=True, text=True, timeout=120)


def results_block(text: str) -> str:
    return re.search(r"<!-- figures:results:begin.*?<!-- figures:results:end -->", text, re.S).group(0)


def row_of(block: str, start: str) -> str:
    rows = [line for line in block.splitlines() if line.startswith("| " + start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


@pytest.fixture
def copies(tmp_path):
    """A copy of README.md and of benchmarks/results/ to change freely."""
    readme = tmp_path / "README.md"
    shutil.copyfile(README, readme)
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    return readme, results


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_readme_figures_are_what_the_results_generate():
    p = figures("--check")
    assert p.returncode == 0, p.stderr[-3000:] + "\nrun: python benchmarks/readme_figures.py"


def test_check_fails_on_a_figure_typed_by_hand(copies):
    readme, results = copies
    text = readme.read_text()
    block = results_block(text)
    first_row = block.splitlines()[3]
    readme.write_text(text.replace(first_row, first_row.replace("|", "| 99.99% |", 2).replace("| 99.99% |", "|", 1)))
    p = figures("--check", readme=readme, results=results)
    assert p.returncode == 1
    assert "99.99%" in p.stderr  # the diff shows the hand-typed figure


def test_met_is_computed_from_the_json(copies):
    readme, results = copies
    goal = json.loads((results / "bench_classify.json").read_text())["goals"]["cpu_bound_ratio_min"]
    for value, verdict in ((goal + 0.03, "| met |"), (goal - 0.2, "| **not met** |")):
        edit_json(results / "bench_classify.json", lambda d: d["bound"].update(ratio_process=value))
        assert figures(readme=readme, results=results).returncode == 0
        row = row_of(results_block(readme.read_text()), "`cnnx classify --topk 1`, 50,000 CIFAR")
        assert f"**{value:.2f}**" in row and verdict in row, row


def test_a_missing_result_is_dropped_and_its_command_named(copies):
    readme, results = copies
    (results / "recipe_seed_cnn.json").unlink()
    assert figures(readme=readme, results=results).returncode == 0
    block = results_block(readme.read_text())
    assert "`seed-cnn` (the tutorial net)" not in block
    assert "no `results/recipe_seed_cnn.json`" in block and "`python benchmarks/recipe_seed_cnn.py`" in block


def test_a_gpu_run_without_its_steady_state_stage_keeps_the_figures_made(copies):
    """A run cut by its budget before the steady state (or without it in --stages), once
    collected, failed every later figures run: 'a results JSON lacks the field ...'."""
    readme, results = copies
    runs = sorted(results.glob("gpu_steady_state_*.json"))
    cut = results / "gpu_steady_state_0000000.json"
    shutil.copyfile(runs[-1], cut)
    edit_json(cut, lambda doc: doc.pop("steady_state_airnet_fp32"))
    p = figures(readme=readme, results=results)
    assert p.returncode == 0, p.stderr[-2000:]
    steady = [line for line in readme.read_text().splitlines() if line.startswith("| steady state by version")]
    assert len(steady) == len(runs) and not any("gpu_steady_state_0000000" in line for line in steady)


def test_a_result_from_an_older_recipe_says_so(copies):
    readme, results = copies
    doc = json.loads((results / "recipe_seed_cnn.json").read_text())
    epochs = doc["runs"]["recipe"]["config"]["epochs"]
    edit_json(results / "recipe_seed_cnn.json", lambda d: d["runs"]["recipe"]["config"].update(epochs=epochs + 5))
    assert figures(readme=readme, results=results).returncode == 0
    row = row_of(results_block(readme.read_text()), "`seed-cnn` (the tutorial net)")
    assert f"older recipe (epochs {epochs + 5} -> {epochs} since)" in row, row


def test_a_result_without_its_machine_is_an_error_not_a_guess(copies):
    readme, results = copies
    edit_json(results / "bench_train.json", lambda d: d.pop("machine"))
    p = figures(readme=readme, results=results)
    assert p.returncode == 1 and "machine" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_readme_stands_alone():
    text = README.read_text()
    assert "../shared" not in text, "a user's clone has no ../shared"
    assert "benchmarks/cifar_jpegs.py" in text  # how a user gets the CIFAR-10 JPEG folder instead


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_result_records_its_command_and_machine(path):
    doc = json.loads(path.read_text())
    assert isinstance(doc.get("command"), str) and "benchmarks/" in doc["command"], doc.get("command")
    assert doc.get("machine"), "no machine recorded"


def test_results_helper_records_command_and_machine(tmp_path, monkeypatch):
    for var in ("CNNX_CIFAR_DIR", "CNNX_BENCH_CACHE", "CNNX_CACHE"):  # recorded in the command when set
        monkeypatch.delenv(var, raising=False)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = _results.write_result(tmp_path / "x.json", {"figure": 1.5},
                                argv=[str(ROOT / "benchmarks" / "bench_train.py"), "--batches", "3", "a b"])
    doc = json.loads(out.read_text())
    assert doc["command"] == "python benchmarks/bench_train.py --batches 3 'a b'"
    assert doc["figure"] == 1.5
    m = doc["machine"]
    assert m["torch"] == metadata.version("torch")
    assert m["cores"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert m["processor"] and m["processor"] in cpuinfo.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left beside it


def test_profile_summary_merges_a_threads_names_and_ranks_the_main_threads_samples(tmp_path):
    """gpu_classify.collapsed_summary on py-spy's raw format: a thread named late ("thread (ID)"
    and "thread (ID): NAME") is one thread; the main one is the one with the most samples; its
    samples go to the innermost frame of cnnx's code, ranked."""
    raw = tmp_path / "p.txt"
    raw.write_text("\n".join([
        "thread (7);main (cnnx/cli.py:1);_children (cnnx/runtime/discover.py:146) 30",
        "thread (7): MainThread;main (cnnx/cli.py:1);write (cnnx/runtime/output.py:9);flush (io.py:3) 50",
        "thread (7): MainThread 5",
        "thread (9): cnnx-infer;run (cnnx/runtime/binding.py:148) 60",
    ]) + "\n")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_classify import collapsed_summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    got = collapsed_summary(raw)
    assert got["threads"] == {"thread (7)": 85, "thread (9)": 60}
    assert got["main_thread"] == "thread (7)" and got["main_samples"] == 85
    assert got["main_top"] == [["write (cnnx/runtime/output.py:9) > flush (io.py:3)", 50, 0.588],
                               ["_children (cnnx/runtime/discover.py:146)", 30, 0.353],
                               ["(no Python frame)", 5, 0.059]]


def test_gpu_collect_names_a_runs_files_by_its_commit_and_never_overwrites(tmp_path):
    """benchmarks/gpu_collect.py: the run's JSON and py-spy profiles land under the commit whose
    files ran (tree_commit over git_commit), the JSON's "file" fields renamed with them; a
    second collect of the same run is refused before it writes anything."""
    run = tmp_path / "results"
    run.mkdir()
    (run / "profile_airnet_fp32.txt").write_text("thread (7);main (cnnx/cli.py:1) 3\n")
    (run / "gpu_classify.json").write_text(json.dumps({
        "command": "python benchmarks/gpu_classify.py", "git_commit": "f" * 40, "tree_commit": "0123456" + "a" * 33,
        "profile_airnet_fp32": {"file": "profile_airnet_fp32.txt", "main_samples": 3},
        "other": [{"file": "not_a_profile.txt"}]}))
    dest = tmp_path / "dest"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_collect
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_collect.main([str(run), "--dest", str(dest), "--no-readme"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_profile_airnet_0123456.txt", "gpu_steady_state_0123456.json"]
    doc = json.loads((dest / "gpu_steady_state_0123456.json").read_text())
    assert doc["profile_airnet_fp32"] == {"file": "gpu_profile_airnet_0123456.txt", "main_samples": 3}
    assert doc["other"] == [{"file": "not_a_profile.txt"}]
    assert (dest / "gpu_profile_airnet_0123456.txt").read_text() == "thread (7);main (cnnx/cli.py:1) 3\n"
    (dest / "gpu_steady_state_0123456.json").unlink()  # the profile is still there: refused, nothing written
    assert gpu_collect.main([str(run), "--dest", str(dest), "--no-readme"]) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_profile_airnet_0123456.txt"]
    assert gpu_collect.main([str(run), "--dest", str(dest), "--no-readme", "--suffix=-b"]) == 0
    assert (dest / "gpu_steady_state_0123456-b.json").is_file()


def test_the_readme_classifier_snippet_runs_as_written(tmp_path, monkeypatch):
    """Its last line used a `batch` it never defined (NameError after printing the rows)."""
    from PIL import Image

    from tests._runtime_util import exported_model, photo_like

    lines = README.read_text().splitlines()
    start = lines.index("    from cnnx.runtime import Classifier, Prediction, Skipped, Note") - 1
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    code = "\n".join(line[4:] for line in lines[start:end])
    assert "clf.predict(batch)" in code
    (tmp_path / "runs" / "x" / "export").mkdir(parents=True)
    shutil.copyfile(exported_model(tmp_path / "m"), tmp_path / "runs" / "x" / "export" / "model.onnx")
    (tmp_path / "photos").mkdir()
    Image.fromarray(photo_like(40, 30, seed=1)).save(tmp_path / "photos" / "a.jpg")
    (tmp_path / "photos" / "b.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code + "\nresult = logits\n", "README.md", "exec"), namespace)
    assert namespace["result"].shape == (4, 10)


def test_the_readme_snippet_for_feeding_a_model_from_your_own_code_gives_classify_s_label(tmp_path, monkeypatch):
    """A deployer's own onnxruntime loop, as the README's export section writes it: the same
    top-1 and logits as cnnx's own Classifier on a photo that needs resizing, cropping and
    rotating (EXIF orientation 6)."""
    from PIL import Image

    from cnnx.runtime import Classifier
    from tests._runtime_util import exported_model, photo_like

    lines = README.read_text().splitlines()
    start = lines.index("    import json, onnxruntime as ort")
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    code = "\n".join(line[4:] for line in lines[start:end])
    model = tmp_path / "runs" / "x" / "export" / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(exported_model(tmp_path / "m"), model)
    (tmp_path / "photos").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo_like(90, 140, seed=4)).save(tmp_path / "photos" / "a.jpg", quality=90, exif=exif.tobytes())
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    with Classifier(model, device="cpu") as clf:
        (row,) = list(clf.classify([tmp_path / "photos" / "a.jpg"]))
    logits = namespace["logits"]
    assert logits.shape == (1, len(namespace["names"])) and int(logits.argmax()) == row.indices[0]
    softmax = np.exp(logits[0] - logits[0].max()) / np.exp(logits[0] - logits[0].max()).sum()
    assert abs(float(softmax.max()) - row.scores[0]) < 1e-5
