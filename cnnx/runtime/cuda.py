"""Why onnxruntime's CUDA provider can or cannot run here, in one line (`cnnx info`,
`cnnx classify --device cuda`).

onnxruntime itself only logs a multi-line error and falls back to the CPU. The causes users
hit most, checked in this order (each check is cheap: package metadata and dlopen, no GPU work):
  1. both `onnxruntime` and `onnxruntime-gpu` installed: they share the `onnxruntime` folder,
     and whichever was installed last wins (often the CPU-only one);
  2. a CPU-only onnxruntime (no CUDAExecutionProvider at all);
  3. no NVIDIA driver (libcuda cannot be loaded), or a driver older than the CUDA major
     version this onnxruntime-gpu was built for;
  4. the CUDA runtime / cuBLAS / cuDNN libraries of that major version not loadable (the
     `nvidia-*` wheels that `pip install 'cnnx[gpu]'` brings are preloaded first).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from cnnx.runtime.contract import CUDA_PROVIDER, cuda_driver_present

INSTALL_HINT = "pip install 'cnnx[gpu]'"
# Distributions that install the `onnxruntime` package folder; two of them at once clash.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")


@dataclass(frozen=True)
class CudaStatus:
    usable: bool  # every check passed: a session asking for CUDA should get it
    reason: str  # one line: what was found (when usable) or what is missing and how to fix it


def installed_ort_distributions(path=None) -> list:
    """Names of installed distributions that provide the `onnxruntime` package (path: the
    sys.path-like list to search, default sys.path)."""
    import importlib.metadata as md

    names = set()
    for dist in md.distributions(path=path) if path is not None else md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ORT_DISTRIBUTIONS:
            names.add(name)
    return sorted(names)


def _loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def driver_cuda_version() -> int | None:
    """The CUDA version the driver supports (e.g. 13000 for 13.0), or None without a driver."""
    for name in {"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",)}.get(sys.platform, ()):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    return None


def _library_names(major: int):
    """(what, soname) of the libraries the CUDA provider needs, for this platform."""
    if sys.platform == "win32":
        return (("CUDA runtime", f"cudart64_{major}0.dll"), ("cuBLAS", f"cublas64_{major}.dll"),
                ("cuDNN 9", "cudnn64_9.dll"))
    return (("CUDA runtime", f"libcudart.so.{major}"), ("cuBLAS", f"libcublas.so.{major}"),
            ("cuDNN 9", "libcudnn.so.9"))


def diagnose(*, dist_path=None) -> CudaStatus:
    """Check the causes listed in the module docstring, in order; the first that fails is the
    reason. dist_path: where to look for installed distributions (default sys.path)."""
    dists = installed_ort_distributions(dist_path)
    if len(dists) > 1:
        return CudaStatus(False, f"{' and '.join(dists)} are installed together and overwrite each other's files: "
                                 f"pip uninstall -y {' '.join(dists)} && {INSTALL_HINT}")
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return CudaStatus(False, f"this onnxruntime ({ort.__version__}) is the CPU-only build: {INSTALL_HINT}")
    if not cuda_driver_present():
        return CudaStatus(False, "no NVIDIA driver here (libcuda cannot be loaded)")
    built_for = getattr(ort, "cuda_version", None)
    built_for = built_for() if callable(built_for) else built_for
    try:
        major = int(str(built_for).split(".")[0])
    except ValueError:
        major = None
    supported = driver_cuda_version()
    if major is not None and supported is not None and supported // 1000 < major:
        return CudaStatus(False, f"the NVIDIA driver supports CUDA {supported // 1000}.{supported % 1000 // 10}, "
                                 f"this onnxruntime-gpu needs CUDA {major}: update the driver")
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # the nvidia-* wheels' libraries, when installed
        except Exception:  # noqa: BLE001 - what is still missing is named below
            pass
    if major is not None:
        for what, soname in _library_names(major):
            if not _loads(soname):
                other = next((m for m in (major - 1, major + 1) if _loads(soname.replace(str(major), str(m), 1))), None)
                found = f" (found CUDA {other}'s, the wrong major version)" if other and what != "cuDNN 9" else ""
                return CudaStatus(False, f"{what} library {soname} for CUDA {major} cannot be loaded{found}: {INSTALL_HINT}")
    return CudaStatus(True, f"onnxruntime {ort.__version__} built for CUDA {built_for}, driver supports "
                            f"{'?' if supported is None else f'{supported // 1000}.{supported % 1000 // 10}'}")
