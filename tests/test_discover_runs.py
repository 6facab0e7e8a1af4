"""Discovery.runs and pipeline.batched_runs (the classify path) against Discovery's items and
pipeline.batched (one item at a time): the same items, the same batches, on a tree where files
to classify, skips of every kind and subfolders interleave."""

from __future__ import annotations

import os
import random

import pytest

from cnnx.runtime.discover import Discovery, Found, holds_at_most
from cnnx.runtime.pipeline import batched, batched_runs, peek_files


def _tree(root, seed: int):
    rng = random.Random(seed)
    for folder in ("", "a", "a/b", "a-b", "c", "c/d/e"):
        os.makedirs(root / folder, exist_ok=True)
        for i in range(rng.randrange(0, 40)):
            kind = rng.random()
            path = root / folder / f"{rng.choice('ab-_.0')}{i:03d}"
            if kind < 0.7:
                path.with_suffix(".jpg").write_bytes(b"x")
            elif kind < 0.8:
                path.with_suffix(".txt").write_bytes(b"x")  # ignored, not a skip
            elif kind < 0.9:
                os.symlink(root / "c", path.with_suffix(".jpg"))  # a skip: symlink not followed
            else:
                os.mkfifo(path.with_suffix(".png"))  # a skip: not a regular file
    os.symlink(root / "missing", root / "a" / "dangling.jpg")


@pytest.mark.parametrize("seed", range(6))
def test_runs_and_batched_runs_match_the_items_path(tmp_path, seed):
    _tree(tmp_path, seed)
    roots = [str(tmp_path / "a"), str(tmp_path), str(tmp_path / "nope.jpg")]
    items = list(Discovery(roots))
    runs = list(Discovery(roots).runs())
    assert [i for run in runs for i in run] == items
    skips = [i for i in items if i.reason is not None]
    assert len(skips) >= 2 and len(skips) < len(items)
    for run in runs:  # a run is files to classify, or one skip
        assert run and (all(i.reason is None for i in run) or (len(run) == 1 and run[0].reason))
    for size in (1, 3, 7, 64):
        assert list(batched_runs(iter(runs), size)) == list(batched(iter(items), size))


@pytest.mark.parametrize("skips", [2100, 1900, 2047])
def test_a_long_stretch_of_skips_is_cut_as_batched_cuts_it(skips):
    items = [Found(f"s{i}", "skipped") for i in range(skips)] + [Found(f"f{i}") for i in range(300)]
    runs = [[i] for i in items[:skips]] + [items[skips:]]
    want = list(batched(iter(items), 256))
    assert len(want) >= 2
    assert list(batched_runs(runs, 256)) == want


def test_peek_files_counts_only_files_to_decode_and_leaves_the_rest_in_order():
    items = [Found("s0", "skipped")] + [Found(f"f{i}") for i in range(10)] + [Found("s1", "skipped")]
    want = list(batched(iter(items), 3))  # [s0 f0 f1 f2] [f3 f4 f5] [f6 f7 f8] [f9 s1]
    for files, taken, ended in ((0, 1, False), (3, 2, False), (8, 3, False), (9, 4, False), (10, 4, True),
                                (50, 4, True)):
        rest = batched(iter(items), 3)
        head, done = peek_files(rest, files)
        assert (head, done) == (want[:taken], ended), files
        assert head + list(rest) == want
    assert peek_files(iter([]), 5) == ([], True)


def test_holds_at_most_tells_few_files_only_where_it_needs_no_walk(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        (flat / f"{i}.jpg").write_bytes(b"x")
    (flat / "notes.txt").write_bytes(b"x")  # counted too: 6 entries
    one = flat / "0.jpg"
    assert holds_at_most([flat], 6) and not holds_at_most([flat], 5)
    assert holds_at_most([flat, one], 7) and not holds_at_most([flat, one], 6)
    assert holds_at_most([one], 1) and holds_at_most([], 0)
    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    for folder in (nested, nested / "a", nested / "a" / "b"):
        (folder / "x.jpg").write_bytes(b"x")
    assert holds_at_most([nested], 5) and not holds_at_most([nested], 4)  # 3 files and 2 folders' entries
    os.mkfifo(tmp_path / "fifo")
    os.symlink(one, flat / "link.jpg")
    for unsure in ([tmp_path / "missing.jpg"], [tmp_path / "fifo"], [flat]):
        assert not holds_at_most(unsure, 1000), unsure  # an error, not a file, a symlink inside


_NAMES = [b"a.jpg", b"A.JPG", b"b.Jpeg", b"..jpg", b".jpg", b".hidden.png", b"no-ext", b"x.txt", b"x.jpg.txt",
          b"\xc3\xa9.jpg", b"\xe6\x97\xa5.png", b"\xff\xfe.jpg", b"\x80b.jpg", b"\xc3.jpg", b"z-1.jpg", b"z.jpg",
          b"z_1.webp", b"Z.tif", b"1.jpe", b"a b.jpg", b"jpg", b".", b"x."]


def _expected(folder: bytes, names) -> tuple:
    """What Discovery must give for a folder of regular files: the image names (is_image_name)
    in the order of their bytes, and the count of the others."""
    from cnnx.runtime.contract import is_image_name

    names = [n for n in names if n != b"."]
    images = sorted(n for n in names if is_image_name(os.fsdecode(n)))
    return [os.fsdecode(os.path.join(folder, n)) for n in images], len(names) - len(images)


@pytest.mark.parametrize("ascii_only", [False, True])
@pytest.mark.parametrize("with_subfolder", [False, True])
def test_a_folder_of_files_is_listed_in_byte_order_with_its_non_images_counted(tmp_path, with_subfolder, ascii_only):
    """The files-only fast path (no Python call a file; ASCII names sorted as str, others by
    their bytes) and the general one (a subfolder present) give the same order and count as a
    reference built from the bytes of the names."""
    names = [n for n in _NAMES if n.isascii()] if ascii_only else _NAMES
    folder = os.fsencode(tmp_path / "f")
    os.mkdir(folder)
    for name in names:
        if name != b".":
            open(os.path.join(folder, name), "wb").close()
    want, ignored = _expected(folder, names)
    if with_subfolder:
        os.mkdir(os.path.join(folder, b"zz-sub"))  # after every file name here: order unchanged
    d = Discovery([os.fsdecode(folder)])
    got = list(d)
    assert [f.path for f in got] == want and all(f.reason is None for f in got)
    assert d.ignored == ignored


@pytest.mark.parametrize("seed", range(3))
def test_image_names_keeps_what_is_image_name_keeps(seed):
    """contract.image_names (a folder's names at once; a fast path where they all end in one
    3-letter image extension) against is_image_name a name, on lists built to hit that path
    and its edges: hidden ".jpg", upper case, other and no extensions, ".jpg" inside a name."""
    from cnnx.runtime.contract import IMAGE_EXTENSIONS, image_names, is_image_name

    rng = random.Random(seed)
    exts = [*sorted(IMAGE_EXTENSIONS), ".JPG", ".Jpg", ".txt", "", ".tar.gz", ".jpgx", "jpg"]
    for _ in range(3000):
        common = rng.choice(exts)
        names = list(dict.fromkeys(
            "".join(rng.choice("ab.") for _ in range(rng.choice([0, 0, 1, 2, 5])))
            + (common if rng.random() < 0.8 else rng.choice(exts))
            for _ in range(rng.choice([0, 1, 2, 5]))))
        assert image_names(names) == [n for n in names if is_image_name(n)], names


@pytest.mark.parametrize("follow", [False, True])
def test_roots_that_overlap_yield_each_file_once(tmp_path, monkeypatch, follow):
    """A folder under several spellings, a folder inside another, a file inside one: each file
    once, in the order of the walk of the outer folder (the review's `DIR DIR/0000.jpg`, `DIR
    DIR/`, `DIR ./DIR` each gave every file twice). What the walk does not yield itself stays:
    a file with another extension, a symlinked file where symlinks are not followed."""
    monkeypatch.chdir(tmp_path)
    for folder in ("d", "d/sub", "other"):
        os.makedirs(folder)
        for name in ("a.jpg", "b.png"):
            (tmp_path / folder / name).write_bytes(b"x")
    (tmp_path / "d" / "notes.txt").write_bytes(b"x")
    os.symlink(tmp_path / "other" / "a.jpg", tmp_path / "d" / "link.jpg")
    os.symlink(tmp_path / "d", tmp_path / "alias")

    def paths(roots):
        return [(f.path, f.reason) for f in Discovery(roots, follow_symlinks=follow)]

    once = paths(["d"])
    assert len({p for p, _ in once}) == len(once)
    for roots in (["d", "d/"], ["d", "./d"], ["d", "d/sub"], ["d", "d/sub/a.jpg"], ["d/sub/a.jpg", "d"],
                  ["d", "d/../d", "alias", str(tmp_path / "d")], ["d/sub", "d/sub/../sub/a.jpg", "d"]):
        found = paths(roots)
        kept = sorted(roots, key=lambda r: (os.fsencode(r.rstrip("/")) + b"/"))[0]
        assert sorted(found) == sorted(paths([kept])), roots
        assert len({os.path.realpath(p) for p, r in found if r is None}) == len([p for p, r in found if r is None])
    # Given twice, the same file once; files given beside a folder they are not walked in stay.
    assert paths(["d/sub/a.jpg", "./d/sub/a.jpg"]) == [("./d/sub/a.jpg", None)]  # the first in the order
    assert paths(["other", "d/sub/a.jpg"]) == paths(["d/sub/a.jpg"]) + paths(["other"])
    assert ("d/notes.txt", None) in paths(["d", "d/notes.txt"])
    with_link = paths(["d", "d/link.jpg"])
    if follow:  # the walk classifies it: once
        assert with_link == once
    else:  # the file given by name is classified, and the walk's link to it is no skip
        assert ("d/link.jpg", "symlink not followed (use --follow-symlinks)") in once
        assert sorted(with_link) == sorted(f if f[0] != "d/link.jpg" else ("d/link.jpg", None) for f in once)


@pytest.mark.parametrize("follow", [False, True])
def test_a_root_reached_through_a_symlinked_folder_is_walked_once_and_never_a_skip(tmp_path, monkeypatch, follow):
    """The review's `outer outer/link/sub --follow-symlinks` (outer/link -> ../elsewhere) gave
    the files of sub two rows under one name (the resolved path is not under outer, the walk
    reaches it anyway); `outer outer/link` without it classified the link's files and listed
    the link as skipped, which failed --strict."""
    monkeypatch.chdir(tmp_path)
    for name in ("outer/a.jpg", "elsewhere/top.jpg", "elsewhere/sub/x.jpg"):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    os.symlink("../elsewhere", tmp_path / "outer" / "link")
    skip = ("outer/link", "symlink not followed (use --follow-symlinks)")

    def found(*roots):
        return [(f.path, f.reason) for f in Discovery(roots, follow_symlinks=follow)]

    walked = found("outer")
    assert walked == ([("outer/a.jpg", None), ("outer/link/sub/x.jpg", None), ("outer/link/top.jpg", None)] if follow
                      else [("outer/a.jpg", None), skip])
    for roots in (("outer", "outer/link"), ("outer", "outer/link/sub"), ("outer", "outer/link/sub/x.jpg"),
                  ("outer", "elsewhere")):
        got = found(*roots)
        assert len({os.path.realpath(p) for p, _ in got}) == len(got), (roots, got)
        assert (skip in got) == (not follow and roots[1] not in ("outer/link", "elsewhere")), (roots, got)
        def classified(rows):
            return {os.path.realpath(p) for p, reason in rows if reason is None}

        assert classified(got) == classified(found(*roots[1:])) | classified(walked), roots
    # Without --follow-symlinks a link to a folder only part of which is classified stays a skip;
    # with it, two links to one folder walk it once.
    # A link to a file the walk passes over (no image name) is its only name here: a skip.
    os.makedirs("outer/blobs")
    (tmp_path / "outer" / "blobs" / "3f9a2c").write_bytes(b"x")
    os.symlink("blobs/3f9a2c", tmp_path / "outer" / "cat.jpg")
    assert ("outer/cat.jpg", skip[1]) in found("outer") if not follow else ("outer/cat.jpg", None) in found("outer")
    os.remove(tmp_path / "outer" / "cat.jpg")
    os.symlink("../elsewhere", tmp_path / "outer" / "link2")
    assert found("outer") == (walked if follow else [*walked, ("outer/link2", skip[1])])
    assert (skip in found("outer", "elsewhere/sub")) != follow


def test_hidden_names_are_passed_over_and_counted_unless_named(tmp_path, monkeypatch):
    """macOS leaves a "._" AppleDouble file beside each photo it copies (and __MACOSX folders of
    them in zips): classify read each as an image and gave it an `open` errors row (and --strict
    failed). Hidden names, files and folders, are passed over and counted as train counts them;
    one named on the command line is classified, also beside a folder that holds it."""
    monkeypatch.chdir(tmp_path)
    for folder in ("d", "d/.thumbs", "d/__MACOSX", "d/sub", "d/@eaDir/a.jpg", "d/sub/$RECYCLE.BIN"):
        os.makedirs(folder)
    for name in ("d/a.jpg", "d/._a.jpg", "d/.DS_Store", "d/.thumbs/t.jpg", "d/__MACOSX/._a.jpg", "d/sub/b.jpg",
                 "d/sub/._b.jpg", "d/@eaDir/a.jpg/SYNOPHOTO_THUMB_S.jpg", "d/sub/$RECYCLE.BIN/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    walk = Discovery(["d"])
    assert [f.path for f in walk] == ["d/a.jpg", "d/sub/b.jpg"] and walk.ignored == 7
    assert [f.path for f in Discovery(["d", "d/.thumbs"])] == ["d/a.jpg", "d/sub/b.jpg", "d/.thumbs/t.jpg"]
    assert [f.path for f in Discovery(["d", "d/._a.jpg"])] == ["d/a.jpg", "d/sub/b.jpg", "d/._a.jpg"]
