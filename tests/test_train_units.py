"""Unit tests of the training pieces: zoo forward/backward, schedule, augmentation, splits,
the image-folder loader and its cache, and loop.evaluate."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cnnx.runtime.preprocess import load_image, make_spec
from cnnx.train import loop
from cnnx.train.config import ConfigError, RECIPES, TrainConfig, resolve_config
from cnnx.train.data import (SPLIT_BY_GENERATOR, SPLIT_BY_NAME, DataError, folder_layout, load_image_folder,
                             stratified_split)
from cnnx.train.zoo import ARCHS, CIFAR_MEAN, CIFAR_STD, Uint8Input, create_model

from tests._train_util import copy_classes


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_zoo_entry_forward_backward(name):
    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name in ("seed-cnn", "seed-vgg") else {}
    model = Uint8Input(create_model(name, 7, **kwargs), CIFAR_MEAN, CIFAR_STD).train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (2, 7)
    F.cross_entropy(logits, torch.tensor([1, 5])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_log_lines_leave_out_a_top5_that_is_one_by_construction():
    """With 5 classes or fewer every class is among the top 5: 1.0000 each epoch says nothing."""
    counts = loop.Counts(4, "cpu")
    counts.add(torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2), torch.tensor([0, 3]), torch.tensor(1.0))
    m = counts.metrics()
    assert m["top5"] == 1.0 and m["top1"] == 0.5  # the files keep it
    assert loop.top5_said(m, 4) == loop.top5_said(m, 5) == ""
    assert loop.top5_said({"top5": 0.25}, 6) == " top5 0.2500"


def test_lr_schedule_is_a_pure_function_of_the_step():
    kw = dict(peak=1.0, warmup=0.1, final=0.0)
    lrs = [loop.lr_at(s, 100, schedule="onecycle", **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.02
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    cos = [loop.lr_at(s, 100, schedule="cosine", **kw) for s in range(100)]
    assert cos[55] == pytest.approx(0.5, abs=0.02)  # half-way down (where a rising cosine is too)
    assert cos[10] == pytest.approx(1.0) and cos[-1] < 0.01 and all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert loop.lr_at(99, 100, schedule="cosine", **{**kw, "final": 0.1}) == pytest.approx(0.1, abs=0.01)
    assert loop.lr_at(80, 100, schedule="constant", **kw) == 1.0
    assert loop.lr_at(5, 100, schedule="onecycle", **kw) == lrs[5]  # same step, same value


def test_augment_batch_crop_and_flip_match_reflect_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(loop.augment_batch(x, aug=(), pad=2, cutout=0, generator=g), x)
    out = loop.augment_batch(x, aug=("crop", "flip"), pad=2, cutout=0, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(out[i].float(), w) for w in windows), i
    assert not torch.equal(out, x)  # with 16 samples some are moved or mirrored
    cut = loop.augment_batch(x, aug=("cutout",), pad=0, cutout=4, generator=g)
    assert ((cut == 0).flatten(1).sum(1) >= (x == 0).flatten(1).sum(1)).all()


def test_stratified_split_is_per_class_fixed_and_disjoint():
    labels = torch.arange(10).repeat_interleave(50)
    tr, va = stratified_split(labels, 0.1, seed=3)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 500
    assert torch.bincount(labels[va]).tolist() == [5] * 10
    tr2, va2 = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(va, va2)
    assert not torch.equal(va, stratified_split(labels, 0.1, seed=4)[1])
    # the fraction of each class rounded (not cut), at least one held out, at least one trained on
    uneven = torch.tensor([0] * 57 + [1] * 14 + [2] * 2 + [3])
    _, va = stratified_split(uneven, 0.1, seed=0)
    assert torch.bincount(uneven[va], minlength=4).tolist() == [6, 1, 1, 0]
    _, va = stratified_split(uneven, 0.97, seed=0)
    assert torch.bincount(uneven[va], minlength=4).tolist() == [55, 13, 1, 0]  # 55.3 of 57, 13.6 of 14 (not all)


def test_a_photo_added_to_a_class_moves_at_most_one_held_out_file():
    """The split by name: adding one image to one class left 35 of 40 validation images where
    they were under the generator's split (a v1 run trained on them, a v2 run validated on them)."""
    names = {c: [f"{c}/IMG_{i:04d}.jpg" for i in range(100)] for c in ("airplane", "cat", "dog", "ship")}

    def held_out(names):
        keys = [k for c in sorted(names) for k in names[c]]
        labels = torch.tensor([i for i, c in enumerate(sorted(names)) for _ in names[c]])
        _, va = stratified_split(labels, 0.1, seed=0, keys=keys)
        return {keys[i] for i in va.tolist()}

    before = held_out(names)
    after = held_out({**names, "airplane": names["airplane"] + ["airplane/IMG_9999.jpg"]})
    assert len(before) == len(after) == 40
    assert len(after - before) <= 1 and all(k.startswith("airplane/") for k in after - before), after - before
    # the split of runs made before it is kept for them (a resumed run, its export's parity images)
    legacy = stratified_split(torch.arange(4).repeat_interleave(100), 0.1, 0, method=SPLIT_BY_GENERATOR)[1]
    g = torch.Generator().manual_seed(0)
    assert legacy.tolist() == sorted(c * 100 + i for c in range(4) for i in torch.randperm(100, generator=g)[:10].tolist())


def test_a_copy_added_to_a_class_is_no_new_image_there_and_moves_at_most_one_other_file():
    """Copies of one file in a class are one image (run_split's groups), ranked where the
    first-ranked of them is: a copy added goes to its original's side; where it ranks first and
    takes a trained original into the held-out images, one other image leaves them. Keyed as the
    first copy in path order and counted each (SPLIT_BY_FIRST_NAME, the rule of the runs before
    it, which keep it), a copy whose name sorted first moved its held-out original and another file."""
    from cnnx.train.data import SPLIT_BY_FIRST_NAME

    keys = [f"cat/{i:04d}.jpg" for i in range(40)]
    _, va = stratified_split(torch.zeros(40, dtype=torch.int64), 0.2, seed=0, keys=keys)
    before = {keys[i] for i in va.tolist()}
    moved = {}
    for method in (SPLIT_BY_NAME, SPLIT_BY_FIRST_NAME):
        for original in keys:
            for copy in ("cat/0.jpg", "cat/9.jpg", *(f"cat/{original[4:8]} ({j}).jpg" for j in range(1, 6))):
                grown = [copy, *keys]
                group = [0, 1 + keys.index(original)]
                if method == SPLIT_BY_FIRST_NAME:  # run_split's keying for its runs
                    grown_keys, copies = list(grown), ()
                    grown_keys[max(group)] = grown_keys[min(group)]
                else:
                    grown_keys, copies = grown, [group]
                _, va = stratified_split(torch.zeros(41, dtype=torch.int64), 0.2, 0, grown_keys, method, copies)
                after = {grown[i] for i in va.tolist()}
                assert (copy in after) == (original in after)  # one image, one side
                moved[method, original, copy] = (before ^ (after - {copy})) - {original}, original in before, \
                    original in after
    for (method, _, _), (others, was_held, is_held) in moved.items():
        if method == SPLIT_BY_NAME:
            assert len(others) <= (1 if was_held != is_held else 0) and (is_held or not was_held)
    assert any(was and not now for (method, *_), (_, was, now) in moved.items() if method == SPLIT_BY_FIRST_NAME)
    assert any(now and not was for (method, *_), (_, was, now) in moved.items() if method == SPLIT_BY_NAME)


def test_the_split_is_of_the_names_bytes_whatever_the_locale_decodes_them_to(monkeypatch):
    """A folder of "café" files split under a UTF-8 locale and again under a Latin-1 one (the
    same bytes, decoded to other strs): the same files held out, the same digests recorded."""
    import hashlib
    import os

    from cnnx.train.run import files_digest

    raw = [f"cat/caf\u00e9_{i:02d}.jpg".encode() for i in range(30)]
    labels = torch.zeros(30, dtype=torch.int64)
    utf8 = [b.decode("utf-8") for b in raw]
    _, va_utf8 = stratified_split(labels, 0.3, 0, utf8)
    digest_utf8 = files_digest(utf8)
    monkeypatch.setattr(os, "fsencode", lambda s: s.encode("latin-1", "surrogateescape") if isinstance(s, str) else s)
    latin1 = [b.decode("latin-1") for b in raw]
    _, va_latin1 = stratified_split(labels, 0.3, 0, latin1)
    assert va_latin1.tolist() == va_utf8.tolist()
    assert files_digest(latin1) == digest_utf8
    # a run of split 2 hashed the str's UTF-8: its digests are checked as it made them (in its locale)
    from cnnx.train.data import SPLIT_BY_FIRST_NAME

    made_then = hashlib.sha256("\n".join(latin1).encode("utf-8", "surrogateescape")).hexdigest()
    assert files_digest(latin1, split=SPLIT_BY_FIRST_NAME) == made_then != digest_utf8
    assert stratified_split(labels, 0.3, 0, latin1, SPLIT_BY_FIRST_NAME)[1].tolist() != va_utf8.tolist()


def test_config_resolution_and_unknown_names():
    cfg = resolve_config("seed-cnn", lr=0.5)
    assert cfg.lr == 0.5 and cfg.batch_size == RECIPES["seed-cnn"].get("batch_size", TrainConfig.batch_size)
    with pytest.raises(ConfigError, match="valid: .*epochs"):
        resolve_config("seed-cnn", epocs=3)
    with pytest.raises(ConfigError, match="--optimizer.*sgd, adamw, adam"):
        resolve_config("seed-cnn", optimizer="lion")
    with pytest.raises(Exception):
        cfg.lr = 1.0  # frozen


def test_load_image_folder_decodes_through_load_image_skips_and_caches(cifar_train_dir, tmp_path):
    root = copy_classes(cifar_train_dir, tmp_path / "data", ["cat", "dog"], 20)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.jpg").write_bytes(b"ignored: hidden")
    spec = make_spec(32, CIFAR_MEAN, CIFAR_STD)
    cache = tmp_path / "cache"
    d = load_image_folder(root, spec, progress=False, cache=cache, workers=2)
    assert d.class_names == ["cat", "dog"] and d.images.shape == (40, 3, 32, 32) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [0] * 20 + [1] * 20
    # Not an image by name (as `cnnx classify` decides): ignored and counted, not decoded.
    assert [os.path.basename(p) for p, _ in d.skipped] == ["broken.jpg"] and d.ignored == 2  # notes.txt, .hidden.jpg
    for i in (0, 25):  # bit-identical to the one implementation of the preprocess spec
        assert torch.equal(d.images[i], torch.from_numpy(load_image(d.paths[i], spec)[0]))
    assert d.paths == sorted(d.paths[:20]) + sorted(d.paths[20:])
    assert len(list((cache / "folders").iterdir())) == 1
    again = load_image_folder(root, spec, progress=False, cache=cache)
    assert torch.equal(again.images, d.images) and again.paths == d.paths and again.skipped == d.skipped
    os.remove(root / "cat" / "broken.jpg")  # a changed file list is a new cache entry
    before = list((cache / "folders").iterdir())
    third = load_image_folder(root, spec, progress=False, cache=cache, workers=1)
    after = list((cache / "folders").iterdir())
    assert third.skipped == [] and len(after) == 1 and after != before  # the older decoding replaced


def test_folder_layout(tmp_path):
    with pytest.raises(DataError, match="not found"):
        folder_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        folder_layout(tmp_path / "empty")
    for s in ("train", "val"):
        (tmp_path / "split" / s / "a").mkdir(parents=True)
    assert set(folder_layout(tmp_path / "split")) == {"train", "val"}
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.jpg").write_bytes(b"")
    assert set(folder_layout(tmp_path / "flat")) == {"all"}  # a class that happens to be called train


def test_evaluate_metrics_agree_with_a_direct_computation():
    torch.manual_seed(1)
    model = create_model("seed-cnn", 4).eval()
    x = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 4, (37,))
    m = loop.evaluate(model, x, y, mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=8)
    with torch.no_grad():
        logits = Uint8Input(model, CIFAR_MEAN, CIFAR_STD)(x)
    pred = logits.argmax(1)
    assert m["n"] == 37 and sum(map(sum, m["confusion"])) == 37
    for batch_size in (36, 37, 38):  # a last batch of one image, one batch, one batch not full
        again = loop.evaluate(model, x, y, mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=batch_size)
        assert again["n"] == 37 and again["top1"] == pytest.approx(m["top1"]) and again["confusion"] == m["confusion"]
    assert m["top1"] == pytest.approx((pred == y).float().mean().item())
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert m["top5"] == 1.0  # 4 classes: the true one is always among the top 4
    for c in range(4):
        sel = y == c
        if sel.any():
            assert m["per_class"][c] == pytest.approx((pred[sel] == c).float().mean().item())


def test_a_config_with_a_value_of_another_type_is_a_config_error():
    """A hand-edited config.json or last.pt ("epochs": "2") once gave a TypeError traceback on --resume."""
    from dataclasses import asdict

    from cnnx.train.config import ConfigError, TrainConfig, config_from_dict

    good = asdict(TrainConfig())
    assert config_from_dict({**good, "lr": 1}).lr == 1  # a whole number where a number belongs
    for key, value, words in (("epochs", "2", "not a whole number"), ("lr", "x", "not a number"),
                              ("pretrained", 1, "not a true or false"), ("epochs", True, "not a whole number"),
                              ("optimizer", 3, "not a text")):
        with pytest.raises(ConfigError, match=words):
            config_from_dict({**good, key: value})


def test_a_file_rewritten_with_its_size_and_mtime_put_back_is_decoded_again(tmp_path):
    """The cache was keyed by names, mtimes and sizes: a file rewritten in place (same size)
    with its mtime put back (touch -r, a copy keeping times) kept its stale cached pixels.
    The key holds each file's ctime and inode too, which no such copy can put back."""
    from PIL import Image

    root = tmp_path / "data"
    for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), colour).save(root / c / f"{i}.bmp")
    spec = make_spec(32, CIFAR_MEAN, CIFAR_STD)
    first = load_image_folder(root, spec, progress=False, cache=tmp_path / "cache", workers=1)
    target = root / "cat" / "0.bmp"
    st = target.stat()
    blue = tmp_path / "blue.bmp"
    Image.new("RGB", (32, 32), (0, 0, 200)).save(blue)
    with open(target, "r+b") as f:  # in place: the same inode, the same size
        f.write(blue.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    again = load_image_folder(root, spec, progress=False, cache=tmp_path / "cache", workers=1)
    assert first.images[0, 2, 0, 0] == 0 and again.images[0, 2, 0, 0] == 200 and again.images[0, 0, 0, 0] == 0


def test_a_killed_decode_worker_of_a_disk_cache_is_not_blamed_on_the_decoded_images():
    """With --cache disk the images go to the file: its line named their GiB as what filled memory."""
    import signal
    from types import SimpleNamespace

    from cnnx.train.data import _worker_death

    proc = SimpleNamespace(join=lambda timeout: None, exitcode=-signal.SIGKILL)
    spec = {"size": [224, 224]}
    to_memory = _worker_death(proc, 1000, spec, to_file=False)
    assert "the decoded images alone need 0.14 GiB" in to_memory and "--cache disk" in to_memory
    to_file = _worker_death(proc, 1000, spec, to_file=True)
    assert "killed by SIGKILL" in to_file and "GiB" not in to_file and "lower --workers" in to_file


def test_a_damaged_byte_in_a_checkpoint_is_unreadable_never_another_error(tmp_path):
    """One changed byte in a checkpoint's data.pkl (a disk or copy fault) made the weights-only
    unpickler raise TypeError or AttributeError, which every command printed as a traceback.
    Each damaged copy here (the tensor records at the end of the pickle, two byte values)
    loads or is UnreadableTorchFile, the one line the commands print."""
    import io
    import zipfile

    from cnnx.train.checkpoint import UnreadableTorchFile, load_tensors
    from tests._export_util import make_checkpoint

    with zipfile.ZipFile(make_checkpoint(tmp_path / "best.pt", "seed-cnn", ["a", "b", "c"])) as z:
        members = {name: z.read(name) for name in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    refused = 0
    for offset in range(len(members[pkl]) - 160, len(members[pkl])):
        for value in (32, 129):
            data = bytearray(members[pkl])
            data[offset] = value
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as w:
                for name, content in members.items():
                    w.writestr(name, bytes(data) if name == pkl else content)
            buf.seek(0)
            try:
                load_tensors(buf)
            except UnreadableTorchFile:
                refused += 1
    assert refused > 20


def _png_size(path) -> tuple:
    import struct

    return struct.unpack(">II", path.read_bytes()[16:24])


def test_per_class_csv_escapes_class_names_a_spreadsheet_would_run(tmp_path):
    """A class folder `=HYPERLINK(...)` was a live formula in per_class.csv (classify escaped it)."""
    import csv

    from cnnx.train.run import write_csvs

    names = ['=HYPERLINK("http://x.example","click")', "-2+3", "cat"]
    row = {"epoch": 1, "lr": 0.1, "train_per_class": [0.5, 0.5, 0.5], "val_per_class": [0.5, 0.5, 0.5]}
    row.update({k: 0.5 for k in ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                                 "seconds", "eval_seconds", "train_seconds_total")})
    write_csvs(tmp_path, [row], names)
    with open(tmp_path / "per_class.csv", newline="") as f:
        cells = [r["class"] for r in csv.DictReader(f)]
    assert cells[:3] == ["'" + names[0], "'-2+3", "cat"]


def test_plots_draw_class_names_with_dollar_signs_as_written(tmp_path):
    """matplotlib reads text between two $ as TeX math: a class `price_$1_$2` failed train's
    per-class and confusion plots (exit 1 after training) and evaluate (a traceback)."""
    import matplotlib
    import numpy as np

    from cnnx.train import plots

    names = ["price_$1_$2", "$5 & $10 notes", "cat"]
    plots.plot_confusion(np.eye(3, dtype=int) * 4, names, tmp_path / "c.png", title="confusion of $x_{1}$")
    plots.plot_per_class(names, [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], tmp_path / "p.png")
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0
    assert matplotlib.rcParams["text.parse_math"]  # a program's own figures are left as they were


def test_plots_of_many_long_or_unprintable_class_names_stay_small_and_quiet(tmp_path):
    """A figure sized to name every class grew with the classes squared: 1,000 classes asked for a
    60,700 x 55,000 px canvas and ended the run in MemoryError; a 216-character name left the
    matrix a corner of a 2,287 px wide margin; a name in a script the font lacks printed two
    warning lines a glyph on the run's stderr."""
    import warnings

    import numpy as np

    from cnnx.train import plots

    names = ["日本語クラス", "a" * 216, "cat"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        plots.plot_confusion(np.eye(3, dtype=int) * 4, names, tmp_path / "c3.png")
        plots.plot_per_class(names, [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], tmp_path / "p3.png")
    assert max(_png_size(tmp_path / "c3.png")) < 900 and max(_png_size(tmp_path / "p3.png")) < 900

    n = 1000
    names = [f"class {i}" for i in range(n)]
    plots.plot_confusion(np.eye(n, dtype=int) * 3, names, tmp_path / "c.png")
    plots.plot_per_class(names, None, np.full(n, 0.5), tmp_path / "p.png")
    for png in ("c.png", "p.png"):
        w, h = _png_size(tmp_path / png)
        assert w * h < 3_000_000, (png, w, h)


def test_a_val_top1_tie_goes_to_the_lower_val_loss():
    """On a small validation set the first epochs often tie (a net that guesses one class):
    best.pt kept the first of them, whatever its loss, and patience ran out on a falling loss."""
    from cnnx.train.run import State

    s = State()
    for epoch, (top1, loss) in enumerate([(0.32, 9e4), (0.32, 3.3), (0.32, 3.4), (0.40, 5.0), (0.40, 5.0)], 1):
        row = {"epoch": epoch, "train_seconds_total": float(epoch), "val_loss": loss, "val_top1": top1}
        s.record(row, {"top1": top1, "loss": loss, "confusion": None}, None)
        assert s.best_epoch == [1, 2, 2, 4, 4][epoch - 1], (epoch, s.best_epoch)
    assert s.since_best == 1


def test_copies_of_a_file_are_held_out_together_and_copies_under_two_classes_are_said(cifar_subset, tmp_path):
    """Byte-identical copies under other names ("IMG_1 (1).jpg") were split apart: 19 of 31
    validation images had their copy in the training split; the same photo under two classes
    went unreported."""
    import hashlib
    import shutil

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.data import SPLIT_BY_NAME, load_splits

    data = tmp_path / "d"
    shutil.copytree(cifar_subset(20, classes=("airplane", "cat", "dog")), data)
    for f in sorted((data / "cat").iterdir()):
        shutil.copyfile(f, data / "cat" / f"copy_{f.name}")
    for f in sorted((data / "airplane").iterdir())[:3]:
        shutil.copyfile(f, data / "cat" / f"plane_{f.name}")
    s = load_splits({"data": str(data), "preprocess": make_spec(32, (0.5,) * 3, (0.25,) * 3), "val_fraction": 0.2,
                     "split_seed": 0, "split": SPLIT_BY_NAME, "cache_dir": str(tmp_path / "c")}, progress=False)

    def digest(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    files = [str(p) for p in sorted(data.rglob("*.jpg"))]
    trained = {digest(p) for p in set(files) - {str(p) for p in s.val_paths}}
    assert len(s.val_paths) >= 8 and not [p for p in s.val_paths if digest(p) in trained and "plane_" not in p
                                          and "/airplane/" not in p], s.val_paths
    assert "20 file(s) are byte-identical copies of another in their class: each on the same side of the " \
           "validation split as it" in s.notes, s.notes
    assert any(n.startswith("3 image(s) are filed, as byte-identical copies, under two or more classes (") for n in s.notes)
    split = tmp_path / "s"
    shutil.copytree(cifar_subset(20, classes=("airplane", "cat", "dog")), split / "train")
    shutil.copytree(cifar_subset(3, offset=20, classes=("airplane", "cat", "dog")), split / "val")
    shutil.copyfile(next((split / "train" / "dog").iterdir()), split / "val" / "dog" / "again.jpg")
    s = load_splits({"data": str(split), "preprocess": make_spec(32, (0.5,) * 3, (0.25,) * 3), "val_fraction": 0.2,
                     "split_seed": 0, "split": SPLIT_BY_NAME, "cache_dir": str(tmp_path / "c")}, progress=False)
    assert "1 val/ image(s) are byte-identical copies of train/ images: their val figures are not of unseen images" \
        in s.notes, s.notes
