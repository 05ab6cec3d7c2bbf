"""CPU-backend tuning: oneDNN's instruction set, and the thread that runs compiled graphs.

Neither changes a result; on Ascend both are no-ops.
"""
import functools
import os
import queue
import sys
import threading

import mindspore

# On the CPU backend MindSpore's matmuls are oneDNN's, and oneDNN fixes its instruction set at its first kernel.
# On an AVX-512 machine its default (brgemm) ran a batch-1 decode step slower than its AVX2 gemm (2b-slice:
# 81-85 against 61 ms), and a batch of 2-4 faster (70-92 against 106-123 ms): the AVX2 gemm reads the weights
# once per row. So batch 1, the common case, gets the AVX2 cap from the package import, and `tune_cpu_matmuls`
# lifts it for batched generation. A value the user set is never touched. Ascend kernels do not go through oneDNN.
_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_ISA_FROM_USER = any(name in os.environ for name in _ISA_VARIABLES)
_ON_CPU = mindspore.get_context("device_target") == "CPU"


def tune_cpu_matmuls(batch_size):
    """Choose oneDNN's instruction set (CPU backend) for generating `batch_size` sequences at once.

    Effective only before the process runs its first model computation; a no-op on Ascend or when the user set
    ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA). Returns the value in force.
    """
    if _ON_CPU and not _ISA_FROM_USER:
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2" if batch_size <= 1 else "ALL"
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")


# In graph mode on the CPU backend, the thread that calls a compiled graph launches its kernels itself, and a
# parallel kernel (matmul, softmax, ...) hands its slices to MindSpore's pool, which has one thread per core,
# then waits for them in a sched_yield loop. That waiter holds a core's share of CPU time against the pool
# threads doing the work: on 2 cores it showed 100 % CPU next to the two pool threads, and a 1024x1280 by
# 5120x1280 matmul took 90-95 ms (median) against 67-72 ms with the waiter at the lowest priority; the 2b-slice
# vision tower 1.82-1.87 s against 1.38 s, a 300-token prompt 0.78-0.87 s against 0.59-0.69 s, decode unchanged.
# So in graph mode on a CPU the model's entry points run on one thread of ours at nice 19, and the caller sleeps
# until it is done. MINDONE_QWEN2VL_CPU_LAUNCHER=0 runs them on the caller's thread instead.
LAUNCHER_VARIABLE = "MINDONE_QWEN2VL_CPU_LAUNCHER"
LAUNCHER_NICE = 19


class _Launcher:
    def __init__(self):
        self.pid = os.getpid()
        self.jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="mindone-qwen2vl-launcher", daemon=True)
        self.thread.start()

    def _serve(self):
        lowered = False
        while True:
            fn, args, kwargs, done, outcome = self.jobs.get()
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as error:  # handed to the caller, whatever it is
                outcome.append((False, error))
            if not lowered:
                # Only after the first job: MindSpore starts its runtime threads during the first graph run, from
                # the running thread, and a new thread inherits that thread's priority.
                lowered = True
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LAUNCHER_NICE)
                except OSError:
                    pass
            done.set()

    def run(self, fn, args, kwargs):
        done, outcome = threading.Event(), []
        self.jobs.put((fn, args, kwargs, done, outcome))
        done.wait()
        ok, value = outcome.pop()
        if ok:
            return value
        raise value


_LAUNCHER = None
_LAUNCHER_LOCK = threading.Lock()


def launcher_in_use():
    """Whether the model's entry points run on the launcher thread now (CPU backend, graph mode, Linux, not
    turned off with MINDONE_QWEN2VL_CPU_LAUNCHER=0)."""
    return (sys.platform == "linux" and os.environ.get(LAUNCHER_VARIABLE, "1") != "0"
            and mindspore.get_context("device_target") == "CPU"
            and mindspore.get_context("mode") == mindspore.GRAPH_MODE)


def _launcher():
    if not launcher_in_use():
        return None
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None or _LAUNCHER.pid != os.getpid():  # a forked child has no such thread
            _LAUNCHER = _Launcher()
    return _LAUNCHER


def on_launcher(method):
    """Run `method` on the launcher thread when there is one (graph mode, CPU backend, Linux); calls made from
    that thread run directly."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        launcher = _launcher()
        if launcher is None or threading.current_thread() is launcher.thread:
            return method(*args, **kwargs)
        return launcher.run(method, args, kwargs)

    return wrapper
