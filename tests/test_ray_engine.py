"""`--engine ray` (cnnx.runtime.ray_engine) on a real local Ray: the same rows as the local
pipeline, Parquet / JSONL / URI / manifest inputs, a killed worker and a killed driver, and
the bad-input lines. One Ray session (2 CPUs, and one declared GPU so the GPU-actor plan is
scheduled; onnxruntime runs it on the CPU) is shared by the tests of this module."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnx.cli import cli
from cnnx.runtime.contract import cuda_driver_present
from tests._ray_util import actor_pids, make_mixed_folder, read_errors, read_predictions
from tests._runtime_util import exported_model

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cnnx[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cnnx[ray]')")

from cnnx.runtime.ray_engine import RayEngineError, classify_with_ray, parquet_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    import logging

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_subset) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("mixed") / "images", cifar_subset(4))


@pytest.fixture(scope="module")
def local(tmp_path_factory, folder, model):
    """The local pipeline's predictions and errors rows for `folder` (cnnx classify)."""
    out = tmp_path_factory.mktemp("local") / "local.csv"
    result = CliRunner().invoke(cli, ["classify", str(folder), "--model", str(model), "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return read_predictions(out), read_errors(out.with_name("local.errors.csv"))


def assert_same_predictions(got, want):
    assert [p for p, _, _ in got] == [p for p, _, _ in want]  # every file, once, in the same order
    for (path, labels, scores), (_, want_labels, want_scores) in zip(got, want):
        assert labels == want_labels, path
        assert max(abs(a - b) for a, b in zip(scores, want_scores)) <= 1e-6, path


@pytest.mark.parametrize("kind", ["ray.csv", "ray.jsonl", "parquet/"])
def test_same_rows_as_local_pipeline(ray_session, folder, model, local, tmp_path, kind):
    output = str(tmp_path / kind)
    summary = classify_with_ray([str(folder)], str(model), output=output, fmt=kind.rsplit(".")[-1].strip("/"),
                                num_workers=2, batch_size=16, rows_per_part=15)
    want, want_errors = local
    if kind == "parquet/":
        want = [(parquet_name(p), labels, scores) for p, labels, scores in want]
        assert len(list((tmp_path / "parquet").glob("part-*.parquet"))) >= 2  # rows_per_part cuts parts
    errors_file = tmp_path / {"ray.csv": "ray.errors.csv", "ray.jsonl": "ray.jsonl.errors.csv",
                              "parquet/": "parquet.errors.csv"}[kind]  # where local classify puts them
    assert_same_predictions(read_predictions(output), want)
    got_errors = read_errors(errors_file)
    assert sorted(got_errors) == sorted(want_errors)
    # in local order, but the discover-stage rows (written first); a block's notes came after its skips
    assert [e for e in got_errors if e[1] != "discover"] == [e for e in want_errors if e[1] != "discover"]
    stages = Counter(stage for _, stage, _ in want_errors)
    assert stages["discover"] == 2 and stages["note"] == 1 and stages["open"] == 2 and stages["decode"] == 1
    assert summary.classified == len(want) and summary.skipped == {k: v for k, v in stages.items() if k != "note"}


def test_blocks_of_several_batches_same_rows(ray_session, folder, model, local, tmp_path):
    """A Ray block holds up to MAX_BATCHES_PER_BLOCK batches (Ray's cost is per block): with
    batch_size 4 the ~50 paths go in blocks of 2 batches, bad files among them, and the rows
    are still local classify's, in its order."""
    from cnnx.runtime.ray_engine import _block_rows

    assert _block_rows(len(local[0]) + len(local[1]), 4, 2) == 8  # the case this test runs
    out = tmp_path / "blocks.csv"
    classify_with_ray([str(folder)], str(model), output=str(out), num_workers=2, batch_size=4)
    assert_same_predictions(read_predictions(out), local[0])
    assert sorted(read_errors(tmp_path / "blocks.errors.csv")) == sorted(local[1])


def test_block_rows_share_the_work():
    """Blocks are whole batches, at most MAX_BATCHES_PER_BLOCK of them, and small inputs are
    cut so that each actor gets BLOCKS_PER_ACTOR blocks to work on."""
    from cnnx.runtime.ray_engine import BLOCKS_PER_ACTOR, MAX_BATCHES_PER_BLOCK, _block_rows

    assert _block_rows(50_000, 256, 2) == 256 * MAX_BATCHES_PER_BLOCK  # CIFAR on 2 cores: 25 blocks
    assert _block_rows(10_000_000, 256, 64) == 256 * MAX_BATCHES_PER_BLOCK
    assert _block_rows(40, 16, 2) == 16  # fewer paths than the actors' share: one batch a block
    for paths, batch, workers in [(50_000, 256, 2), (3_000, 64, 3), (500, 8, 4), (1, 256, 8)]:
        rows = _block_rows(paths, batch, workers)
        assert rows % batch == 0
        blocks = -(-paths // rows)
        assert rows == batch or blocks >= BLOCKS_PER_ACTOR * workers


def test_gpu_actor_plan_same_rows(ray_session, folder, model, local, tmp_path):
    """num_gpus_per_worker > 0: a CPU decode stage feeds GPU actors (the session declares one
    GPU; without a CUDA driver onnxruntime runs on the CPU, which is what this checks)."""
    out = tmp_path / "gpu.csv"
    summary = classify_with_ray([str(folder)], str(model), output=str(out), num_gpus_per_worker=0.5, batch_size=16)
    assert summary.workers == 2
    assert_same_predictions(read_predictions(out), local[0])
    assert sorted(read_errors(tmp_path / "gpu.errors.csv")) == sorted(local[1])


def test_uri_prefix_and_manifest(ray_session, folder, model, local, tmp_path):
    """A file:// prefix is walked as a local path and its rows are file:// URIs; a manifest's
    lines are classified in the manifest's order, a repeated line once, also where one spelling
    is a file:// URI (it was classified twice)."""
    want = {p: (labels, scores) for p, labels, scores in local[0]}
    cats = sorted(p for p in want if "/cat/" in p)
    dog = sorted(p for p in want if "/dog/" in p)[0]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(reversed(cats)) + "\n\n" + str(folder / "bad" / "empty.jpg") + "\n" + cats[0] + "\n"
                        + "file://" + cats[1] + "\n" + "file://" + dog + "\n")
    out = tmp_path / "uri.csv"
    classify_with_ray(["file://" + str(folder / "dog")], str(model), output=str(out), manifest=str(manifest),
                      num_workers=2, batch_size=8)
    dogs = sorted(p for p in want if "/dog/" in p)
    expect = [("file://" + p, *want[p]) for p in dogs] + [(p, *want[p]) for p in reversed(cats)]
    assert_same_predictions(read_predictions(out), expect)
    assert read_errors(tmp_path / "uri.errors.csv") == [(str(folder / "bad" / "empty.jpg"), "open",
                                                         "empty file (0 bytes)")]


def test_killed_worker_loses_and_duplicates_nothing(ray_session, cifar_subset, model, tmp_path):
    """SIGKILL to an actor's process after the first block: Ray restarts the actor and retries
    its batches; every file is in the output exactly once."""
    folder = cifar_subset(40)
    out = tmp_path / "killed.csv"
    killed = []

    def kill_one_actor(classified, skipped):
        if not killed:
            pids = actor_pids()
            assert pids, "no Ray actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    classify_with_ray([str(folder)], str(model), output=str(out), num_workers=2, batch_size=8,
                      on_progress=kill_one_actor)
    assert killed
    paths = [p for p, _, _ in read_predictions(out)]
    assert sorted(paths) == sorted(str(p) for p in folder.rglob("*.jpg")) and len(set(paths)) == len(paths)


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from cnnx.runtime.ray_engine import classify_with_ray
    classify_with_ray([{folder!r}], {model!r}, output={output!r}, address={address!r}, num_workers=1, batch_size=8,
                      rows_per_part=8)
""")


def test_killed_driver_resumes(ray_session, cifar_subset, model, tmp_path):
    """SIGKILL to a driver (a process that joined this module's Ray) once Parquet parts are on
    disk; --resume then finishes: every file exactly once, no part cut short."""
    folder = cifar_subset(40)
    out = tmp_path / "run.parquet"
    address = ray.get_runtime_context().gcs_address
    script = DRIVER.format(root=str(ROOT), folder=str(folder), model=str(model), output=str(out), address=address)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(_rows_on_disk(out)) < 24:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _rows_on_disk(out)
    assert 0 < len(before) < 400, "the run was not killed mid-way"
    classify_with_ray([str(folder)], str(model), output=str(out), resume=True, num_workers=2, batch_size=16)
    paths = [p for p, _, _ in read_predictions(out)]
    assert sorted(paths) == sorted(str(p) for p in folder.rglob("*.jpg")) and len(set(paths)) == len(paths)
    assert paths[:len(before)] == before  # what the killed run wrote is kept, not redone


def _rows_on_disk(out: Path) -> list:
    return [p for p, _, _ in read_predictions(out)] if out.exists() else []


def test_resume_csv_cut_short(ray_session, folder, model, local, tmp_path):
    """A CSV whose last row a killed run was writing: resume drops that row and classifies
    what is missing, through local classify's read_done."""
    out = tmp_path / "cut.csv"
    classify_with_ray([str(folder / "airplane"), str(folder / "bird")], str(model), output=str(out),
                      num_workers=2, batch_size=16)
    text = out.read_text()
    out.write_text(text[: len(text) - 30])  # the last row cut in the middle
    summary = classify_with_ray([str(folder)], str(model), output=str(out), resume=True, num_workers=2,
                                batch_size=16)
    assert summary.resumed == 7  # the 8 rows written, less the one cut short
    assert_same_predictions(sorted(read_predictions(out)), sorted(local[0]))  # each file once
    assert sorted(read_errors(tmp_path / "cut.errors.csv")) == sorted(local[1])
    assert not summary.notes
    # all done: "already done" counts the files found again, not the discover-stage skips (the
    # FIFO, the link), which are rows of the errors file but never files to classify
    again = classify_with_ray([str(folder)], str(model), output=str(out), resume=True, num_workers=2, batch_size=16)
    discover = [e for e in local[1] if e[1] == "discover"]
    assert len(discover) == 2 and again.classified == 0
    assert again.resumed == len(local[0]) + len([e for e in local[1] if e[1] not in ("discover", "note")])
    # resumed on one of its folders: the rows of the files under the others are said to stay
    summary = classify_with_ray([str(folder / "airplane")], str(model), output=str(out), resume=True, num_workers=2,
                                batch_size=16)
    rows = len({p for p, *_ in read_predictions(out)}
               | {p for p, stage, _ in read_errors(tmp_path / "cut.errors.csv") if stage != "note"})
    assert summary.classified == 0 and summary.found < rows
    assert "ray: not started (nothing left to classify)" in summary.line() and "start-up" not in summary.line()
    assert summary.notes == [
        f"{rows - summary.found:,} row(s) of {out} or its errors file are of files not found under {folder / 'airplane'} "
        "this time (removed, renamed, or under a path not given): they stay"]


def test_existing_output_needs_resume(ray_session, folder, model, tmp_path):
    out = tmp_path / "there.csv"
    out.write_text("keep me\n")
    with pytest.raises(RayEngineError, match="already exists: pass --resume"):
        classify_with_ray([str(folder)], str(model), output=str(out))
    assert out.read_text() == "keep me\n"


def run_python(code: str, timeout: float):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_ray_missing_is_one_line(model, folder, tmp_path):
    """Without Ray the runtime still imports, and the engine says how to install it."""
    result = run_python(f"""
        import sys
        sys.modules["ray"] = None  # what an environment without Ray looks like to `import ray`
        import cnnx.runtime, cnnx.runtime.ray_engine
        from cnnx.runtime.ray_engine import RayEngineError, classify_with_ray
        try:
            classify_with_ray([{str(folder)!r}], {str(model)!r}, output={str(tmp_path / "x.csv")!r})
        except RayEngineError as e:
            print(e)
            sys.exit(1)
        """, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip().splitlines() == [
        "--engine ray needs Ray Data, which is not installed: pip install 'cnnx[ray]'"]
    assert not (tmp_path / "x.csv").exists()


def test_unreachable_address_is_one_line(model, folder, tmp_path):
    with socket.socket() as s:  # a port that was just free: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_python(f"""
        import sys
        from cnnx.runtime.ray_engine import RayEngineError, classify_with_ray
        try:
            classify_with_ray([{str(folder)!r}], {str(model)!r}, output={str(tmp_path / "x.csv")!r},
                              address="127.0.0.1:{port}")
        except RayEngineError as e:
            print(e)
            sys.exit(1)
        """, timeout=30)  # the bound: one line within 30 s
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port}:"), lines
    assert not (tmp_path / "x.csv").exists()


def test_resume_refuses_another_model_and_another_folder(ray_session, folder, model, tmp_path, monkeypatch):
    """The Ray engine keeps the local engine's run record (.NAME.run.json) and its checks: a
    --resume with another model once appended that model's rows, and one from another folder
    classified every file again under a second spelling. The CLI's file checks run before Ray
    starts, as the local engine's do."""
    import onnx

    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == "cnnx.checkpoint_sha256":
            prop.value = "1" * 64
    onnx.save(proto, str(other))
    monkeypatch.chdir(folder.parent)
    out = tmp_path / "p.csv"
    classify_with_ray([f"{folder.name}/airplane"], str(model), output=str(out), num_workers=1, batch_size=16)
    text = out.read_text()
    with pytest.raises(RayEngineError, match=r"written with another model \(its weights differ\)"):
        classify_with_ray([folder.name], str(other), output=str(out), resume=True, num_workers=1, batch_size=16)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RayEngineError, match="holds paths relative to"):
        classify_with_ray([str(folder)], str(model), output=str(out), resume=True, num_workers=1, batch_size=16)
    assert out.read_text() == text
    parts = tmp_path / "p.parquet"
    classify_with_ray([str(folder / "airplane")], str(model), output=str(parts), num_workers=1, batch_size=16)
    with pytest.raises(RayEngineError, match="written with another model"):
        classify_with_ray([str(folder)], str(other), output=str(parts), resume=True, num_workers=1, batch_size=16)
    # Moved or copied without their records: the first rows' files, classified again on the driver,
    # tell another model with the same classes (its rows were appended, the record then naming it)
    from cnnx.runtime.output import run_record_path

    reweighted = tmp_path / "reweighted.onnx"
    proto = onnx.load(str(model))
    weights = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    weights.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weights) * 1.5, weights.name))
    onnx.save(proto, str(reweighted))
    monkeypatch.chdir(folder.parent)
    for target, paths in ((out, [folder.name]), (parts, [str(folder)])):
        os.remove(run_record_path(str(target)))
        with pytest.raises(RayEngineError, match=r"its rows are not this model's: (\d) of \1 of its files classified again"):
            classify_with_ray(paths, str(reweighted), output=str(target), resume=True, num_workers=1, batch_size=16)
        assert not os.path.exists(run_record_path(str(target)))
    assert out.read_text() == text
    summary = classify_with_ray([folder.name], str(model), output=str(out), resume=True, num_workers=1, batch_size=16)
    assert any(re.search(r"its rows' scores are this model's \(\d of its files classified again\)", w)
               for w in summary.warnings), summary.warnings
    monkeypatch.chdir(tmp_path)
    for args, needle in (([folder, "--errors", "-"], "--output and --errors must be different files"),
                         ([folder, "-o", tmp_path / "q.csv", "--errors", tmp_path / "q.csv"], "must be different"),
                         ([folder, "-o", tmp_path / "q.csv", "--errors", tmp_path / "no" / "e.csv"], "no folder"),
                         ([folder, "-o", out], "already exists: pass --resume")):  # exit 2 as local, not 1
        r = CliRunner().invoke(cli, ["classify", "--engine", "ray", "--model", str(model), *map(str, args)])
        assert r.exit_code == 2 and needle in r.stderr, r.output
    assert not (tmp_path / "q.csv").exists()


def test_a_file_uri_folder_is_walked_as_a_local_path_is(ray_session, folder, model, tmp_path):
    """pyarrow's listing of a file:// folder ended the run in a UnicodeDecodeError traceback on a
    name that is not UTF-8, and left dangling and looping symlinks out without a row. file://
    folders are walked by Discovery: every entry a row or an errors row, as for a local path."""
    import shutil

    src = sorted((folder / "airplane").iterdir())
    root = tmp_path / "odd"
    root.mkdir()
    shutil.copyfile(src[0], root / "ok.jpg")
    shutil.copyfile(src[1], os.fsdecode(bytes(root) + b"/caf\xe9.jpg"))
    os.symlink("/nonexistent/x.jpg", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    out = tmp_path / "odd.csv"
    summary = classify_with_ray([f"file://{root}"], str(model), output=str(out), num_workers=1, batch_size=16)
    rows = {p for p, *_ in read_predictions(out)} | {p for p, *_ in read_errors(tmp_path / "odd.errors.csv")}
    want = {f"file://{root}/{name}" for name in ("ok.jpg", "dangling.jpg", "loop.jpg")}
    assert want <= rows and len(rows) == 4 and summary.classified >= 1, rows
    discover = {p for p, stage, _ in read_errors(tmp_path / "odd.errors.csv") if stage == "discover"}
    assert discover == {f"file://{root}/dangling.jpg", f"file://{root}/loop.jpg"}
    # The folder as a path and as file:// URIs (and a file inside it): walked once, as two
    # local spellings are; before, the file:// rows came a second time.
    out = tmp_path / "twice.csv"
    classify_with_ray([str(root), f"file://{root}/", f"file://{root}/ok.jpg", f"file://{tmp_path}/odd"], str(model),
                      output=str(out), num_workers=1, batch_size=16)
    rows = [p for p, *_ in read_predictions(out)] + [p for p, *_ in read_errors(tmp_path / "twice.errors.csv")]
    assert sorted(rows) == sorted({f"{root}/{name}" for name in ("ok.jpg", "dangling.jpg", "loop.jpg")}
                                  | {os.fsdecode(bytes(root) + b"/caf\xe9.jpg")}), rows


def test_file_uris_name_each_file_once_and_only_files_of_this_machine():
    from cnnx.runtime.ray_engine import file_uri, file_uri_local_path

    for path in ("/a b/x%41#?=1.jpg", os.fsdecode(b"/caf\xe9.jpg"), "/plain/0001.jpg"):
        uri = file_uri(path)
        assert uri.isascii() and " " not in uri and file_uri_local_path(uri) == path
    assert file_uri("/plain/0001.jpg") == "file:///plain/0001.jpg"
    assert file_uri_local_path("file://localhost/tmp/a%20b.jpg") == "/tmp/a b.jpg"
    with pytest.raises(ValueError, match="names host 'nas'.*write file:///path"):
        file_uri_local_path("file://nas/share/x.jpg")


def test_file_uri_rows_read_each_file_as_itself_whatever_its_name(ray_session, folder, model, local, tmp_path):
    """A file:// folder's rows were "file://" + the raw path, which the actors then parsed as a
    URI: x%41.jpg was read as xA.jpg (another image, whose prediction both rows got), and names
    with a space, % # or ? were open errors. Rows are URIs with those bytes escaped, each read as
    its own file; a manifest's file:// line is decoded the same way. The API takes one path as
    a str (it took its characters as paths) and a pathlib output (an AttributeError)."""
    import shutil

    from cnnx.runtime.ray_engine import file_uri

    want = {p: (labels, scores) for p, labels, scores in local[0]}
    cat, plane = sorted(p for p in want if "/cat/" in p)[0], sorted(p for p in want if "/airplane/" in p)[0]
    assert want[cat] != want[plane]
    root = tmp_path / "my photos"
    root.mkdir()
    sources = {"x%41.jpg": cat, "xA.jpg": plane, "a b.jpg": plane, "100%.jpg": cat, "q#1.jpg": cat,
               "r?x=1.jpg": plane}
    for name, src in sources.items():
        shutil.copyfile(src, root / name)
    expect = {file_uri(str(root / name)): want[src] for name, src in sources.items()}
    manifest = tmp_path / "list.txt"
    (tmp_path / "m 1.jpg").symlink_to(cat)
    manifest.write_text(file_uri(str(tmp_path / "m 1.jpg")) + "\n")
    expect[file_uri(str(tmp_path / "m 1.jpg"))] = want[cat]
    out = tmp_path / "named.csv"
    summary = classify_with_ray(file_uri(str(root)), model, output=out, manifest=manifest, num_workers=1,
                                batch_size=16)
    got = read_predictions(out)
    assert summary.classified == len(expect) and not (tmp_path / "named.errors.csv").exists()
    assert sorted(p for p, _, _ in got) == sorted(expect)
    assert_same_predictions(got, [(p, *expect[p]) for p, _, _ in got])


@pytest.mark.skipif(cuda_driver_present(), reason="an NVIDIA driver: the actors may open the model on CUDA")
def test_actors_that_cannot_open_the_model_end_the_run_with_their_reason(ray_session, folder, model, tmp_path):
    """On a running cluster (no check before Ray starts) every actor failed in __init__ and the run
    ended with Ray's traceback and "the Ray run failed: SystemException: SystemException": the reason
    (no usable NVIDIA driver) was only inside that traceback. It is the one line now, no row written."""
    out = tmp_path / "cuda.csv"
    with pytest.raises(RayEngineError) as e:
        classify_with_ray([str(folder)], str(model), output=str(out), num_workers=1, device="cuda")
    assert "cannot classify: --device cuda: " in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists() or read_predictions(out) == []


def test_parquet_keeps_each_name_exactly_and_resumes_on_it(ray_session, folder, model, tmp_path):
    """The `path` column writes a name that is not UTF-8 with \\x escapes: it was the same string
    as a real name spelt with a literal \\xNN, and a resume counted that other file as done.
    path_bytes holds each name's bytes, and a resume matches on them."""
    import shutil

    import pyarrow.parquet as pq

    src = sorted((folder / "airplane").iterdir())
    root = tmp_path / "names"
    root.mkdir()
    literal, raw = root / "a\\xe9.jpg", os.fsdecode(bytes(root) + b"/a\xe9.jpg")
    shutil.copyfile(src[0], literal)
    shutil.copyfile(src[1], raw)
    out = tmp_path / "names.parquet"
    classify_with_ray([str(literal)], str(model), output=str(out), num_workers=1, batch_size=16)
    summary = classify_with_ray([str(root)], str(model), output=str(out), resume=True, num_workers=1, batch_size=16)
    assert summary.resumed == 1 and summary.classified == 1
    names = [b for part in sorted(out.glob("part-*.parquet")) for b in pq.read_table(part).column("path_bytes").to_pylist()]
    assert sorted(names) == sorted([os.fsencode(literal), os.fsencode(raw)])
    # Parts an older cnnx wrote have no path_bytes: resumed on their `path` strings, as before.
    import pyarrow as pa

    from cnnx.runtime.output import csv_header

    old = tmp_path / "old.parquet"
    old.mkdir()
    row = {c: [str(literal) if c == "path" else "airplane" if c.startswith("label") else 0.5]
           for c in csv_header(5)}  # the default --topk, the model having 10 classes
    pq.write_table(pa.table(row), old / "part-00000.parquet")
    again = classify_with_ray([str(literal)], str(model), output=str(old), resume=True, num_workers=1, batch_size=16)
    assert again.resumed == 1 and again.classified == 0


def test_a_run_that_fails_before_its_first_row_leaves_nothing_behind(folder, model, tmp_path):
    """A cluster that could not be joined left the run record (and an empty Parquet folder)
    behind: files of a run that never wrote a row."""
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    for output in (out / "p.csv", out / "p.jsonl", out / "pp.parquet"):
        with pytest.raises(RayEngineError):
            classify_with_ray([str(folder / "airplane")], str(model), output=str(output), address=f"127.0.0.1:{port}")
    assert sorted(os.listdir(out)) == []


def test_a_model_replaced_while_the_run_starts_is_one_line(folder, tmp_path, monkeypatch):
    """The driver opened the model (its identity went into the run record), then read its bytes
    again for the actors seconds later, after Ray started: a new export moved in between gave
    the actors another model than the record names. Here the replace comes right after the
    driver's open."""
    from cnnx.runtime import ray_engine

    path = tmp_path / "model.onnx"
    shutil.copyfile(exported_model(tmp_path, seed=0), path)
    real = ray_engine.Classifier

    def open_then_replace(*args, **kwargs):
        clf = real(*args, **kwargs)
        shutil.copyfile(exported_model(tmp_path, seed=1), tmp_path / "new.onnx")
        os.replace(tmp_path / "new.onnx", path)
        return clf

    monkeypatch.setattr(ray_engine, "Classifier", open_then_replace)
    with pytest.raises(RayEngineError, match="was replaced by another model"):
        classify_with_ray([str(folder / "airplane")], str(path), output=str(tmp_path / "p.csv"), num_workers=1)
    assert not (tmp_path / "p.csv").exists()
