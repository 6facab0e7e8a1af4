"""cnnx.runtime.cuda.diagnose: the one-line reason the CUDA provider cannot run."""

from __future__ import annotations

import sys

import pytest

from cnnx.runtime import cuda


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


@pytest.mark.skipif(cuda.cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_no_driver_is_the_reason_here():
    import onnxruntime as ort

    status = cuda.diagnose()
    assert not status.usable
    if cuda.CUDA_PROVIDER in ort.get_available_providers():
        assert status.reason == "no NVIDIA driver here (libcuda cannot be loaded)"
    else:
        assert "CPU-only build" in status.reason


def test_library_names_follow_the_cuda_major():
    names = dict(cuda._library_names(13))
    if sys.platform != "win32":
        assert names == {"CUDA runtime": "libcudart.so.13", "cuBLAS": "libcublas.so.13", "cuDNN 9": "libcudnn.so.9"}


@pytest.mark.skipif(not cuda.cuda_driver_present(), reason="no NVIDIA driver on this machine")
def test_with_a_driver_the_status_names_versions():
    status = cuda.diagnose()
    assert status.reason and "\n" not in status.reason


def test_describe_is_one_line_for_cnnx_info():
    line = cuda.describe()
    assert "\n" not in line and line.startswith("CUDA provider: ")
    assert line.endswith(cuda.diagnose().reason)


@pytest.mark.skipif(cuda.cuda_driver_present(), reason="this machine has an NVIDIA driver")
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
