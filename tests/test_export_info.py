"""`cnnx info` on hostile TorchScript / pt2 archives (issue 12, item 10): the cnnx.json member
is size-checked from the zip's header and read with a bounded read, so a member that inflates
to gigabytes is one line, not gigabytes of memory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from click.testing import CliRunner

from cnnx.cli import cli

MiB = 1 << 20


def _archive(path, member_bytes: int, head: bytes = b"{"):
    """A zip shaped like a torch archive whose cnnx.json inflates to member_bytes (spaces,
    ~1000x smaller deflated: 64 MiB is ~64 KiB on disk)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        with z.open("model/extra/cnnx.json", "w", force_zip64=True) as f:
            f.write(head)
            chunk = b" " * MiB
            for _ in range(member_bytes // MiB):
                f.write(chunk)
    return path


def _one_line(args):
    r = CliRunner().invoke(cli, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (r.exit_code, r.output)
    assert "Traceback" not in r.output and r.stdout == ""
    return lines[0]


def test_info_refuses_an_inflating_metadata_member_from_its_header(tmp_path):
    bomb = _archive(tmp_path / "bomb.pt2", 64 * MiB)
    assert bomb.stat().st_size < 2 * MiB  # the bomb is small on disk
    line = _one_line(["info", str(bomb)])
    assert "cnnx.json" in line and "64.0 MiB" in line and "16 MiB" in line

    # measured in a fresh process: the peak memory stays far below the member's 64 MiB
    code = ("import resource, sys\nfrom cnnx.cli import main\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    main(['info', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 32, (grown_mib, out.stderr)


def test_info_refuses_metadata_that_is_not_a_json_object(tmp_path):
    listed = tmp_path / "list.pt"
    with zipfile.ZipFile(listed, "w") as z:
        z.writestr("model/extra/cnnx.json", b"[1, 2]")
    assert "not a JSON object" in _one_line(["info", str(listed)])
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("model/extra/cnnx.json", b"{not json")
    assert "cannot read the metadata" in _one_line(["info", str(broken)])


def test_crafted_metadata_is_one_line_for_info_and_classify(tmp_path):
    """Metadata values that once gave tracebacks: a view count of "²" (str.isdigit takes it,
    int() does not), JSON nested 100,000 deep (RecursionError), an archive's cnnx.inputs that
    is not a list of tensors."""
    import json

    import onnx

    from tests._runtime_util import tiny_onnx_model

    good = tiny_onnx_model(tmp_path / "good.onnx")
    deep = "[" * 100_000 + "]" * 100_000

    def with_meta(name, **values):
        proto = onnx.load(str(good))
        props = {p.key: p for p in proto.metadata_props}
        for key, value in values.items():
            props[key].value = value
        onnx.save(proto, str(tmp_path / name))
        return tmp_path / name

    views = with_meta("views.onnx", **{"cnnx.tta_views": "\u00b2"})
    names = with_meta("names.onnx", **{"cnnx.class_names": deep})
    # Valid JSON, but no output can write the name (the review's "\ud800": a traceback, a CSV
    # left with its header only, and `cnnx info` a traceback too).
    surrogate = with_meta("surrogate.onnx", **{"cnnx.class_names": json.dumps(["a", "\ud800"])})
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(images / "a.png")
    for model, needle in ((views, "cnnx.tta_views must be a whole number"), (names, "JSON nested too deep"),
                          (surrogate, "class name 2 is not UTF-8 text")):
        r = CliRunner().invoke(cli, ["classify", str(images), "--model", str(model), "-o", str(tmp_path / "o.csv")])
        assert r.exit_code == 1 and needle in r.stderr and "Traceback" not in r.output, r.output
        assert not (tmp_path / "o.csv").exists()
    r = subprocess.run([sys.executable, "-m", "cnnx", "info", str(surrogate)], capture_output=True)
    assert r.returncode == 0 and b"2 classes: a, \\ud800" in r.stdout and not r.stderr, r
    r = CliRunner().invoke(cli, ["info", str(views)])
    assert r.exit_code == 0 and "views:    1 per image" in r.stdout, r.output
    for name, payload in (("inputs.pt", json.dumps({"cnnx.inputs": [1, "x"]})),
                          ("views.pt", json.dumps({"cnnx.tta_views": "\u00b2"}))):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("model/extra/cnnx.json", payload)
            z.writestr("model/data.pkl", b"\x80\x02}q\x00.")
    assert "bad cnnx.inputs" in _one_line(["info", str(tmp_path / "inputs.pt")])
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "views.pt")])
    assert r.exit_code == 0 and "views:    1 per image" in r.stdout, r.output


def test_a_model_of_an_opset_onnxruntime_lacks_is_said_with_the_reason_not_a_cpp_signature(tmp_path):
    """onnxruntime's message begins with the C++ function that raised it (a source path and a
    signature of ~250 characters): the line, cut at its limit, lost the reason."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])  # one past onnxruntime 1.31's
    model.ir_version = 10
    onnx.save(model, tmp_path / "m.onnx")
    for args in (["info", str(tmp_path / "m.onnx")], ["classify", str(tmp_path), "--model", str(tmp_path / "m.onnx")]):
        line = _one_line(args)
        assert "onnxruntime_src" not in line and "::" not in line, line
        assert "Opset 27" in line, line


def test_info_writes_no_escape_sequence_a_model_holds(tmp_path):
    """A downloaded model's metadata went to the terminal raw: ESC]0;...BEL retitled the window,
    ESC[2J cleared the screen (and OSC reaches a redirected file too: click strips only CSI)."""
    import onnx

    from tests._runtime_util import tiny_onnx_model

    proto = onnx.load(str(tiny_onnx_model(tmp_path / "good.onnx")))
    props = {p.key: p for p in proto.metadata_props}
    props["cnnx.version"].value = "\x1b]0;PWNED\x07\x1b[2J1.0"
    onnx.save(proto, str(tmp_path / "m.onnx"))
    r = subprocess.run([sys.executable, "-m", "cnnx", "info", str(tmp_path / "m.onnx")], capture_output=True)
    assert r.returncode == 0 and b"\x1b" not in r.stdout + r.stderr and b"\x07" not in r.stdout, r
    assert b"cnnx.version: \\x1b]0;PWNED\\x07\\x1b[2J1.0" in r.stdout, r.stdout
