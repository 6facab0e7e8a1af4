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
