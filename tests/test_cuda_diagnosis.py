"""cnnx.runtime.cuda.diagnose: the one-line reason the CUDA provider cannot run."""

from __future__ import annotations

import sys

import pytest

from cnnx.runtime import cuda
from cnnx.runtime.contract import cuda_driver_present


def _dist_info(site, name, version):
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_both_onnxruntime_packages_installed_is_named(tmp_path):
    # What pip leaves after `pip install onnxruntime onnxruntime-gpu`: two dist-infos, one folder.
    _dist_info(tmp_path, "onnxruntime", "1.31.1")
    _dist_info(tmp_path, "onnxruntime-gpu", "1.31.1")
    _dist_info(tmp_path, "numpy", "2.0.0")
    status = cuda.diagnose(dist_path=[str(tmp_path)])
    assert not status.usable
    assert "onnxruntime and onnxruntime-gpu are installed together" in status.reason
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in status.reason
    assert "\n" not in status.reason


def test_one_package_is_not_a_clash(tmp_path):
    _dist_info(tmp_path, "onnxruntime-gpu", "1.31.1")
    assert cuda.installed_ort_distributions([str(tmp_path)]) == ["onnxruntime-gpu"]


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_no_driver_is_the_reason_here():
    import onnxruntime as ort

    status = cuda.diagnose()
    assert not status.usable
    if cuda.CUDA_PROVIDER in ort.get_available_providers():
        assert status.reason.startswith("no usable NVIDIA driver here (libcuda cannot be loaded: libcuda.so")
    else:
        assert "CPU-only build" in status.reason


def test_library_names_follow_the_cuda_major():
    names = dict(cuda._library_names(13))
    if sys.platform != "win32":
        assert names == {"CUDA runtime": "libcudart.so.13", "cuBLAS": "libcublas.so.13", "cuDNN 9": "libcudnn.so.9"}


@pytest.mark.skipif(not cuda_driver_present(), reason="no NVIDIA driver on this machine")
def test_with_a_driver_the_status_names_versions():
    status = cuda.diagnose()
    assert status.reason and "\n" not in status.reason


def test_describe_is_one_line_for_cnnx_info():
    line = cuda.describe()
    assert "\n" not in line and line.startswith("CUDA provider: ")
    assert line.endswith(cuda.diagnose().reason)


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_tensorrt_diagnosis_names_the_cuda_cause_first():
    # TensorRT runs on the CUDA provider's libraries: without CUDA, that is the reason.
    assert cuda.diagnose_tensorrt() == cuda.diagnose()


def test_tensorrt_clash_of_packages_is_named_first(tmp_path):
    _dist_info(tmp_path, "onnxruntime", "1.31.1")
    _dist_info(tmp_path, "onnxruntime-gpu", "1.31.1")
    status = cuda.diagnose_tensorrt(dist_path=[str(tmp_path)])
    assert not status.usable and "installed together" in status.reason


def test_the_two_packages_in_different_folders_do_not_clash(tmp_path):
    # onnxruntime-gpu installed with --target ahead of a system onnxruntime: the first on the
    # path is imported whole; nothing was overwritten (how the GPU benchmark brings its wheel).
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _dist_info(tmp_path / "a", "onnxruntime-gpu", "1.31.1")
    _dist_info(tmp_path / "b", "onnxruntime", "1.30.0")
    path = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert cuda.installed_ort_distributions(path) == ["onnxruntime", "onnxruntime-gpu"]
    assert cuda.clashing_ort_distributions(path) == []
    assert "installed together" not in cuda.diagnose(dist_path=path).reason


_SESSION_SCRIPT = """
import sys
import onnxruntime as ort
from cnnx.runtime import cuda, gpudecode
quiet = sys.argv[1] == "quiet"
providers = [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
options = ort.SessionOptions()
options.log_severity_level = 3
model = gpudecode.resize_model_bytes(1)
s = cuda.new_session(ort, model, options, providers) if quiet else ort.InferenceSession(model, options, providers=providers)
print(s.get_providers()[0])
"""


def test_a_gpu_session_is_made_without_onnxruntime_log_lines():
    # onnxruntime 1.31 logs through its default logger, which the session's options do not
    # reach: a warning for every CUDA provider given options, and where CUDA cannot load, a
    # multi-line error. cnnx makes its GPU sessions through cuda.new_session, quiet.
    import subprocess

    import onnxruntime as ort

    def run(mode):
        r = subprocess.run([sys.executable, "-W", "ignore", "-c", _SESSION_SCRIPT, mode],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r

    quiet = run("quiet")
    assert "onnxruntime" not in quiet.stderr, quiet.stderr
    assert quiet.stdout.strip() in ("CUDAExecutionProvider", "CPUExecutionProvider")
    if "CUDAExecutionProvider" in ort.get_available_providers():  # the control: the same session made plainly
        assert "onnxruntime" in run("plain").stderr
    # and the logger is back at its default afterwards: a later plain session still logs
    after = subprocess.run([sys.executable, "-W", "ignore", "-c", _SESSION_SCRIPT.replace(
        "print(s.get_providers()[0])", "ort.InferenceSession(model, options, providers=providers)"), "quiet"],
        capture_output=True, text=True, timeout=60)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "onnxruntime" in after.stderr


# --- a driver library that loads but cannot run: a real libcuda.so.1 built here -------------------

_FAKE_LIBCUDA = r"""
#include <stdlib.h>
#include <string.h>
/* FAKE_CUDA=stub: every call returns 34 (CUDA_ERROR_STUB_LIBRARY), as the toolkit's stubs/libcuda.so
   does; FAKE_CUDA=nogpu: a CUDA 13.0 driver that starts and counts 0 devices; FAKE_CUDA=onegpu: 1
   device, and none of the rest of the driver API (onnxruntime's CUDA provider library, which
   links against it, then cannot be loaded). */
static int stub(void) { const char *m = getenv("FAKE_CUDA"); return !m || (strcmp(m, "nogpu") && strcmp(m, "onegpu")); }
int cuDriverGetVersion(int *v) { if (stub()) return 34; *v = 13000; return 0; }
int cuInit(unsigned flags) { return stub() ? 34 : 0; }
int cuDeviceGetCount(int *n) { if (stub()) return 34; *n = strcmp(getenv("FAKE_CUDA"), "onegpu") ? 0 : 1; return 0; }
"""


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    """A folder holding a libcuda.so.1 compiled from _FAKE_LIBCUDA (dlopen finds it through
    LD_LIBRARY_PATH in a subprocess)."""
    import shutil
    import subprocess

    if sys.platform != "linux" or shutil.which("cc") is None:
        pytest.skip("needs Linux and a C compiler to build the stand-in driver library")
    if cuda_driver_present():
        pytest.skip("this machine has an NVIDIA driver: the real one would be found first")
    folder = tmp_path_factory.mktemp("fakecuda")
    (folder / "fake.c").write_text(_FAKE_LIBCUDA)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "fake.c")], check=True)
    return folder


def _with_driver(folder, mode, args, **env):
    import os
    import subprocess

    env = {**os.environ, "LD_LIBRARY_PATH": str(folder), "FAKE_CUDA": mode, **env}
    if "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=180)


def test_a_driver_library_that_cannot_run_is_named_not_passed(fake_driver, tmp_path):
    """The toolkit's stub libcuda and a driver that sees no GPU passed the check: --device cuda
    then guessed the cause, --device tensorrt asked for TensorRT, cnnx info gave none."""
    import onnxruntime as ort

    if cuda.CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip("a CPU-only onnxruntime: that is the reason named first")
    probe = ["-c", "from cnnx.runtime import cuda; print(cuda.diagnose().reason); print(cuda.diagnose_tensorrt().reason)"]
    stub = _with_driver(fake_driver, "stub", probe)
    assert stub.returncode == 0 and stub.stdout.splitlines() == [
        "libcuda is the CUDA toolkit's stub library, not the NVIDIA driver's: install the driver, "
        "or take the stub folder off LD_LIBRARY_PATH"] * 2, stub.stderr
    nogpu = _with_driver(fake_driver, "nogpu", probe, CUDA_VISIBLE_DEVICES=None)
    assert nogpu.stdout.splitlines() == ["the NVIDIA driver sees no GPU"] * 2, nogpu.stderr
    hidden = _with_driver(fake_driver, "nogpu", probe, CUDA_VISIBLE_DEVICES="-1")
    assert hidden.stdout.splitlines()[0] == "the NVIDIA driver sees no GPU (CUDA_VISIBLE_DEVICES='-1')"


def test_a_libcuda_that_is_there_but_cannot_load_is_named_by_the_loader(fake_driver, tmp_path):
    """A libcuda.so.1 that does not load (here: not a library at all) was "no NVIDIA driver",
    the same words as none: the loader's own line now tells the two apart."""
    import onnxruntime as ort

    if cuda.CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip("a CPU-only onnxruntime: that is the reason named first")
    (tmp_path / "libcuda.so.1").write_bytes(b"not a shared library\n")
    r = _with_driver(tmp_path, "onegpu", ["-c", "from cnnx.runtime import cuda; print(cuda.diagnose().reason)"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(f"no usable NVIDIA driver here (libcuda cannot be loaded: "
                                       f"{tmp_path / 'libcuda.so.1'}: "), r.stdout


def test_a_provider_library_that_cannot_load_is_named_where_the_session_falls_back(fake_driver, tmp_path):
    """Past every named check (driver, GPU, cuda runtime, cuBLAS, cuDNN), the provider library
    itself links more (cuRAND, cuFFT, the driver API): its loader error is the reason given,
    not "no usable GPU visible?"."""
    import onnxruntime as ort

    from tests._runtime_util import tiny_onnx_model

    probe = _with_driver(fake_driver, "onegpu", ["-c", "from cnnx.runtime import cuda; print(cuda.diagnose().usable)"])
    if cuda.CUDA_PROVIDER not in ort.get_available_providers() or probe.stdout.strip() != "True":
        pytest.skip("the CUDA runtime, cuBLAS or cuDNN wheels are not installed here")
    model = tiny_onnx_model(tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "a.jpg")
    r = _with_driver(fake_driver, "onegpu", ["-m", "cnnx", "classify", str(tmp_path / "imgs"), "--model", str(model),
                                             "--device", "cuda"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: --device cuda: onnxruntime's CUDA provider library cannot be loaded (")
    assert lines[0].endswith(f"): {cuda.INSTALL_HINT}") and "symbol" in lines[0], lines[0]  # the stand-in's gaps


def test_cuda_causes_stay_off_stdout_and_are_one_line(fake_driver, tmp_path):
    """Where a driver is present, onnxruntime's preload printed a line for each CUDA library it
    missed to stdout: into `cnnx classify`'s CSV and `cnnx info --json`. stdout now holds only
    the rows and the JSON, and `cnnx info` names the CUDA cause whatever the build."""
    import csv
    import json

    from tests._runtime_util import tiny_onnx_model

    model = tiny_onnx_model(tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 90, 20)).save(folder / f"{i}.jpg")
    info = _with_driver(fake_driver, "nogpu", ["-m", "cnnx", "info", "--json", str(model)])
    assert info.returncode == 0, info.stderr
    providers = json.loads(info.stdout)["providers"]
    assert providers["CUDAExecutionProvider"] == "no (the NVIDIA driver sees no GPU)", providers
    rows = _with_driver(fake_driver, "nogpu", ["-m", "cnnx", "classify", str(folder), "--model", str(model)])
    assert rows.returncode == 0, rows.stderr
    assert next(csv.reader(rows.stdout.splitlines()))[:2] == ["path", "label"] and len(rows.stdout.splitlines()) == 4
    cuda_run = _with_driver(fake_driver, "stub", ["-m", "cnnx", "classify", str(folder), "--model", str(model),
                                                  "--device", "cuda"])
    assert cuda_run.returncode == 1 and cuda_run.stdout == "", cuda_run.stdout
    assert cuda_run.stderr.strip().splitlines() == [
        "Error: --device cuda: libcuda is the CUDA toolkit's stub library, not the NVIDIA driver's: install the "
        "driver, or take the stub folder off LD_LIBRARY_PATH"], cuda_run.stderr


def test_preload_keeps_onnxruntime_prints_off_stdout(capsys):
    """onnxruntime.preload_dlls prints what it misses; cnnx's stdout carries predictions."""
    import types

    def preload_dlls():
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    cuda.preload(types.SimpleNamespace(preload_dlls=preload_dlls))
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_ray_engine_device_cuda_without_cuda_is_one_line_before_ray_starts(tmp_path):
    """It started Ray, then ended in a 66-line actor traceback and 'SystemException'."""
    pytest.importorskip("ray")
    import time

    from click.testing import CliRunner

    from cnnx.cli import cli
    from tests._runtime_util import tiny_onnx_model

    model = tiny_onnx_model(tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "a.jpg")
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["classify", "--engine", "ray", "--device", "cuda", "--model", str(model),
                                 str(tmp_path / "imgs"), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [f"Error: --device cuda: {cuda.diagnose().reason}"]
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "p.csv").exists()
