"""onnxruntime's telemetry is off in cnnx's processes unless the user chose otherwise.

onnxruntime 1.29+ on Linux writes a telemetry SQLite file under ~/.cache/Microsoft and uploads
it. Each test runs a fresh Python with HOME in a temporary folder and without the variables
that turn it off (the ORT ones, and the CI markers onnxruntime itself honours), then looks for
that folder. The control (onnxruntime imported without cnnx) shows the file is written there at
all: where it is not (an onnxruntime without telemetry), the others would prove nothing and skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _runtime_util import tiny_onnx_model
from cnnx import ONNXRUNTIME_TELEMETRY_OFF

# The CI markers onnxruntime 1.31 reads (strings of its library): any of them turns its telemetry off.
CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
              "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
              "ORT_RUNNING_UNIT_TESTS")


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS and k not in ONNXRUNTIME_TELEMETRY_OFF}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **extra)
    return env


def _telemetry_files(home: Path) -> list:
    root = home / ".cache" / "Microsoft"
    return sorted(str(p.relative_to(home)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _python(code: str, env: dict):
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


@pytest.fixture
def writes_telemetry(tmp_path):
    home = tmp_path / "control-home"
    home.mkdir()
    _python("import onnxruntime", _env(home))
    if not _telemetry_files(home):
        pytest.skip("this onnxruntime writes no telemetry file: nothing to turn off")


def test_cnnx_classify_writes_no_telemetry(writes_telemetry, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    model = tiny_onnx_model(tmp_path / "tiny.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "out.csv"
    # Decode processes as well: they are forked from a server that imports onnxruntime.
    subprocess.run([sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model), "-o", str(out),
                    "--device", "cpu", "--decode", "processes", "--workers", "2"],
                   env=_env(home), check=True, timeout=120, capture_output=True)
    assert len(out.read_text().splitlines()) == 4
    assert _telemetry_files(home) == []


def test_the_users_choice_is_kept(writes_telemetry, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    _python("import cnnx, onnxruntime", _env(home, ORT_DISABLE_TELEMETRY="0"))
    assert _telemetry_files(home) != []
