import subprocess
import sys

import pytest
from click.testing import CliRunner

from cnnx import __version__
from cnnx.cli import COMMANDS, cli


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cnnx.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.output)\n"
        "heavy = [m for m in ('torch', 'torchvision', 'onnx', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_exit_2():
    r = CliRunner().invoke(cli, ["trian"])
    assert r.exit_code == 2


def test_every_option_of_every_command_has_help_text():
    import click

    ctx = click.Context(cli)
    missing = [
        f"{name} {'/'.join(p.opts)}"
        for name in COMMANDS
        for p in cli.get_command(ctx, name).params
        if isinstance(p, click.Option) and not p.help and "--help" not in p.opts
    ]
    assert not missing, missing


@pytest.mark.parametrize("args", [["train", "--data", "."], ["export", "x.pt"], ["evaluate", "x.pt", "--data", "."]])
def test_training_commands_without_torch_are_one_line(args, tmp_path):
    """The runtime-only install (`pip install .`, no torch) gave a 27-line traceback ending in
    ModuleNotFoundError for train, export and evaluate. The interpreter here has torch: it is
    hidden from this subprocess (None in sys.modules, as Python reports a missing module)."""
    (tmp_path / "x.pt").write_bytes(b"a checkpoint")
    code = "import sys; sys.modules['torch'] = None; from cnnx.cli import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: this command needs cnnx's training extra (torch is not installed): pip install 'cnnx[train]' "
        "(PyTorch first for a CUDA build of your choice)"], r.stderr


@pytest.mark.parametrize("args", [["classify", ".", "--model", "m.onnx", "-o", "p.csv"], ["info", "m.onnx"]])
@pytest.mark.parametrize("state", ["missing", "empty folder"])
def test_an_onnxruntime_that_cannot_be_used_is_one_line(args, state, tmp_path):
    """An `onnxruntime` folder left empty by an uninstall cut short imports as an empty namespace
    package: cnnx classify and info ended in an AttributeError traceback; a missing onnxruntime
    in a ModuleNotFoundError one. Both are simulated in sys.modules, as Python sees them."""
    (tmp_path / "m.onnx").write_bytes(b"a model")
    fake = ("None" if state == "missing"
            else "types.ModuleType('onnxruntime'); sys.modules['onnxruntime'].__path__ = ['/x/onnxruntime']")
    code = f"import sys, types; sys.modules['onnxruntime'] = {fake}; from cnnx.cli import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    why = "is an empty folder, /x/onnxruntime" if state == "empty folder" else "cannot be imported"
    assert lines[0].startswith(f"Error: onnxruntime {why}") and "pip install --force-reinstall" in lines[0]
    assert not (tmp_path / "p.csv").exists()


def test_a_rank_left_in_the_environment_without_a_launch_changes_nothing(tmp_path):
    """Schedulers (SLURM, Kubernetes' PyTorchJob) put RANK in the environment of every command
    of a job: only a torchrun launch (WORLD_SIZE > 1) makes a process another rank, and only
    train is launched once per rank. Else usage errors were silent, and train wrote into a run
    folder that was never made."""
    import os
    import time

    from PIL import Image

    from tests._runtime_util import photo_like
    from tests._train_util import seed_args

    def cnnx(args, **env):
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "cnnx", *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, **env})
        return r, time.monotonic() - started

    r, took = cnnx(["classify", tmp_path / "nothere", "--model", tmp_path / "m.onnx"], RANK="1")
    assert r.returncode == 2 and "nothere" in r.stderr and took < 2.5, (r.stderr, took)
    # Even in a launch, classify is no rank of it: it says its own errors.
    r, _ = cnnx(["classify", tmp_path / "nothere", "--model", tmp_path / "m.onnx"], RANK="1", WORLD_SIZE="2")
    assert r.returncode == 2 and "nothere" in r.stderr, r.stderr
    # train under a launch leaves its usage errors to rank 0 (test_train_e2e runs real launches)
    r, took = cnnx(["train", "--epochs", "0"], RANK="1", WORLD_SIZE="2")
    assert r.returncode == 2 and r.stderr == "" and took >= 2.5, (r.stderr, took)

    for c, cls in enumerate(("cat", "dog")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(photo_like(32, 32, seed=10 * c + i)).save(tmp_path / "data" / cls / f"{i}.png")
    r, _ = cnnx(seed_args(tmp_path / "data", tmp_path / "runs", "r0", tmp_path / "cache", "--epochs", "1"),
                WORLD_SIZE="2")  # and no RANK: a traceback once, and an empty run folder
    assert r.returncode == 2 and "WORLD_SIZE is 2, and its RANK must then be a whole number" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs" / "r0").exists()
    r, _ = cnnx(seed_args(tmp_path / "data", tmp_path / "runs", "r1", tmp_path / "cache", "--epochs", "1"), RANK="1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "r1" / "best.pt").is_file()


@pytest.mark.parametrize("command", ["classify", "train"])
def test_a_current_folder_removed_under_the_shell_is_one_line(command, tmp_path):
    """With it gone, classify -o /full/path failed with "No such file or directory" (the output's
    folder was there) and train died inside torch's import (an MKL FATAL line, exit 2)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    args = {"classify": [str(tmp_path), "--model", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.csv")],
            "train": ["--data", str(tmp_path), "--out", str(tmp_path / "runs")]}[command]
    r = subprocess.run(["bash", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "-", str(gone),
                        sys.executable, "-m", "cnnx", command, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "Error: the current folder no longer exists (removed after this shell entered it): cd to a folder that does"], \
        r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
