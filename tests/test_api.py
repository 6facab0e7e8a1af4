"""The Python API (cnnx.runtime.Classifier): the same rows as `cnnx classify`, a predict that
checks what goes in and comes out, and an import that stays cheap. A real ONNX model of the
contract, real CIFAR JPEGs and bad files, real onnxruntime."""

from __future__ import annotations

import csv
import gc
import itertools
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnx.cli import cli
from tests._runtime_util import CLASSES, photo_like, tiny_onnx_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # A contract model built with onnx.helper: this file needs no torch, like the API itself
    # (test_classify.py runs a real `cnnx export` model through the same code).
    return tiny_onnx_model(tmp_path_factory.mktemp("models") / "model.onnx")


@pytest.fixture(scope="module")
def mixed_folder(cifar_subset, tmp_path_factory) -> Path:
    """CIFAR JPEGs in class folders plus files that are skipped or get a note."""
    import shutil

    root = tmp_path_factory.mktemp("mixed") / "imgs"
    shutil.copytree(cifar_subset(1), root)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.png").write_text("not a picture\n")
    frames = [Image.fromarray(photo_like(40, 40, seed=s)).convert("P") for s in range(3)]
    frames[0].save(root / "bird" / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "notes.txt").write_text("ignored\n")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_classify_yields_the_rows_the_cli_writes(model, mixed_folder, tmp_path):
    from cnnx.runtime import Classifier, Note, Prediction, Skipped

    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli, ["classify", str(mixed_folder), "--model", str(model), "-o", str(out),
                                 "--batch-size", "4", "--topk", "3"])
    assert r.exit_code == 0, r.stderr
    with Classifier(model, "cpu", batch_size=4, topk=3) as clf:
        rows = clf.classify([mixed_folder])
        got = list(rows)
        assert rows.found == 13 and rows.ignored == 1 and rows.already_done == 0
        names = clf.info.class_names
        assert list(names) == CLASSES and clf.provider == "CPUExecutionProvider"
    predictions = [row for row in got if isinstance(row, Prediction)]
    cli_rows = read_csv(out)[1:]
    assert [p.path for p in predictions] == [row[0] for row in cli_rows]
    for p, row in zip(predictions, cli_rows):
        assert p.label(names) == row[1] and len(p.indices) == len(p.scores) == 3
        assert [names[i] for i in p.indices] == row[1::2]
        assert np.allclose(p.scores, [float(s) for s in row[2::2]], atol=5e-7)
    errors = read_csv(tmp_path / "p.errors.csv")[1:]
    assert sorted((r.path, r.stage, r.error) for r in got if isinstance(r, Skipped)) == sorted(
        tuple(row) for row in errors if row[1] != "note")
    assert [(r.path, r.note) for r in got if isinstance(r, Note)] == [
        (str(mixed_folder / "bird" / "anim.gif"), "first frame of 3")]
    # One order for everything: rows come in sorted path order, a note right after its image.
    paths = [row.path for row in got]
    assert paths == sorted(paths)
    note_at = next(i for i, row in enumerate(got) if isinstance(row, Note))
    assert isinstance(got[note_at - 1], Prediction) and got[note_at - 1].path == got[note_at].path


def test_results_hold_the_same_rows_as_arrays(model, mixed_folder):
    """results(): what the CLI writes from, a BatchResult a batch; its arrays and its other
    rows are the rows the iterator gives."""
    from cnnx.runtime import Classifier, Prediction

    with Classifier(model, "cpu", batch_size=4, topk=2) as clf:
        rows = list(clf.classify([mixed_folder]))
        results = list(clf.classify([mixed_folder]).results())
    assert [row for r in results for row in r.rows()] == rows
    predictions = [row for row in rows if isinstance(row, Prediction)]
    assert [p for r in results for p in r.paths] == [p.path for p in predictions]
    assert np.concatenate([r.indices for r in results if r.paths]).tolist() == [list(p.indices) for p in predictions]
    assert [row for r in results for row in r.others()] == [row for row in rows if not isinstance(row, Prediction)]
    assert any(not r.others() for r in results) and any(r.others() for r in results)


def test_classify_skips_done_paths_silently_however_they_are_spelt(model, mixed_folder):
    from cnnx.runtime import Classifier, Prediction

    with Classifier(model, "cpu", batch_size=8) as clf:
        first = [r for r in clf.classify([mixed_folder]) if isinstance(r, Prediction)]
        done = {str(mixed_folder / ".." / mixed_folder.name / Path(p.path).relative_to(mixed_folder))
                for p in first[:5]}
        rows = clf.classify([mixed_folder], done=done)
        again = [r for r in rows if isinstance(r, Prediction)]
        assert [p.path for p in again] == [p.path for p in first[5:]] and rows.already_done == 5
        # done takes what paths take: bytes, os.PathLike, one path alone (not its characters)
        for spelt in ([os.fsencode(first[0].path)], [Path(first[0].path)], first[0].path):
            rows = clf.classify([mixed_folder], done=spelt)
            assert first[0].path not in [r.path for r in rows] and rows.already_done == 1, spelt


def test_predict_returns_logits_or_probabilities_and_checks_its_input(model):
    from cnnx.runtime import Classifier

    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    with Classifier(model, "cpu") as clf:
        logits = clf.predict(images)
        probs = clf.predict(images, probabilities=True)
        assert logits.shape == probs.shape == (6, 10) and logits.dtype == probs.dtype == np.float32
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)
        assert (logits.argmax(1) == probs.argmax(1)).all()
        assert np.allclose(clf.predict(images[:2]), logits[:2], atol=1e-5)  # rows do not depend on N
        for bad in (images.astype(np.float32), images[:, :, :16], images[0], images.tolist()):
            with pytest.raises(ValueError, match=r"uint8 \(N, 3, 32, 32\)"):
                clf.predict(bad)
    with pytest.raises(ValueError, match="batch_size"):
        Classifier(model, batch_size=0)
    for name, bad in (("batch_size", True), ("threads", 0), ("threads", "2"), ("threads", 2.5), ("topk", 1.0)):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {bad!r}"):
            Classifier(model, **{name: bad})
    with Classifier(os.fsencode(model), "cpu", batch_size=np.int64(16), threads=np.int32(1)) as clf:
        assert clf.batch_size == 16 and type(clf.batch_size) is int  # numpy's ints, a bytes path


def test_predict_refuses_a_model_that_does_not_give_one_row_per_image(tmp_path):
    from cnnx.runtime import Classifier, ModelError

    first_row = tiny_onnx_model(tmp_path / "first_row.onnx", batch_out="first-row")
    with Classifier(first_row, "cpu") as clf:
        with pytest.raises(ModelError, match="not one row per image"):
            clf.predict(np.zeros((3, 3, 32, 32), np.uint8))
    with pytest.raises(ModelError, match="output batch dimension"):
        Classifier(tiny_onnx_model(tmp_path / "reduced.onnx", batch_out="reduced"), "cpu")


def test_importing_the_api_is_cheap_until_it_is_used():
    code = (
        "import sys\n"
        "import cnnx.runtime\n"
        "from cnnx import runtime\n"
        "cheap = sorted(m for m in ('numpy', 'onnxruntime', 'PIL', 'torch', 'ray') if m in sys.modules)\n"
        "from cnnx.runtime import Classifier, Prediction, Skipped, Note\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'onnxruntime') if m in sys.modules)\n"
        "print(cheap, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []"


def _cnnx_threads():
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith("cnnx-") and
                  not t.name.startswith("cnnx-infer"))  # the runner's own threads live as long as it


def _rows(rows):
    return [(type(r).__name__, r.path, getattr(r, "indices", None)) for r in rows]


def test_one_path_alone_is_one_root_and_any_path_type_is_taken(model, mixed_folder, monkeypatch):
    """clf.classify("imgs") once walked "i", "m", "g", "s" (and "/" in "a/b" walked the whole
    file system): a str, bytes or os.PathLike alone is one path."""
    from cnnx.runtime import Classifier

    monkeypatch.chdir(mixed_folder.parent)
    with Classifier(model, "cpu", batch_size=4) as clf:
        want = _rows(clf.classify([mixed_folder.name]))
        assert len(want) > 10
        for paths in (mixed_folder.name, mixed_folder.name.encode(), Path(mixed_folder.name),
                      [Path(mixed_folder.name)], [mixed_folder.name.encode()]):
            assert _rows(clf.classify(paths)) == want, paths
        with pytest.raises(TypeError):
            clf.classify([3])
        # a name with a NUL byte (ValueError from os.stat) ended the whole run with no row
        rows = list(clf.classify(["bad\0name.jpg", mixed_folder.name]))
        assert [r for r in rows if r.path == "bad\0name.jpg"][0].stage == "discover"
        assert len(rows) == len(want) + 1


def test_two_runs_read_in_turn_on_one_bound_classifier_give_their_own_rows(model, cifar_subset):
    """IOBinding (the default on CUDA; forced here on the CPU) holds one run's batches in its
    slots: a second run read meanwhile once got the first one's scores, or waited for ever. It
    now runs with session.run, and Python's switch interval comes back to what it was."""
    import sys
    from itertools import zip_longest

    from cnnx.runtime import Classifier

    a_dir, b_dir = cifar_subset(3), cifar_subset(12, offset=3)
    switch = sys.getswitchinterval()
    with Classifier(model, "cpu", batch_size=4, io_binding=True, decode="threads") as clf:
        alone = _rows(clf.classify([a_dir])), _rows(clf.classify([b_dir]))
        for a_per_b in (1, 3):  # read at the same rate, and A one row for three of B
            a, b = clf.classify([a_dir]), clf.classify([b_dir])
            got_a, got_b = [], []
            for i, row in enumerate(zip_longest(b, [], fillvalue=None)):
                got_b.append(row[0])
                if i % a_per_b == 0:
                    got_a.extend(itertools.islice(a, 1))
            got_a.extend(a)
            assert (_rows(got_a), _rows(got_b)) == alone, a_per_b
        assert sys.getswitchinterval() == switch


@pytest.mark.parametrize("decode", ["threads", "processes"])
@pytest.mark.parametrize("io_binding", [False, True])
def test_a_loop_left_early_gives_back_threads_processes_and_runner(model, cifar_subset, decode, io_binding):
    """A `break` out of classify(): its threads end and the decode processes and the IOBinding
    runner are free for the next call at once, without the cyclic collector (a thread of the
    GPU path once held the run for ever); close() ends a run still open."""
    import gc
    import sys

    from cnnx.runtime import Classifier

    folder = cifar_subset(12)
    switch = sys.getswitchinterval()
    gc.disable()
    try:
        with Classifier(model, "cpu", batch_size=4, io_binding=io_binding, decode=decode) as clf:
            want = _rows(clf.classify([folder]))
            for _ in range(2):
                for i, _row in enumerate(clf.classify([folder])):
                    if i == 9:
                        break
                assert _cnnx_threads() == []
                assert clf.decode_pool is None or not clf.decode_pool.busy
                assert sys.getswitchinterval() == switch
            assert _rows(clf.classify([folder])) == want
            held = clf.classify([folder])
            next(held)
        assert _cnnx_threads() == []
        assert sys.getswitchinterval() == switch
    finally:
        gc.enable()


@pytest.mark.parametrize("io_binding", [False, True])
def test_an_exception_inside_a_run_ends_its_threads_though_its_traceback_is_kept(model, cifar_subset, io_binding,
                                                                                monkeypatch):
    """Ctrl-C in a notebook lands inside the run's generators, and the notebook keeps the
    traceback (sys.last_traceback), and with it their frames: the decode threads, the discovery
    thread and the read-ahead batches stayed, close() too, until the next error."""
    import gc

    from cnnx.runtime import Classifier, api

    folder = cifar_subset(12)
    result, calls = api.BatchResult, []

    def interrupted(*args):  # made in the run's generators, on both paths
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return result(*args)

    monkeypatch.setattr(api, "BatchResult", interrupted)
    gc.disable()
    try:
        with Classifier(model, "cpu", batch_size=4, io_binding=io_binding, decode="threads") as clf:
            try:
                for _row in clf.classify([folder]):
                    pass
            except KeyboardInterrupt:
                kept = sys.exc_info()[2]  # what IPython keeps as sys.last_traceback
            assert len(calls) == 2 and kept is not None
            assert _cnnx_threads() == [], _cnnx_threads()
            monkeypatch.setattr(api, "BatchResult", result)
            assert len(_rows(clf.classify([folder]))) == 120  # still usable
    finally:
        gc.enable()


def test_a_run_cut_short_by_close_says_so_and_odd_uses_are_one_line(model, mixed_folder, tmp_path):
    """A Classification read row by row ended silently, as if complete, when its Classifier was
    closed (the review's 16 rows of 200); a Classifier could be pickled into an obscure error;
    a folder or a pt2 archive as the model was "not found" or a protobuf error."""
    import pickle

    from cnnx.runtime import Classifier, ModelError

    with Classifier(model, "cpu", batch_size=8) as clf:
        rows = clf.classify([mixed_folder])
        first = next(rows)
        clf.close()
        with pytest.raises(ValueError, match="closed before the run ended"):
            list(rows)
        assert first is not None
    with Classifier(model, "cpu", batch_size=8) as clf:
        run = clf.classify([mixed_folder])
        results = run.results()
        next(results)
        clf.close()
        with pytest.raises(ValueError, match="closed before the run ended"):
            list(results)
    # the README's pattern for a writer of its own holds no Classification: close() reached no run,
    # which went on (on decode processes started again for it, after the close)
    for decode in ("threads", "processes"):
        with Classifier(model, "cpu", batch_size=8, decode=decode) as clf:
            results = clf.classify([mixed_folder]).results()
            gc.collect()
            next(results)
            clf.close()
            with pytest.raises(ValueError, match="closed before the run ended"):
                list(results)
        with Classifier(model, "cpu", batch_size=8, decode=decode) as clf:
            results = clf.classify([mixed_folder]).results()
            clf.close()  # before the first read
            with pytest.raises(ValueError, match="closed before the run ended"):
                next(results)
            assert clf.decode_pool is None
    with Classifier(model, "cpu", batch_size=8) as clf:
        run = clf.classify([mixed_folder])
        next(run)
        clf.close()  # mid-batch: the next row read says why, none of the rest of the batch comes
        with pytest.raises(ValueError, match="closed before the run ended"):
            next(run)
    with Classifier(model, "cpu", batch_size=8) as clf:
        run = clf.classify([mixed_folder])
        next(run)
        run.close()  # its reader's own stop: an end, no error, and no row of the batch in hand
        assert list(run) == []
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(clf)
    with pytest.raises(ModelError, match="is a folder, not a model file"):
        Classifier(tmp_path, "cpu")
    (tmp_path / "model.pt2").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ModelError, match="TorchScript or pt2 archive"):
        Classifier(tmp_path / "model.pt2", "cpu")
    with zipfile.ZipFile(tmp_path / "best.pt", "w") as z:  # torch.save's layout: a pickle, no code/ (not read)
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ModelError, match=r"training checkpoint \(torch.save\), not an exported model: `cnnx export"):
        Classifier(tmp_path / "best.pt", "cpu")


def test_an_error_a_close_from_another_thread_causes_is_said_as_the_close():
    """close() from another thread stops the decode processes under the reader, which then saw
    "decode worker process N ended ... run again (with fewer --workers ...)": advice for a
    crash that was not one. The reader gets the close's ValueError instead."""
    from cnnx.runtime.api import CLOSED_DURING_RUN, _RunStop, _until_stopped
    from cnnx.runtime.procdecode import DecodeWorkerDied

    def items(stop):
        yield 1
        if stop is not None:
            stop.closed, stop.why = True, CLOSED_DURING_RUN  # as close() from another thread sets them
        raise DecodeWorkerDied("decode worker process 7 ended (exit status 0) between tasks")

    stop = _RunStop(iter(()))
    rows = _until_stopped(items(stop), stop)
    assert next(rows) == 1
    with pytest.raises(ValueError, match="closed before the run ended"):
        next(rows)
    with pytest.raises(DecodeWorkerDied):  # an error of the run's own, no close: as it is
        list(_until_stopped(items(None), _RunStop(iter(()))))


def test_decode_processes_leave_the_programs_start_method_unset(model, cifar_subset):
    """Starting the decode processes fixed multiprocessing's default start method ("fork"),
    after which the program's own set_start_method("spawn") raised "context has already been set"."""
    code = f"""
import multiprocessing
from cnnx.runtime import Classifier
with Classifier({str(model)!r}, "cpu", batch_size=4, decode="processes") as clf:
    assert len(list(clf.classify([{str(cifar_subset(2))!r}]))) == 20
assert multiprocessing.get_start_method(allow_none=True) is None, multiprocessing.get_start_method()
multiprocessing.set_start_method("spawn")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-2000:]


def test_a_model_with_more_logits_than_class_names_is_refused_at_load(tmp_path):
    """11 logits (fixed in the graph) and 10 class names in the metadata: refused when the model
    is opened, in one line, before any image is read (not an IndexError, nor a run that stops at
    its first batch having written its errors rows)."""
    import json

    import onnx

    from cnnx.runtime import Classifier, ModelError
    from cnnx.runtime.contract import KEY_CLASS_NAMES

    path = tiny_onnx_model(tmp_path / "eleven.onnx", class_names=[*CLASSES, "extra"])
    proto = onnx.load(str(path))
    (entry,) = [p for p in proto.metadata_props if p.key == KEY_CLASS_NAMES]
    entry.value = json.dumps(CLASSES)
    onnx.save(proto, str(path))
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim][1] == 11  # the premise
    with pytest.raises(ModelError) as e:
        Classifier(path, "cpu")
    assert str(e.value) == f"{path}: not a cnnx model: 11 logits but 10 class names"
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(32, 32, seed=0)).save(folder / "a.png")
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli, ["classify", str(folder), "--model", str(path), "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [f"Error: {e.value}"], r.stderr
    assert not out.exists() and not (tmp_path / "p.errors.csv").exists()
