"""Batches through onnxruntime's IOBinding, several in flight: the GPU path of the pipeline.

`session.run(feed)` on CUDA copies every uint8 batch from pageable memory, waits for the
logits and only then returns, so upload, compute and the caller's work (softmax, top-k,
writing rows) take turns. Here each of `slots` (default SLOTS) slots owns

  - a host input buffer of one batch, page-locked when CUDA can give us one (the copy to
    the GPU then runs by DMA at full PCIe speed instead of through a staging buffer);
  - an input buffer of one batch on the session's device (an OrtValue), bound once as the
    model's uint8 input (4x fewer bytes over the bus than float32), into which each run
    first copies the host buffer (`OrtValue.update_inplace`). Never the host buffer bound
    directly: IOBinding copies an input that is not on the session's device at *bind* time,
    so every later run would reuse that first copy (on CUDA, tests/test_classify_gpu.py's
    agreement with the CPU failed that way);
  - an IOBinding whose output is bound to host memory, so the logits come back in the same
    `run_with_iobinding` call;

and each slot has a thread of its own that runs its batches (onnxruntime releases the GIL
during a run and allows concurrent runs of one session), so batch k+1 can be uploaded while
batch k computes and the caller writes the rows of batch k-1; a run's thread also does the
work on its own result that the caller gives it (`finish`: classify's softmax and top-k).
Results come back in submission order. Decoding overlaps all of this already (the decode
threads or processes). A batch goes to its slot's thread, and its result comes back, through
a queue.SimpleQueue each way (C code, no lock taken in Python): the caller's one thread bounds
the rate on a GPU, and a ThreadPoolExecutor's Futures, Conditions and Semaphore can cost it a
hand-over of the GIL at every lock (py-spy found it in `submit` a good part of the time, on the
CPU: benchmarks/results/gpu_path_loop_profile_cpu_e93bc56.txt; whether the GPU's steady state
gains is for its A/B run to say).

The same code runs on the CPU provider with plain host buffers (the tests exercise it there
against `session.run`); cnnx classify uses it only on CUDA and TensorRT, where it pays: the
CPU loop stays as it is (nothing to upload there; the shared 2-core CPU cannot show a gain).
benchmarks/gpu_classify.py measures the ceiling with 2 and SLOTS slots and the host memory kind on the GPU.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import sys
import threading
from collections import deque

import numpy as np

from cnnx.runtime.files import first_line

CUDA_DEVICES = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# Batches in flight. The caller's one thread waited on the oldest run a good part of its time
# with 2 (benchmarks/results/gpu_profile_airnet_e9f6c17.txt); 3 gave the CIFAR steady state more
# (benchmarks/results/gpu_steady_state_5906b62.json, same H100 run).
SLOTS = 3
# While batches run: a run's thread that leaves onnxruntime needs the GIL back to hand over
# its logits, and the caller's thread is then usually running Python (discovery, rows). At
# Python's default of 5 ms between forced switches, the run's thread can wait that long, the
# GPU idles, and the caller ends up waiting on it; with 0.5 ms it gets in sooner.
GIL_SWITCH_S = 0.0005


_NO_MORE = object()  # what next(jobs, ...) gives once the jobs are done


class RunFailed(Exception):
    """onnxruntime failed on a batch (out of GPU memory, an op that cannot run this input):
    the first line of its error."""


class RunnerClosed(Exception):
    """The runner was closed (from another thread) while a run_in_order had batches left to
    start: they are not run."""


class HostBuffer:
    """A uint8 numpy array of `shape` in host memory; `kind` says which: "pinned-onnxruntime"
    (onnxruntime's HOST_ACCESSIBLE allocator of its CUDA device), "pinned-cudart"
    (cudaHostAlloc of the CUDA runtime onnxruntime loaded), or "pageable" (numpy)."""

    def __init__(self, shape, pinned: bool):
        self.shape = tuple(shape)
        self._owner = None  # what keeps the memory alive (an OrtValue or a cudart pointer)
        self._free = None
        self.kind = "pageable"
        nbytes = int(np.prod(self.shape))
        if pinned:
            for alloc in (_pinned_by_onnxruntime, _pinned_by_cudart):
                got = alloc(nbytes)
                if got is not None:
                    self.kind, pointer, self._owner, self._free = got
                    self.array = _view(pointer, self.shape)
                    return
        self.array = np.empty(self.shape, np.uint8)

    def close(self):
        self.array = None
        if self._free is not None:
            self._free()
            self._free = None
        self._owner = None


def _view(pointer: int, shape) -> np.ndarray:
    nbytes = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer)).reshape(shape)


def _pinned_by_onnxruntime(nbytes: int):
    """Page-locked memory from the CUDA provider's own host allocator (onnxruntime >= 1.23
    lists its devices in get_ep_devices and allocates their HOST_ACCESSIBLE memory)."""
    import onnxruntime as ort

    try:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == "CUDAExecutionProvider"]
        if not devices:
            return None
        info = devices[0].memory_info(ort.OrtDeviceMemoryType.HOST_ACCESSIBLE)
        if info is None:
            return None
        value = ort.OrtValue.ortvalue_from_shape_and_type([nbytes], np.uint8, memory_info=info)
        return "pinned-onnxruntime", value.data_ptr(), value, None
    except Exception:  # noqa: BLE001 - any refusal means: try the next way
        return None


def _pinned_by_cudart(nbytes: int):
    """cudaHostAlloc of the CUDA runtime library the CUDA provider runs on (loaded by then)."""
    import onnxruntime as ort

    from cnnx.runtime.cuda import _library_names

    built_for = getattr(ort, "cuda_version", None)
    built_for = built_for() if callable(built_for) else built_for
    try:
        lib = ctypes.CDLL(dict(_library_names(int(str(built_for).split(".")[0])))["CUDA runtime"])
    except (OSError, ValueError):
        return None
    pointer = ctypes.c_void_p()
    if lib.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes), 0) != 0 or not pointer.value:
        return None
    return "pinned-cudart", pointer.value, lib, lambda: lib.cudaFreeHost(pointer)


def session_device(session) -> tuple:
    """("cuda", device id) for a session on the CUDA or TensorRT provider, else ("cpu", 0)."""
    provider = session.get_providers()[0]
    if provider not in CUDA_DEVICES:
        return "cpu", 0
    return "cuda", int(session.get_provider_options().get(provider, {}).get("device_id", 0))


class BoundSlot:
    """One batch's host buffer, its copy on the session's device and the IOBinding that runs
    it; run() -> the logits."""

    def __init__(self, session, input_name: str, output_name: str, shape, pinned: bool):
        import onnxruntime as ort

        self.host = HostBuffer(shape, pinned)
        device, device_id = session_device(session)
        self.device_input = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.uint8, device, device_id)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(input_name, self.device_input)  # on its device: bound as is, no copy
        self.binding.bind_output(output_name, "cpu")

    def run(self, session, upload: bool = True):
        """upload=False runs on what the device buffer holds already (the benchmark's ceiling)."""
        try:
            if upload:
                self.device_input.update_inplace(self.host.array)  # from page-locked memory: DMA
            session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            return self.binding.copy_outputs_to_cpu()[0]
        except Exception as e:  # onnxruntime's own exception types
            raise RunFailed(first_line(e)) from e


class BoundRunner:
    """Runs fixed-shape uint8 batches (batch_size, 3, H, W) through `session` with `slots`
    in flight. pinned: page-locked host buffers (for CUDA; plain numpy on the CPU)."""

    def __init__(self, session, input_name: str, output_name: str, batch_size: int, size, *,
                 slots: int = SLOTS, pinned: bool = False):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        h, w = size
        self.session = session
        self.shape = (batch_size, 3, h, w)
        self._slots = [BoundSlot(session, input_name, output_name, self.shape, pinned) for _ in range(slots)]
        self._threads = []
        self._user = threading.Lock()  # held by the run that uses the slots (claim, release)
        # Held to fill a slot and queue its task, and by close() to mark the runner closed: a
        # task queued after close() had ended the slots' threads waited for ever, for a thread
        # that was gone, and its copy went into a freed buffer (a Classifier closed from
        # another thread while its run was reading the next batch).
        self._queueing = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # the process its threads run in
        # Each run's result carries its ticket: a result nobody took (its consumer was
        # interrupted while waiting for it) is dropped by the next wait on that slot, never
        # taken for another batch's.
        self._tickets = itertools.count()
        for i, slot in enumerate(self._slots):
            slot.todo, slot.done = queue.SimpleQueue(), queue.SimpleQueue()
            thread = threading.Thread(target=self._serve, args=(slot,), name=f"cnnx-infer_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def host_memory(self) -> str:
        return self._slots[0].host.kind

    def claim(self) -> bool:
        """Take the runner for one run of run_in_order (True), or False where another run has
        it: the slots hold one run's batches, and two runs sharing them would run each other's
        pixels and take each other's results; or in a process forked from its own, where its
        slots' threads are not (the run waited for them for ever). release() gives it back
        (from any thread)."""
        return os.getpid() == self._pid and self._user.acquire(blocking=False)

    def release(self):
        self._user.release()

    def run_in_order(self, jobs, images_of, finish=None):
        """Yield (job, logits) for each job in order; images_of(job) is its uint8 batch of
        exactly self.shape, or None for a job with nothing to run (its logits are None). A job
        is copied into a free slot and started before the oldest running one is waited for,
        so `slots` batches are in flight. The copy is made here, on the caller's thread, before
        the next job is taken from `jobs`: a job's images may be borrowed until then
        (procdecode's `lend`). Made on the run's thread instead, the caller waited for it for a
        share of its time on an H100 (benchmarks/results/gpu_profile_airnet_e9f6c17.txt): a hand-over
        to that thread and back, each needing the GIL, costs more than the copy.
        Python's thread switch interval is GIL_SWITCH_S (at most) until the generator ends.
        finish(job, logits): run on the run's thread once its logits are back (what it returns,
        or raises, comes instead of the logits): work on a batch's result off the caller's
        thread, which feeds the next batches meanwhile."""
        free, running = deque(self._slots), deque()
        _short_switch_interval(+1)

        def oldest():
            job, slot, ticket = running.popleft()
            if slot is None:
                return job, None
            ok, value = _result(slot, ticket)
            free.append(slot)
            if not ok:
                raise value
            return job, value

        jobs = iter(jobs)
        try:
            while True:
                job = next(jobs, _NO_MORE)
                if job is _NO_MORE:
                    break
                images = images_of(job)
                if images is None:
                    running.append((job, None, None))
                    continue
                if images.shape != self.shape or images.dtype != np.uint8:
                    raise ValueError(f"batch of {images.dtype} {images.shape}, expected uint8 {self.shape}")
                while not free:
                    yield oldest()
                slot = free.popleft()
                with self._queueing:  # uncontended but for a close(): no hand-over of the GIL
                    if self._closed:
                        raise RunnerClosed("the runner was closed while batches were left to run")
                    np.copyto(slot.host.array, images)
                    ticket = next(self._tickets)
                    slot.todo.put((ticket, job, finish))
                running.append((job, slot, ticket))
            while running:
                yield oldest()
        finally:
            _short_switch_interval(-1)
            for _job, slot, ticket in running:  # a consumer that stopped early: let its runs end
                if slot is not None:
                    _result(slot, ticket)

    def _serve(self, slot: BoundSlot):
        """A slot's thread: (ticket, job, finish) from slot.todo -> (ticket, True, result) or
        (ticket, False, the exception) into slot.done, until None."""
        while (task := slot.todo.get()) is not None:
            ticket, job, finish = task
            try:
                logits = slot.run(self.session)
                slot.done.put((ticket, True, logits if finish is None else finish(job, logits)))
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread, in order
                slot.done.put((ticket, False, e))

    def close(self):
        """End the slots' threads once the tasks queued before this call have run; a
        run_in_order with batches left to start raises RunnerClosed."""
        with self._queueing:
            self._closed = True
            for slot in self._slots:
                slot.todo.put(None)
        for thread in self._threads:
            thread.join()
        for slot in self._slots:
            slot.binding = slot.device_input = None
            slot.host.close()
        self._slots, self._threads = [], []


_switch = {"runs": 0, "saved": None}  # the runs that lowered the interval; its value before the first
_switch_lock = threading.Lock()


def _short_switch_interval(change: int):
    """+1: a run starts; the switch interval is lowered to GIL_SWITCH_S if no run had done so.
    -1: a run ends; the last one puts back the interval from before the first. (Each run saving
    and restoring it on its own left it lowered for good where two runs overlapped.)"""
    with _switch_lock:
        if change > 0 and _switch["runs"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], GIL_SWITCH_S))
        _switch["runs"] += change
        if change < 0 and _switch["runs"] == 0:
            sys.setswitchinterval(_switch["saved"])


def _result(slot: BoundSlot, ticket: int) -> tuple:
    """(ok, value) of the run `ticket` on `slot`, dropping the results of earlier runs that
    nobody took."""
    while True:
        got, ok, value = slot.done.get()
        if got == ticket:
            return ok, value
