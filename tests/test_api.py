"""The Python API (cnnx.runtime.Classifier): the same rows as `cnnx classify`, a predict that
checks what goes in and comes out, and an import that stays cheap. A real ONNX model of the
contract, real CIFAR JPEGs and bad files, real onnxruntime."""

from __future__ import annotations

import csv
import subprocess
import sys
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
