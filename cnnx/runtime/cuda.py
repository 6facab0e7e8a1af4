"""Why onnxruntime's CUDA provider can or cannot run here, in one line (`cnnx info`,
`cnnx classify --device cuda|tensorrt`).

onnxruntime itself only logs a multi-line error and falls back to the CPU. The causes users
hit most, checked in this order (each check is cheap: package metadata and dlopen, no GPU work):
  1. both `onnxruntime` and `onnxruntime-gpu` installed into one folder: they share the
     `onnxruntime` package folder, and whichever was installed last wins (often the CPU-only one);
  2. a CPU-only onnxruntime (no CUDAExecutionProvider at all);
  3. no NVIDIA driver (libcuda cannot be loaded: the loader's line tells a missing library
     from one that is there and broken), a libcuda that loads but cannot start (the
     CUDA toolkit's stub library, a driver that does not match its kernel module), a driver
     that sees no GPU (CUDA_VISIBLE_DEVICES), or a driver older than the CUDA major version
     this onnxruntime-gpu was built for;
  4. the CUDA runtime / cuBLAS / cuDNN libraries of that major version not loadable (the
     `nvidia-*` wheels that `pip install 'cnnx[gpu]'` brings are preloaded first).
Where a session still falls back to the CPU after these, provider_library_problem names what
else the provider's own library lacks (cuRAND, cuFFT, ...): asked only then, as an explanation,
so that a check of cnnx's own can never stop a provider that loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import platform
import re
import signal
import sys
from dataclasses import dataclass

from cnnx.runtime.contract import CPU_PROVIDER, CUDA_PROVIDER, driver_library, load_driver_library
from cnnx.runtime.files import cache_root, first_line, sha256_of, sigint_held, signals_blocked

INSTALL_HINT = "pip install 'cnnx[gpu]'"
# What cnnx's own install brings (pyproject.toml's dependencies).
PLATFORM_ORT = "onnxruntime-gpu" if sys.platform == "linux" and platform.machine() == "x86_64" else "onnxruntime"
# Distributions that install the `onnxruntime` package folder; two of them at once clash.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")


@dataclass(frozen=True)
class CudaStatus:
    usable: bool  # every check passed: a session asking for CUDA should get it
    reason: str  # one line: what was found (when usable) or what is missing and how to fix it


def new_session(ort, model, options, providers):
    """ort.InferenceSession(model, options, providers=providers), with onnxruntime's default
    logger silenced meanwhile where a GPU provider is asked for. That logger, not the
    session's (options.log_severity_level), is where onnxruntime writes a multi-line error
    when a GPU provider cannot load (the callers word it in one line, or fall back to the CPU
    on purpose) and, in 1.31, a warning for every session whose CUDA provider gets options
    ("No registered plugin EP device found"). The logger is process-wide and has no getter:
    it goes back to onnxruntime's default, WARNING."""
    with _text_path(model) as model:
        if all((p if isinstance(p, str) else p[0]) == CPU_PROVIDER for p in providers):
            return ort.InferenceSession(model, options, providers=providers)
        ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(model, options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)


@contextlib.contextmanager
def _text_path(path):
    """The model's path as onnxruntime's bindings take it: text that UTF-8 can encode. A name
    that is not UTF-8 (its bytes are surrogates after os.fsdecode) goes through /proc/self/fd:
    of its open folder where only the folder's name is not (the model's external-data files
    stay beside it), else of the open file itself. Bytes are a serialized model, passed on."""
    if isinstance(path, (bytes, bytearray)):
        yield path
        return
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield text
        return
    folder, name = os.path.split(text)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        fd, shown = os.open(text, os.O_RDONLY), ""
    else:
        fd, shown = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)), "/" + name
    try:
        yield f"/proc/self/fd/{fd}{shown}"
    finally:
        os.close(fd)


def onnxruntime():
    """The onnxruntime module, or ModuleNotFoundError (name "onnxruntime", one line: cnnx.cli
    prints it) where it cannot be used: not installed, its folder left empty by an uninstall
    cut short (it then imports as an empty namespace package), or its library failing to load."""
    try:
        # A Ctrl-C, or a SIGTERM that cnnx turns into one, is an interrupt after the import, not the
        # ImportError ("initialization failed") its native init turns it into
        with sigint_held(), signals_blocked({signal.SIGTERM}):
            import onnxruntime as ort
    except ImportError as e:
        why = f"cannot be imported ({first_line(e)})"
    else:
        if hasattr(ort, "InferenceSession"):
            return ort
        why = f"is an empty folder, {list(ort.__path__)[0]} (an uninstall cut short?)"
    dists = installed_ort_distributions() or [PLATFORM_ORT]
    raise ModuleNotFoundError(f"onnxruntime {why}: pip install --force-reinstall --no-deps {dists[0]}",
                              name="onnxruntime")


def installed_ort_distributions(path=None) -> list:
    """Names of installed distributions that provide the `onnxruntime` package (path: the
    sys.path-like list to search, default sys.path)."""
    return sorted({name for name, _folder in _ort_distributions(path)})


def clashing_ort_distributions(path=None) -> list:
    """The onnxruntime distributions installed into one and the same folder (they overwrite
    each other's files there), or []. Two in different folders do not clash: the first on
    the path is imported whole (e.g. onnxruntime-gpu installed with --target before the
    system's CPU-only onnxruntime)."""
    by_folder = {}
    for name, folder in _ort_distributions(path):
        by_folder.setdefault(folder, set()).add(name)
    return next((sorted(names) for names in by_folder.values() if len(names) > 1), [])


def _ort_distributions(path):
    """(name, folder) of each onnxruntime distribution installed on path. Looked up by name (the
    finders match the dist-info folders' names), not by reading every installed distribution's
    metadata, a scan that grows with the environment and stood before every --device cuda run
    (benchmarks/results/classify_startup.json, "ort_distributions_s")."""
    import importlib.metadata as md

    for wanted in ORT_DISTRIBUTIONS:
        for dist in md.distributions(name=wanted, path=path) if path is not None else md.distributions(name=wanted):
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if name == wanted:
                yield name, str(dist.locate_file(""))


def _loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def _driver_call(lib, name: str, *args) -> int:
    """A driver API call's CUDA error code (0: success); -1 where the library lacks it."""
    try:
        return getattr(lib, name)(*args)
    except AttributeError:
        return -1


def driver_cuda_version() -> int | None:
    """The CUDA version the driver supports (e.g. 13000 for 13.0), or None without a driver."""
    lib = driver_library()
    version = ctypes.c_int(0)
    if lib is None or _driver_call(lib, "cuDriverGetVersion", ctypes.byref(version)) != 0:
        return None
    return version.value


# The driver API's errors that say why cuInit cannot start (cuda.h's CUresult).
_NO_DEVICE, _STUB_LIBRARY = 100, 34


def driver_problem() -> str | None:
    """Why the loaded driver library cannot run CUDA, in words (None: it starts and sees a GPU).
    cuInit and cuDeviceGetCount: what the CUDA provider does first, and cheap once done."""
    lib, why = load_driver_library()
    if lib is None:
        return f"no usable NVIDIA driver here (libcuda cannot be loaded: {why})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    err = _driver_call(lib, "cuInit", 0)
    if err == _STUB_LIBRARY:
        return "libcuda is the CUDA toolkit's stub library, not the NVIDIA driver's: install the driver, " \
               "or take the stub folder off LD_LIBRARY_PATH"
    if err == _NO_DEVICE:
        return f"the NVIDIA driver sees no GPU{hidden}"
    if err != 0:
        return f"the NVIDIA driver does not start (cuInit error {err}; nvidia-smi tells more)"
    count = ctypes.c_int(0)
    if _driver_call(lib, "cuDeviceGetCount", ctypes.byref(count)) == 0 and count.value == 0:
        return f"the NVIDIA driver sees no GPU{hidden}"
    return None


def _library_names(major: int):
    """(what, soname) of the libraries the CUDA provider needs, for this platform."""
    if sys.platform == "win32":
        return (("CUDA runtime", f"cudart64_{major}0.dll"), ("cuBLAS", f"cublas64_{major}.dll"),
                ("cuDNN 9", "cudnn64_9.dll"))
    return (("CUDA runtime", f"libcudart.so.{major}"), ("cuBLAS", f"libcublas.so.{major}"),
            ("cuDNN 9", "libcudnn.so.9"))


def preload(ort) -> None:
    """Load the CUDA / cuDNN libraries of the nvidia-* wheels (`pip install 'cnnx[gpu]'`), when
    installed, so the CUDA provider finds them; what is still missing, diagnose() names."""
    if hasattr(ort, "preload_dlls"):
        # It prints a line for each library it misses, to stdout: where cnnx writes predictions
        # and JSON. What is missing, diagnose() says in one line.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - a failed preload just means CUDA will not load
                pass


def provider_library_problem(ort) -> str | None:
    """The loader's error for onnxruntime's CUDA provider library (it links cuRAND, cuFFT,
    cuBLASLt, ... besides what diagnose() checks by name), None when it loads. Loaded after
    the shared provider library, globally, as onnxruntime loads them."""
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    names = {"win32": ("onnxruntime_providers_shared.dll", "onnxruntime_providers_cuda.dll")}.get(
        sys.platform, ("libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"))
    paths = [os.path.join(capi, n) for n in names]
    if not all(map(os.path.exists, paths)):
        return None  # another layout: the session's own load is the test
    try:
        ctypes.CDLL(paths[0], mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(paths[1])
    except OSError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def diagnose(*, dist_path=None) -> CudaStatus:
    """Check the causes listed in the module docstring, in order; the first that fails is the
    reason. dist_path: where to look for installed distributions (default sys.path)."""
    dists = clashing_ort_distributions(dist_path)
    if dists:
        return CudaStatus(False, f"{' and '.join(dists)} are installed together and overwrite each other's files: "
                                 f"pip uninstall -y {' '.join(dists)} && {INSTALL_HINT}")
    ort = onnxruntime()

    if CUDA_PROVIDER not in ort.get_available_providers():
        dists = installed_ort_distributions(dist_path) or ["onnxruntime"]
        return CudaStatus(False, f"this onnxruntime ({ort.__version__}) is the CPU-only build: "
                                 f"pip uninstall -y {' '.join(dists)} && {INSTALL_HINT}")
    problem = driver_problem()
    if problem is not None:
        return CudaStatus(False, problem)
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
    preload(ort)
    if major is not None:
        for what, soname in _library_names(major):
            if not _loads(soname):
                other = next((m for m in (major - 1, major + 1) if _loads(soname.replace(str(major), str(m), 1))), None)
                found = f" (found CUDA {other}'s, the wrong major version)" if other and what != "cuDNN 9" else ""
                return CudaStatus(False, f"{what} library {soname} for CUDA {major} cannot be loaded{found}: {INSTALL_HINT}")
    return CudaStatus(True, f"onnxruntime {ort.__version__} built for CUDA {built_for}, driver supports "
                            f"{'?' if supported is None else f'{supported // 1000}.{supported % 1000 // 10}'}")


def describe() -> str:
    """The line `cnnx info` prints about the CUDA provider."""
    status = diagnose()
    return f"CUDA provider: {'usable' if status.usable else 'not usable'}: {status.reason}"


# --- TensorRT -------------------------------------------------------------------------------
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# The libraries onnxruntime's TensorRT provider links against (TensorRT 10's sonames).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
TENSORRT_HINT = "pip install 'tensorrt-cu13-libs>=10,<11'"


def _tensorrt_wheel_folder():
    """Where the tensorrt-cu13-libs wheel keeps its libraries (not on the loader's path)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def load_tensorrt_libraries() -> str | None:
    """Load TensorRT 10's libraries globally (from the loader's path, else from the
    tensorrt-cu13-libs wheel), so the provider's own dlopen finds them by soname.
    -> None when they loaded, else the first soname that did not."""
    folder = _tensorrt_wheel_folder()
    for soname in TENSORRT_LIBRARIES:
        candidates = [soname] + ([os.path.join(folder, soname)] if folder else [])
        for name in candidates:
            try:
                ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
        else:
            return soname
    return None


def diagnose_tensorrt(*, dist_path=None) -> CudaStatus:
    """Why onnxruntime's TensorRT provider can or cannot run here: the CUDA checks first (it
    runs on the CUDA provider's libraries), then the provider itself, then TensorRT 10."""
    status = diagnose(dist_path=dist_path)
    if not status.usable:
        return status
    ort = onnxruntime()

    if TENSORRT_PROVIDER not in ort.get_available_providers():
        return CudaStatus(False, f"this onnxruntime ({ort.__version__}) has no TensorRT provider")
    missing = load_tensorrt_libraries()
    if missing is not None:
        return CudaStatus(False, f"TensorRT 10 library {missing} cannot be loaded: {TENSORRT_HINT}")
    return CudaStatus(True, f"TensorRT 10 libraries loaded; {status.reason}")


def gpu_identity(device_id: int = 0) -> str | None:
    """'<name>-<uuid prefix>' of a GPU through the driver library (no torch), for cache keys:
    an engine built for one card must not be loaded on another. None without a driver."""
    lib = driver_library()
    if lib is None:
        return None
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    uuid = ctypes.create_string_buffer(16)
    if (lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), device_id) != 0
            or lib.cuDeviceGetName(name, 256, device) != 0 or lib.cuDeviceGetUuid(uuid, device) != 0):
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.value.decode(errors="replace")).strip("-").lower()
    return f"{slug}-{uuid.raw.hex()[:12]}"


def tensorrt_options(model_path, batch_size: int, size, *, device_id: int = 0, gpu: str | None = None,
                     fp16: bool = False) -> dict:
    """Provider options for onnxruntime's TensorRT provider: engine and timing caches in
    <cache>/trt/<model sha256[:16]>-<gpu>-b<batch> (an engine is specific to the model, the card
    and the shape profile, so each gets its own folder and none is rebuilt over another), and
    one profile of batches 1..batch_size optimised for batch_size (cnnx classify's IOBinding path
    always runs batch_size; its plain path a batch's decoded files, and predict() may send
    fewer). fp16 off: the fp32 model keeps its fp32 numbers."""
    h, w = size
    gpu = gpu or gpu_identity(device_id) or f"gpu{device_id}"
    folder = cache_root() / "trt" / f"{sha256_of(model_path)[:16]}-{gpu}-b{batch_size}"
    shape = lambda n: f"images:{n}x3x{h}x{w}"  # noqa: E731
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(folder),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(batch_size),
        "trt_profile_max_shapes": shape(batch_size),
    }
