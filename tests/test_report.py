"""The HTML reports (cnnx.report) read as files: what they hold, escaping, atomicity, size
bounds, and the classify page read back from real `cnnx classify` output (CSV and JSONL,
--resume'd, with files gone since). The same pages in a real browser: test_report_browser.py."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cnnx.report import Predictions, ReportError, write_classify_report, write_training_report
from cnnx.report.classify import LEAST_CONFIDENT, MAX_GRID_THUMBS, SAMPLE_PER_CLASS
from cnnx.report.training import GALLERY_CAP
from cnnx.runtime.files import TEMP_PREFIX
from cnnx.runtime.output import PredictionWriter, default_errors_path, unescape_cell
from tests._report_util import (CLASSES, FORMULA_FILE, HOSTILE_CLASS, HOSTILE_FILE, HOSTILE_FOLDER,
                                classify_folder, history_rows, run_classify, training_config, val_predictions)
from tests._runtime_util import CIFAR_MEAN, CIFAR_STD, make_onnx_model, photo_like

ROOT = Path(__file__).resolve().parents[1]
SIZE_GOAL = 5 * 1024 * 1024


class Elements(HTMLParser):
    """Start tags with their attributes, and the id of the closest enclosing element that has one."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.stack, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        within = [a.get("id") for _, a in self.stack if a.get("id")]
        self.tags.append((tag, attrs, within))
        if tag not in ("img", "meta", "br", "line", "circle", "polyline", "rect", "input"):
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        within = [a.get("id") for _, a in self.stack if a.get("id")]
        self.tags.append((tag, dict(attrs), within))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.text.append(data)

    def imgs_in(self, ident):
        return [a for t, a, within in self.tags if t == "img" and ident in within]

    def scripts(self):
        return [a for t, a, _ in self.tags if t == "script"]


def parse(path) -> Elements:
    p = Elements()
    p.feed(Path(path).read_text(encoding="utf-8"))
    return p


def assert_self_contained(path):
    text = Path(path).read_text(encoding="utf-8")
    p = parse(path)
    assert len(p.scripts()) == 1, "one inline script (table sorting), nothing injected"
    for tag, attrs, _ in p.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:image/jpeg;base64,", "#")), (tag, key, attrs[key][:80])
    assert re.search(r"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:;", text)
    assert '<meta name="viewport"' in text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_onnx_model(tmp_path_factory.mktemp("report-model") / "m.onnx", class_names=CLASSES)


@pytest.fixture(scope="module")
def val_dir(cifar_subset, tmp_path_factory):
    """A validation folder of real JPEGs (6 per class) where one file per class has a hostile name."""
    dest = tmp_path_factory.mktemp("val") / "val"
    shutil.copytree(cifar_subset(6), dest)
    for folder in dest.iterdir():
        first = sorted(folder.iterdir())[0]
        first.rename(folder / HOSTILE_FILE)
    return dest


@pytest.fixture(scope="module")
def val(val_dir, model):
    return val_predictions(val_dir, model, CLASSES)


def test_training_report_holds_curves_tables_matrix_and_capped_galleries(val, tmp_path):
    preds, confusion = val
    out = tmp_path / "report.html"
    history = history_rows(17, len(CLASSES))
    write_training_report(out, title="run cifar", config=training_config("/data/cifar", CLASSES), history=history,
                          class_names=CLASSES, confusion=confusion, val=preds, summary={"best_epoch": 17})
    assert_self_contained(out)
    p = parse(out)
    text = out.read_text(encoding="utf-8")
    wrong = int((preds.probs.argmax(1) != preds.labels).sum())
    right = len(preds.labels) - wrong
    assert len(p.imgs_in("gallery-mistakes")) == min(GALLERY_CAP, wrong)
    assert len(p.imgs_in("gallery-unsure")) == min(GALLERY_CAP, right)
    assert text.count('<svg class="chart"') == 3
    # per-class table: one row per class with the val support from the confusion matrix
    rows = re.findall(r'<tr><td>([^<]*)</td><td class="n" data-v="([^"]*)"', text.split('id="per-class-table"')[1])
    assert [(html.unescape(n), float(v)) for n, v in rows[:len(CLASSES)]] == \
        [(c, float(sum(r))) for c, r in zip(CLASSES, confusion)]
    matrix = text.split('id="confusion-matrix"')[1].split("</table>")[0]
    cells = [int(v) for v in re.findall(r"<td(?: class=\"diag\")?(?: style=\"[^\"]*\")?>(\d+)</td>", matrix)]
    assert cells == [v for r in confusion for v in r]
    # the most confident mistake comes first: its caption holds its true and predicted names
    conf = preds.probs.max(1)
    worst = max((i for i in range(len(preds.labels)) if preds.probs[i].argmax() != preds.labels[i]),
                key=lambda i: (conf[i], -i))
    first_caption = text.split('id="gallery-mistakes"')[1].split("</figcaption>")[0]
    assert html.escape(CLASSES[preds.labels[worst]]) in first_caption
    assert html.escape(CLASSES[preds.probs[worst].argmax()]) in first_caption


def test_chart_ticks_tell_values_apart_and_long_times_are_whole_seconds(val, tmp_path):
    """A plateaued loss labelled every tick "2.3"; a loss of 6e12 wrote "8,000,000,000,000", wider
    than the chart's margin; 21,600 s of training read "2.16e+04 s"."""
    from cnnx.report.svg import LEFT

    preds, confusion = val
    history = history_rows(3, len(CLASSES))
    for row, loss in zip(history, (2.3021, 2.3018, 2.3016)):
        row["train_loss"], row["val_loss"], row["seconds"] = loss, loss + 2e-4, 10_800.0
    history[-1]["train_seconds_total"] = 21_600.0
    out = tmp_path / "r.html"
    write_training_report(out, title="t", config={}, history=history, class_names=CLASSES, confusion=confusion,
                          val=preds)
    text = out.read_text(encoding="utf-8")
    loss_chart = next(c for c in text.split('<svg class="chart"')[1:] if "loss" in c.split("</title>")[0])
    ticks = re.findall(rf'<text x="{LEFT - 6}" y="[^"]*" text-anchor="end">([^<]*)</text>', loss_chart)
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
    assert "21,600 s" in text and "10,800" in text and "e+04" not in text

    history[0]["train_loss"] = 6e12
    write_training_report(out, title="t", config={}, history=history, class_names=CLASSES, confusion=confusion,
                          val=preds)
    loss_chart = next(c for c in out.read_text(encoding="utf-8").split('<svg class="chart"')[1:]
                      if "loss" in c.split("</title>")[0])
    ticks = re.findall(rf'<text x="{LEFT - 6}" y="[^"]*" text-anchor="end">([^<]*)</text>', loss_chart)
    assert ticks and max(map(len, ticks)) * 7 < LEFT, ticks  # about 7 SVG units a character at the page's size
    from cnnx.report.svg import nice_ticks, tick_texts

    assert tick_texts(nice_ticks(0, 6000)) == ["0", "2000", "4000", "6000"]  # plain below 1e5, not 2e+03


def test_hostile_class_and_file_names_are_text_not_markup(val, tmp_path):
    preds, confusion = val
    out = tmp_path / "report.html"
    config = training_config(f"/data/{HOSTILE_FOLDER}", CLASSES)
    write_training_report(out, title=HOSTILE_CLASS, config=config, history=history_rows(3, len(CLASSES)),
                          class_names=CLASSES, confusion=confusion, val=preds, summary={"note": HOSTILE_FILE})
    text = out.read_text(encoding="utf-8")
    for name in (HOSTILE_CLASS, HOSTILE_FOLDER, HOSTILE_FILE):
        assert name not in text
        assert html.escape(name) in text
    assert_self_contained(out)
    assert "<svg onload" not in text and "<img src=x" not in text


def test_evaluate_report_without_history_has_no_curves(val, tmp_path):
    preds, confusion = val
    out = tmp_path / "eval.html"
    write_training_report(out, title="evaluate best.pt", config=training_config("/data", CLASSES), history=[],
                          class_names=CLASSES, confusion=confusion, val=preds)
    text = out.read_text(encoding="utf-8")
    assert '<svg class="chart"' not in text and 'id="curves"' not in text
    assert 'id="confusion-matrix"' in text and 'id="gallery-mistakes"' in text
    assert_self_contained(out)
    # the figures are on the evaluated folder, not the run's validation split its config names
    assert "val top-1" not in text and "val images" not in text and "Validation images" not in text
    assert "The checkpoint&#x27;s training run" in text and "<h3>Its data</h3>" in text


def test_training_report_without_val_predictions_says_so(val, tmp_path):
    _, confusion = val
    out = tmp_path / "r.html"
    write_training_report(out, title="t", config={}, history=history_rows(1, len(CLASSES)), class_names=CLASSES,
                          confusion=confusion, val=None)
    text = out.read_text(encoding="utf-8")
    assert "no predictions were given" in text and "<img" not in text


def test_a_failed_report_leaves_the_previous_one_whole_and_no_temp_file(val, tmp_path):
    preds, confusion = val
    out = tmp_path / "report.html"
    args = dict(title="t", config={}, history=[], class_names=CLASSES, confusion=confusion)
    write_training_report(out, val=preds, **args)
    before = out.read_bytes()

    class Unreadable:
        def __getitem__(self, i):
            raise RuntimeError("device lost")

    broken = Predictions(images=Unreadable(), labels=preds.labels, probs=preds.probs)
    with pytest.raises(RuntimeError, match="device lost"):
        write_training_report(out, val=broken, **args)
    assert out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(TEMP_PREFIX)]


def test_mismatched_shapes_are_refused(val, tmp_path):
    preds, confusion = val
    with pytest.raises(ValueError, match="confusion must be 9x9"):
        write_training_report(tmp_path / "r.html", title="t", config={}, history=[], class_names=CLASSES[:9],
                              confusion=confusion, val=None)
    with pytest.raises(ValueError, match="do not match 10 classes"):
        bad = Predictions(images=preds.images, labels=preds.labels[:-1], probs=preds.probs)
        write_training_report(tmp_path / "r.html", title="t", config={}, history=[], class_names=CLASSES,
                              confusion=confusion, val=bad)
    assert not (tmp_path / "r.html").exists()


def test_training_report_size_is_bounded_for_a_large_run(tmp_path):
    """50,000 val images of 100 classes, 60 epochs: the page stays far under the goal."""
    rng = np.random.default_rng(0)
    n, c = 50_000, 100
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, c, n)
    probs = rng.dirichlet(np.full(c, 0.2), n).astype(np.float32)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    names = [f"class-{i:03d}-with-a-long-name" for i in range(c)]
    out = tmp_path / "big.html"
    write_training_report(out, title="big", config={"class_names": names}, history=history_rows(60, c),
                          class_names=names, confusion=confusion.tolist(),
                          val=Predictions(images=images, labels=labels, probs=probs))
    assert out.stat().st_size < SIZE_GOAL
    p = parse(out)
    assert len(p.imgs_in("gallery-mistakes")) == GALLERY_CAP and len(p.imgs_in("gallery-unsure")) == GALLERY_CAP


# ---- the classify page, from real `cnnx classify` output --------------------------------------

@pytest.fixture(scope="module")
def job(cifar_subset, model, tmp_path_factory):
    """A real classify job (CSV and JSONL) over a folder with hostile and odd names."""
    base = tmp_path_factory.mktemp("classify")
    folder = base / "images"
    made = classify_folder(cifar_subset(3), folder)
    outs = {}
    for fmt in ("csv", "jsonl"):
        out = base / f"pred_{fmt}.{fmt}"
        r = run_classify(folder, model, out, "--format", fmt, "--topk", "3")
        assert r.returncode == 0, r.stderr
        outs[fmt] = out
    return {"folder": folder, "outs": outs, "errors": {f: Path(default_errors_path(str(o))) for f, o in outs.items()},
            **made}


def csv_rows(path):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return [[unescape_cell(c) for c in row] for row in list(csv.reader(f))[1:]]


def model_spec():
    from cnnx.runtime.preprocess import make_spec

    return make_spec(32, CIFAR_MEAN, CIFAR_STD)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_classify_report_counts_samples_and_least_confident_from_the_real_output(job, fmt, tmp_path):
    out = tmp_path / "classify.html"
    write_classify_report(out, output=str(job["outs"][fmt]), fmt=fmt, errors=str(job["errors"][fmt]),
                          class_names=CLASSES, spec=model_spec())
    assert_self_contained(out)
    rows = csv_rows(job["outs"]["csv"])
    assert len(rows) == job["images"]
    counts = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    text = out.read_text(encoding="utf-8")
    table = text.split('id="counts-table"')[1].split("</table>")[0]
    shown = {html.unescape(n): int(v) for n, v in re.findall(r'<tr><td>([^<]*)</td><td class="n" data-v="([^"]*)"',
                                                              table) for v in [float(v)]}
    assert shown == {c: counts.get(c, 0) for c in CLASSES}
    p = parse(out)
    assert len(p.imgs_in("class-grids")) == sum(min(SAMPLE_PER_CLASS, n) for n in counts.values())
    least = p.imgs_in("least-confident-gallery")
    assert len(least) == min(LEAST_CONFIDENT, len(rows))
    lowest = sorted(rows, key=lambda r: float(r[2]))[0]
    first = text.split('id="least-confident-gallery"')[1].split("</figcaption>")[0]
    assert html.escape(os.path.basename(lowest[0])) in first
    # the broken file is in the errors table; the odd names show as the files' real names
    errors = text.split('id="errors-table"')[1].split("</table>")[0]
    assert "broken.jpg" in errors
    assert html.escape(FORMULA_FILE) in text and "&#x27;=HYPERLINK" not in text
    assert html.escape(HOSTILE_FILE) in text and HOSTILE_FILE not in text
    assert html.escape(HOSTILE_FOLDER) in text and HOSTILE_FOLDER not in text
    assert "caf\ufffd.jpg" in text  # not UTF-8 on disk: shown with a replacement character


def test_classify_report_covers_every_session_of_a_resumed_job(cifar_subset, model, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(cifar_subset(2), folder)
    out = tmp_path / "pred.csv"
    assert run_classify(folder, model, out).returncode == 0
    shutil.copytree(cifar_subset(2, offset=2), folder, dirs_exist_ok=True)
    r = run_classify(folder, model, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "20 already done" in r.stderr
    page = tmp_path / "report.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=None, class_names=CLASSES)
    text = page.read_text(encoding="utf-8")
    assert re.search(r"classified<b>40</b>", text)
    assert "no errors file was given" in text
    # the default errors file, never made (no file was skipped), is not named as if it were there
    write_classify_report(page, output=str(out), fmt="csv", errors=str(tmp_path / "pred.errors.csv"))
    text = page.read_text(encoding="utf-8")
    assert "none written (no file was skipped)" in text and "pred.errors.csv" not in text
    write_classify_report(page, output=str(out), fmt="csv", errors="-")  # --errors -: rows went to stdout
    text = page.read_text(encoding="utf-8")
    assert "stdout (its rows are not in this report)" in text and "every file found was classified" not in text


def test_files_gone_or_broken_since_the_job_show_placeholders(job, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(job["folder"], folder)
    out = tmp_path / "pred.csv"
    original = csv_rows(job["outs"]["csv"])
    writer = PredictionWriter(str(out), "csv", CLASSES, 1)
    moved = [str(folder / os.path.relpath(r[0], job["folder"])) for r in original]
    writer.write_batch(moved, [[CLASSES.index(r[1])] for r in original], [[float(r[2])] for r in original])
    writer.close()
    os.remove(moved[0])
    Path(moved[1]).write_bytes(b"\xff\xd8\xff truncated since")
    page = tmp_path / "report.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=None, class_names=CLASSES)
    text = page.read_text(encoding="utf-8")
    assert text.count('<div class="ph"') >= 2
    assert "no preview: open: cannot open" in text
    counts = {}
    for r in original:
        counts[r[1]] = counts.get(r[1], 0) + 1
    grids = text.split('id="class-grids"')[1].split('id="least-confident"')[0]
    assert len(parse(page).imgs_in("class-grids")) + grids.count('class="ph"') == \
        sum(min(SAMPLE_PER_CLASS, n) for n in counts.values())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_row_cut_short_by_a_kill_is_left_out_and_said(job, fmt, tmp_path):
    out = tmp_path / f"pred.{fmt}"
    data = job["outs"][fmt].read_bytes()
    out.write_bytes(data[: len(data) - 7])  # the last row loses its end (inside a quoted score in CSV)
    page = tmp_path / "r.html"
    write_classify_report(page, output=str(out), fmt=fmt, errors=None)
    text = page.read_text(encoding="utf-8")
    assert re.search(rf"classified<b>{job['images'] - 1}</b>", text)
    assert "1 rows did not parse" in text


def test_files_that_are_not_cnnx_output_are_a_report_error(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("name,value\na,1\n")
    with pytest.raises(ReportError, match="not those of a cnnx predictions CSV"):
        write_classify_report(tmp_path / "r.html", output=str(other), fmt="csv", errors=None)
    notjson = tmp_path / "other.jsonl"
    notjson.write_text("hello\n")
    with pytest.raises(ReportError, match="line 1 is not a cnnx JSONL prediction"):
        write_classify_report(tmp_path / "r.html", output=str(notjson), fmt="jsonl", errors=None)
    with pytest.raises(ReportError, match="needs --output FILE"):
        write_classify_report(tmp_path / "r.html", output="-", fmt="csv", errors=None)
    assert not (tmp_path / "r.html").exists()


def test_a_job_that_classified_nothing_still_gets_a_page(tmp_path):
    errors = tmp_path / "pred.errors.csv"
    errors.write_text('"path","stage","error"\n"a.jpg","decode","cannot identify image file"\n')
    page = tmp_path / "r.html"
    write_classify_report(page, output=str(tmp_path / "pred.csv"), fmt="csv", errors=str(errors))
    text = page.read_text(encoding="utf-8")
    assert "the predictions file does not exist" in text and "cannot identify image file" in text


def test_classify_report_size_is_bounded_for_a_large_job(tmp_path):
    """100,000 predictions over 100 classes pointing at 640x480 photos: the page stays under
    5 MB (thumbnails capped), every class is counted."""
    from PIL import Image

    photos = []
    for i in range(40):
        p = tmp_path / f"photo{i:02d}.jpg"
        Image.fromarray(photo_like(480, 640, seed=i)).save(p, quality=90)
        photos.append(str(p))
    names = [f"class-{i:03d}" for i in range(100)]
    out = tmp_path / "pred.csv"
    writer = PredictionWriter(str(out), "csv", names, 2)
    rng = np.random.default_rng(0)
    for start in range(0, 100_000, 10_000):
        idx = rng.integers(0, 100, (10_000, 2))
        scores = np.sort(rng.random((10_000, 2)), axis=1)[:, ::-1]
        writer.write_batch([f"{photos[k % 40]}" for k in range(start, start + 10_000)], idx, scores)
    writer.close()
    page = tmp_path / "r.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=None, class_names=names,
                          spec={**model_spec(), "size": [224, 224]})
    assert page.stat().st_size < SIZE_GOAL
    p = parse(page)
    assert len(p.imgs_in("class-grids")) == MAX_GRID_THUMBS
    assert "more classes have no grid" in page.read_text(encoding="utf-8")


def test_reports_are_written_where_torch_cannot_be_imported(job, tmp_path):
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here (test)')\n")
    code = ("import sys, numpy as np\n"
            "from cnnx.report import Predictions, write_classify_report, write_training_report\n"
            f"write_classify_report({str(tmp_path / 'c.html')!r}, output={str(job['outs']['csv'])!r}, fmt='csv',"
            f" errors={str(job['errors']['csv'])!r})\n"
            "imgs = np.zeros((4, 3, 32, 32), np.uint8); probs = np.full((4, 2), 0.5, np.float32)\n"
            f"write_training_report({str(tmp_path / 't.html')!r}, title='t', config={{}}, history=[],"
            " class_names=['a', 'b'], confusion=[[2, 0], [2, 0]],"
            " val=Predictions(imgs, np.array([0, 0, 1, 1]), probs))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'onnxruntime')))\n")
    env = dict(os.environ, PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert (tmp_path / "c.html").stat().st_size > 0 and (tmp_path / "t.html").stat().st_size > 0


def test_json_and_csv_outputs_give_the_same_counts(job, tmp_path):
    texts = {}
    for fmt in ("csv", "jsonl"):
        page = tmp_path / f"{fmt}.html"
        write_classify_report(page, output=str(job["outs"][fmt]), fmt=fmt, errors=None, class_names=CLASSES)
        texts[fmt] = page.read_text(encoding="utf-8").split('id="counts-table"')[1].split("</table>")[0]
    assert texts["csv"] == texts["jsonl"]
    first = json.loads(job["outs"]["jsonl"].read_text().splitlines()[0])
    assert set(first) >= {"path", "label", "score", "topk"}


def test_classify_cli_report_flag_writes_the_page_of_a_resumed_job(cifar_subset, model, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(cifar_subset(2), folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out, page = tmp_path / "pred.jsonl", tmp_path / "report.html"
    r = run_classify(folder, model, out, "--format", "jsonl", "--report", str(page))
    assert r.returncode == 0, r.stderr
    first = page.read_text(encoding="utf-8")
    assert re.search(r"classified<b>20</b>", first) and "broken.jpg" in first
    shutil.copytree(cifar_subset(2, offset=2), folder, dirs_exist_ok=True)
    r = run_classify(folder, model, out, "--format", "jsonl", "--resume", "--report", str(page))
    assert r.returncode == 0, r.stderr
    text = page.read_text(encoding="utf-8")
    assert re.search(r"classified<b>40</b>", text) and "broken.jpg" in text
    assert_self_contained(page)
    assert len(parse(page).imgs_in("least-confident-gallery")) == LEAST_CONFIDENT


def test_counts_and_errors_tables_are_capped_for_a_model_with_many_classes(tmp_path):
    from cnnx.report.classify import MAX_CELL_CHARS, MAX_COUNT_ROWS, MAX_ERROR_ROWS

    names = [f"c{i:05d}" for i in range(5000)]
    out = tmp_path / "pred.csv"
    writer = PredictionWriter(str(out), "csv", names, 1)
    writer.write_batch([f"img{i}.jpg" for i in range(3000)], [[i] for i in range(3000)], [[0.5]] * 3000)
    writer.close()
    errors = tmp_path / "pred.errors.csv"
    long_name = "x" * 3000 + ".jpg"
    with open(errors, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(["path", "stage", "error"])
        w.writerows([[f"{long_name}{i}", "decode", "cannot identify image file"] for i in range(2000)])
    page = tmp_path / "r.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=str(errors), class_names=names)
    text = page.read_text(encoding="utf-8")
    counts = text.split('id="counts-table"')[1].split("</table>")[0]
    assert counts.count("<tr>") == 1 + MAX_COUNT_ROWS
    assert f"and {5000 - MAX_COUNT_ROWS:,} more classes with {3000 - MAX_COUNT_ROWS:,} images" in text
    table = text.split('id="errors-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + MAX_ERROR_ROWS
    assert "x" * MAX_CELL_CHARS not in table and f"the first {MAX_ERROR_ROWS} of 2,000" in text
    assert page.stat().st_size < SIZE_GOAL


# ---- the figures each page shows, from small inputs whose right values are known ---------------

def page_cards(text) -> dict:
    """The overview cards of a page: {title: figure as shown}."""
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r'<div class="card">([^<]*)<b>([^<]*)</b></div>',
                                                                      text)}


def table_rows(text, table_id) -> list:
    """The body rows of the table with that id, each a list of its cells' text (tags dropped)."""
    table = text.split(f'id="{table_id}"')[1].split("</table>")[0].split("<tbody>")[1]
    return [[html.unescape(re.sub(r"<[^>]*>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table)]


KNOWN_CLASSES = ["cat", "dog", "fox", "owl"]  # owl is never predicted
# path, top-1 and runner-up (class index, score) of a 5-file job; mean top-1 score 3.4 / 5 = 0.68
KNOWN_PREDICTIONS = [("a.jpg", (0, 0.9), (1, 0.05)), ("b.jpg", (0, 0.8), (1, 0.1)), ("c.jpg", (0, 0.7), (2, 0.2)),
                     ("d.jpg", (1, 0.6), (0, 0.3)), ("e.jpg", (2, 0.4), (0, 0.35))]


@pytest.fixture
def known_job(tmp_path):
    """A predictions CSV (top-2) of KNOWN_PREDICTIONS and its errors file: 2 files not classified
    (decode, open) and 2 notes on classified files, written by cnnx's own writers."""
    from cnnx.runtime.output import ErrorsWriter

    out = tmp_path / "pred.csv"
    writer = PredictionWriter(str(out), "csv", KNOWN_CLASSES, 2)
    writer.write_batch([str(tmp_path / p) for p, _, _ in KNOWN_PREDICTIONS],
                       [[a[0], b[0]] for _, a, b in KNOWN_PREDICTIONS], [[a[1], b[1]] for _, a, b in KNOWN_PREDICTIONS])
    writer.close()
    errors = tmp_path / "pred.errors.csv"
    ew = ErrorsWriter(str(errors))
    ew.write(str(tmp_path / "broken.jpg"), "decode", "cannot identify image file")
    ew.write(str(tmp_path / "a.jpg"), "note", "EXIF orientation tag is malformed: shown as stored")
    ew.write(str(tmp_path / "gone.jpg"), "open", "No such file or directory")
    ew.write(str(tmp_path / "b.jpg"), "note", "an animated GIF: its first frame was classified")
    ew.close()
    page = tmp_path / "report.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=str(errors), class_names=KNOWN_CLASSES)
    return {"page": page, "text": page.read_text(encoding="utf-8"), "dir": tmp_path}


def test_classify_overview_cards_count_files_notes_and_classes_and_mean_over_files(known_job):
    cards = page_cards(known_job["text"])
    assert cards["classified"] == "5"
    assert cards["not classified"] == "2"  # the 2 notes are on files that were classified
    assert cards["with notes"] == "2"
    assert cards["classes predicted"] == "3 of 4"  # owl is the model's, never predicted
    assert cards["mean top-1 score"] == "0.68"  # (0.9 + 0.8 + 0.7 + 0.6 + 0.4) / 5 files


def test_classify_counts_table_shares_are_of_all_files(known_job):
    rows = table_rows(known_job["text"], "counts-table")
    assert [r[:4] for r in rows] == [["cat", "3", "60.0%", "0.8"], ["dog", "1", "20.0%", "0.6"],
                                     ["fox", "1", "20.0%", "0.4"], ["owl", "0", "0.0%", ""]]


def test_classify_files_not_classified_lists_errors_and_notes_apart(known_job):
    d, text = known_job["dir"], known_job["text"]
    assert table_rows(text, "errors-table") == [[str(d / "broken.jpg"), "decode", "cannot identify image file"],
                                                [str(d / "gone.jpg"), "open", "No such file or directory"]]
    notes = text.split("<summary>notes on classified files</summary>")[1].split("</table>")[0]
    assert str(d / "a.jpg") in notes and str(d / "b.jpg") in notes and "broken.jpg" not in notes
    assert "<h3>Errors</h3>" in text  # all of the 2 errors shown: no "the first N of M"


def test_classify_least_confident_caption_gives_the_runner_up_score(known_job):
    gallery = known_job["text"].split('id="least-confident-gallery"')[1]
    captions = [html.unescape(re.sub(r"<[^>]*>", "|", c)) for c in re.findall(r"<figcaption>(.*?)</figcaption>",
                                                                             gallery)]
    assert captions[0] == "e.jpg||fox| · 0.40|next cat · 0.35"
    assert captions[1] == "d.jpg||dog| · 0.60|next cat · 0.30"
    assert len(captions) == 5


def test_errors_rows_of_the_wrong_width_are_left_out_and_said_not_a_traceback(tmp_path):
    """A row that is not path,stage,error (2, 1 or 4 cells: a hand-edited or foreign file) is
    counted as a row that did not parse; it raised IndexError for 2 cells."""
    out = tmp_path / "pred.csv"
    writer = PredictionWriter(str(out), "csv", KNOWN_CLASSES, 1)
    writer.write_batch(["a.jpg"], [[0]], [[0.9]])
    writer.close()
    errors = tmp_path / "pred.errors.csv"
    with open(errors, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerows([["path", "stage", "error"], ["two.jpg", "decode"], ["one.jpg"],
                     ["four.jpg", "decode", "bad", "extra"], ["ok.jpg", "decode", "cannot identify image file"]])
    page = tmp_path / "r.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=str(errors), class_names=KNOWN_CLASSES)
    text = page.read_text(encoding="utf-8")
    assert "3 rows did not parse" in text
    assert page_cards(text)["not classified"] == "1"
    assert table_rows(text, "errors-table") == [["ok.jpg", "decode", "cannot identify image file"]]


def test_the_class_sample_keeps_every_row_with_equal_chance():
    """Reservoir sampling: of 24 rows of a class each is in the 12-image sample half the time
    (over 400 seeds); a slot never replaced kept the 12th row always."""
    import random

    from cnnx.report.classify import PredictionStats, Row

    n, trials = 2 * SAMPLE_PER_CLASS, 400
    kept = [0] * n
    for seed in range(trials):
        stats = PredictionStats(rng=random.Random(seed))
        for i in range(n):
            stats.add(Row(f"{i}.jpg", "cat", 0.5))
        for row in stats.samples["cat"]:
            kept[int(row.path.split(".")[0])] += 1
    assert sum(kept) == SAMPLE_PER_CLASS * trials
    assert all(0.35 < k / trials < 0.65 for k in kept), kept


# rows: true class; columns: predicted. Asymmetric, so a swapped i/j or a column sum shows.
KNOWN_CONFUSION = [[5, 3, 0],
                   [1, 6, 2],
                   [0, 4, 4]]


def known_training_page(tmp_path, val=None):
    history = history_rows(3, 3)
    for row, top1 in zip(history, (0.5, 0.7, 0.6)):  # the best epoch (2) is not the last
        row["val_top1"] = top1
    out = tmp_path / "report.html"
    write_training_report(out, title="t", config={}, history=history, class_names=["a", "b", "c"],
                          confusion=KNOWN_CONFUSION, val=val)
    return out.read_text(encoding="utf-8")


def test_training_overview_cards_name_the_best_epoch_not_the_last(tmp_path):
    cards = page_cards(known_training_page(tmp_path))
    assert cards["best epoch"] == "2 of 3"
    assert cards["last val top-1"] == "60.0%"
    assert cards["val top-1"] == "60.0%"  # trace 15 of 25 images
    assert cards["val images"] == "25"


def test_per_class_table_recall_precision_and_most_often_predicted_instead(tmp_path):
    rows = table_rows(known_training_page(tmp_path), "per-class-table")
    # images (row sum), top-1 (diagonal / row sum), precision (diagonal / column sum: 6, 13, 6),
    # train top-1 of the best epoch, the class most often predicted instead (never the class itself)
    assert [[r[0], r[1], r[2], r[3], r[5]] for r in rows] == [["a", "8", "62.5%", "83.3%", "b (3)"],
                                                              ["b", "9", "66.7%", "46.2%", "c (2)"],
                                                              ["c", "8", "50.0%", "66.7%", "b (4)"]]


def test_most_confused_pairs_name_true_then_predicted_with_the_share_of_the_true_class(tmp_path):
    rows = table_rows(known_training_page(tmp_path), "confused-pairs")
    assert rows == [["c", "b", "4", "50.0%"], ["a", "b", "3", "37.5%"], ["b", "c", "2", "22.2%"],
                    ["b", "a", "1", "11.1%"]]


def test_least_confident_correct_caption_names_the_second_ranked_class(tmp_path):
    probs = np.array([[0.5, 0.1, 0.4],  # right, next c
                      [0.2, 0.7, 0.1],  # right, next a
                      [0.1, 0.3, 0.6]], dtype=np.float32)  # true b: a mistake
    val = Predictions(images=np.zeros((3, 3, 8, 8), np.uint8), labels=np.array([0, 1, 1]), probs=probs)
    gallery = known_training_page(tmp_path, val).split('id="gallery-unsure"')[1].split("<h3>")[0]
    captions = [html.unescape(re.sub(r"<[^>]*>", "|", c)) for c in re.findall(r"<figcaption>(.*?)</figcaption>",
                                                                             gallery)]
    assert captions == ["|a| · 0.50|next c · 0.40", "|b| · 0.70|next a · 0.20"]
