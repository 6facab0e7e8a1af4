"""The reports in a real headless Chromium (driven over the DevTools protocol, see
tests/_report_util.py): each page loads with no console error and no network request, the
galleries show the expected images (decoded), hostile names are text and no injected script
runs, the table sorts, the layout fits a phone, and a screenshot shows the confusion matrix.
Skips when no Chromium binary is installed (CI installs Debian's `chromium`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cnnx.report import write_classify_report, write_training_report
from cnnx.report.classify import LEAST_CONFIDENT, SAMPLE_PER_CLASS
from cnnx.report.training import GALLERY_CAP
from tests._report_util import (CLASSES, HOSTILE_CLASS, HOSTILE_FILE, HOSTILE_FOLDER, Browser, classify_folder,
                                find_chromium, history_rows, run_classify, training_config, val_predictions)
from tests._runtime_util import CIFAR_MEAN, CIFAR_STD, make_onnx_model

PHONE_WIDTH = 390


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium binary (install Debian's `chromium`, or set CNNX_CHROMIUM)")
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_onnx_model(tmp_path_factory.mktemp("report-model") / "m.onnx", class_names=CLASSES)


@pytest.fixture(scope="module")
def val(cifar_subset, model, tmp_path_factory):
    dest = tmp_path_factory.mktemp("val") / "val"
    shutil.copytree(cifar_subset(6), dest)
    for folder in dest.iterdir():
        sorted(folder.iterdir())[0].rename(folder / HOSTILE_FILE)
    return val_predictions(dest, model, CLASSES)


@pytest.fixture(scope="module")
def training_page(val, tmp_path_factory):
    preds, confusion = val
    out = tmp_path_factory.mktemp("pages") / "report.html"
    write_training_report(out, title=f"run {HOSTILE_CLASS}", config=training_config(f"/d/{HOSTILE_FOLDER}", CLASSES),
                          history=history_rows(17, len(CLASSES)), class_names=CLASSES, confusion=confusion,
                          val=preds, summary={"best_epoch": 17})
    return out


@pytest.fixture(scope="module")
def classify_page(cifar_subset, model, tmp_path_factory):
    base = tmp_path_factory.mktemp("classify")
    folder = base / "images"
    made = classify_folder(cifar_subset(3), folder)
    out = base / "pred.csv"
    r = run_classify(folder, model, out)
    assert r.returncode == 0, r.stderr
    (folder / HOSTILE_FILE).unlink()  # gone since the job: a placeholder, not a crash
    from cnnx.runtime.preprocess import make_spec

    page = base / "classify.html"
    write_classify_report(page, output=str(out), fmt="csv", errors=str(base / "pred.errors.csv"), class_names=CLASSES,
                          spec=make_spec(32, CIFAR_MEAN, CIFAR_STD))
    return page, made


def expected_gallery(preds):
    wrong = int((preds.probs.argmax(1) != preds.labels).sum())
    return min(GALLERY_CAP, wrong), min(GALLERY_CAP, len(preds.labels) - wrong)


def assert_clean_load(page, path):
    errors = [(level, text) for level, text in page.console if level in ("error", "exception", "assert")]
    assert errors == []
    outside = [u for u in page.requests if not (u.startswith("data:") or u == path.resolve().as_uri())]
    assert outside == []
    assert page.dialogs == []
    assert page.eval("typeof window.__pwned") == "undefined"


def decoded_imgs(page, selector):
    return page.eval(f"Array.from(document.querySelectorAll({selector!r})).filter(i => i.complete && "
                     "i.naturalWidth > 0).length")


def distinct_colours(img) -> int:
    return len(img.getcolors(1 << 24) or [])


def test_training_page_loads_clean_with_its_galleries_and_a_visible_confusion_matrix(browser, training_page, val,
                                                                                     tmp_path):
    page = browser.open(training_page)
    try:
        assert_clean_load(page, training_page)
        mistakes, unsure = expected_gallery(val[0])
        assert decoded_imgs(page, "#gallery-mistakes img") == mistakes
        assert decoded_imgs(page, "#gallery-unsure img") == unsure
        assert page.eval("document.querySelectorAll('svg.chart polyline').length") == 6  # 3 + 2 + 1 series
        text = page.eval("document.body.innerText")
        assert HOSTILE_CLASS in text and f"/d/{HOSTILE_FOLDER}" in text  # shown as text
        assert page.eval(f"Array.from(document.querySelectorAll('figure')).some(f => f.title.endsWith({HOSTILE_FILE!r}))")
        box = page.eval("(() => { const r = document.getElementById('confusion-matrix').getBoundingClientRect();"
                        " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
        shot = page.screenshot()
        shot.save(tmp_path / "training.png")
        assert distinct_colours(shot) > 1000  # thumbnails and charts, not a blank page
        x, y, w, h = (round(v) for v in box)
        assert w > 200 and h > 200 and x >= 0 and y >= 0 and x + w <= shot.width and y + h <= shot.height
        region = shot.crop((x, y, x + w, y + h))
        assert distinct_colours(region) > 20  # shaded cells and digits
        cells = np.asarray(region)
        assert (cells[..., 0].astype(int) - cells[..., 1] > 60).any()  # red-shaded mistakes are drawn
    finally:
        page.close()


def test_per_class_table_sorts_on_click_and_reads_without_scripts(browser, training_page):
    page = browser.open(training_page)
    try:
        column = "Array.from(document.querySelectorAll('#per-class-table tbody tr')).map(r => Number(r.cells[1].dataset.v))"
        page.eval("document.querySelectorAll('#per-class-table th')[1].click()")
        ascending = page.eval(column)
        assert ascending == sorted(ascending) and len(ascending) == len(CLASSES)
        page.eval("document.querySelectorAll('#per-class-table th')[1].click()")
        assert page.eval(column) == sorted(ascending, reverse=True)
        assert_clean_load(page, training_page)
    finally:
        page.close()
    page = browser.open(training_page, scripts=False)
    try:
        assert page.eval("document.querySelectorAll('#per-class-table tbody tr').length") == len(CLASSES)
        assert page.eval("document.querySelector('#per-class-table th').tabIndex") == -1  # the script did not run
        assert decoded_imgs(page, "#gallery-mistakes img") > 0
    finally:
        page.close()


def test_evaluate_page_without_history(browser, val, tmp_path):
    preds, confusion = val
    out = tmp_path / "eval.html"
    write_training_report(out, title="evaluate", config=training_config("/d", CLASSES), history=[],
                          class_names=CLASSES, confusion=confusion, val=preds)
    page = browser.open(out)
    try:
        assert_clean_load(page, out)
        mistakes, unsure = expected_gallery(preds)
        assert decoded_imgs(page, "#gallery-mistakes img") == mistakes
        assert decoded_imgs(page, "#gallery-unsure img") == unsure
        assert page.eval("document.querySelectorAll('svg.chart').length") == 0
        assert page.eval("document.getElementById('confusion-matrix').getBoundingClientRect().height") > 100
    finally:
        page.close()


def test_a_long_class_name_wraps_and_leaves_the_numbers_on_screen(browser, val, tmp_path):
    """A 216-letter class name without a space made its column 1,665 px wide: every number of the
    per-class table lay beyond a 1280 px window."""
    preds, confusion = val
    names = [c if i != 4 else "verylongclassname_" * 12 for i, c in enumerate(CLASSES)]
    out = tmp_path / "long.html"
    write_training_report(out, title="long", config=training_config("/d", names), history=history_rows(2, len(names)),
                          class_names=names, confusion=confusion, val=preds)
    page = browser.open(out, width=1280, height=900)
    try:
        assert_clean_load(page, out)
        rights = page.eval("Array.from(document.querySelectorAll('#per-class-table th'))"
                           ".map(t => t.getBoundingClientRect().right)")
        assert len(rights) >= 4 and max(rights) <= 1280, rights
    finally:
        page.close()


def test_classify_page_loads_clean_with_grids_placeholders_and_hostile_names_as_text(browser, classify_page,
                                                                                      tmp_path):
    path, made = classify_page
    page = browser.open(path)
    try:
        assert_clean_load(page, path)
        counts = page.eval("Array.from(document.querySelectorAll('#counts-table tbody tr'))"
                           ".map(r => Number(r.cells[1].dataset.v))")
        assert sum(counts) == made["images"]
        shown = sum(min(SAMPLE_PER_CLASS, n) for n in counts)
        grid_imgs = decoded_imgs(page, "#class-grids img")
        placeholders = page.eval("document.querySelectorAll('#class-grids .ph').length")
        assert grid_imgs + placeholders == shown
        least = decoded_imgs(page, "#least-confident-gallery img") + \
            page.eval("document.querySelectorAll('#least-confident-gallery .ph').length")
        assert least == min(LEAST_CONFIDENT, made["images"])
        text = page.eval("document.body.innerText")
        assert "broken.jpg" in text
        titles = page.eval("Array.from(document.querySelectorAll('figure')).map(f => f.title)")
        assert any(f"/{HOSTILE_FOLDER}/" in t for t in titles) and any(t.endswith(HOSTILE_FILE) for t in titles)
        assert "no preview: open: cannot open" in text  # the file removed after the job
        shot = page.screenshot()
        shot.save(tmp_path / "classify.png")
        assert distinct_colours(shot) > 1000
    finally:
        page.close()


@pytest.mark.parametrize("which", ["training", "classify"])
def test_pages_fit_a_phone_screen(browser, training_page, classify_page, which):
    path = training_page if which == "training" else classify_page[0]
    page = browser.open(path, width=PHONE_WIDTH, height=800, mobile=True)
    try:
        assert page.eval("document.documentElement.scrollWidth") <= PHONE_WIDTH  # wide tables scroll inside
        assert page.eval("innerWidth") == PHONE_WIDTH
        assert page.eval("parseFloat(getComputedStyle(document.body).fontSize)") >= 14
        assert_clean_load(page, path)
    finally:
        page.close()
