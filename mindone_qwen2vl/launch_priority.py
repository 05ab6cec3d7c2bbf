"""An opt-in for the CPU backend: the thread that runs the model gives the cores to MindSpore's kernel threads.

Why. On the CPU backend a parallel kernel (a matmul, a softmax) hands its slices to MindSpore's thread pool, one
thread per core, and the thread that launched it waits for them in a ``sched_yield`` loop (MindSpore's
``ThreadPool::ParallelLaunch``). The waiter is runnable all the while, so the scheduler gives it a share of the
cores against the two threads doing the work. On the 2-core development machine (AMD EPYC) ``perf`` put a third of
the process's CPU time in that waiting thread, a quarter in the kernel's ``sched_yield``. With the waiter at a
higher nice value the pool threads get the cores: the 2b-slice vision tower on one 448x448 image took 1.29-1.48 s
against 1.62-1.79 s (docs/benchmarks.md, tenth session).

Opt-in, not default, because the priority cannot be given back: an unprivileged process may raise a thread's
nice value but not lower it again, so the thread that calls this stays at the lower priority for its life (its
Python work, preprocessing included, too). On a machine busy with other processes a low-priority launcher waits
longer for each launch; the measurements under load are in docs/benchmarks.md. Ascend launches kernels
asynchronously and nothing spins on the host for them: there this does nothing.

Use: the scripts' and serve.py's ``--launch_nice N``; from Python, ``lower_launch_priority(N)`` in the thread that
will call ``generate``/``forward`` (an ``Engine``'s ``launch_nice`` does it in the engine's thread).
"""
import os
import sys
import threading

__all__ = ["DEFAULT_LAUNCH_NICE", "lower_launch_priority", "thread_nice"]

# 10 rather than the lowest priority (19): most of the gain when the machine is idle, and with another process
# keeping a core busy no run at 10 was slower than at 0, while one of three decode runs at 19 took 112 ms a token
# against 21-25 (docs/benchmarks.md, tenth session).
DEFAULT_LAUNCH_NICE = 10


def thread_nice(native_id=None, pid="self"):
    """The nice value of a thread of process `pid` (default: the calling thread of this one), read from /proc."""
    native_id = threading.get_native_id() if native_id is None else native_id
    with open(f"/proc/{pid}/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return int(fields[16])  # field 19 of proc(5); fields[0] is field 3


def _start_runtime_threads():
    """Make MindSpore start the threads it would start at the first kernel and the first graph, now, from this
    thread's current priority: a new thread inherits the priority of the thread that creates it, and the kernel
    threads must not inherit the lowered one."""
    import numpy as np
    import mindspore as ms

    one = ms.Tensor(np.ones((2, 2), np.float32))
    (one + one).asnumpy()  # the kernel thread pool
    # An in-place update of a Parameter outside a graph (as the generation cache's writes): its queue thread.
    probe = ms.Parameter(one, name="launch_priority_probe", requires_grad=False)
    ms.ops.scatter_update(probe, ms.Tensor(np.zeros(1, np.int32)), one[:1]).asnumpy()

    class _Twice(ms.nn.Cell):
        def construct(self, x):
            return x * 2

    _Twice()(one).asnumpy()  # in graph mode: the runtime's queue threads


def lower_launch_priority(nice=DEFAULT_LAUNCH_NICE):
    """Raise the calling thread's nice value to ``nice`` (1-19) for the rest of its life, after MindSpore's
    runtime threads exist. True if done; False where it does not apply: not Linux, or a MindSpore device other
    than the CPU. A value at or below the thread's current one leaves it as it is (and returns True)."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 1 <= nice <= 19:
        raise ValueError(f"nice must be an integer from 1 to 19, got {nice!r}")
    if sys.platform != "linux":
        return False
    from .precision import device_target

    if device_target() != "CPU":
        return False
    _start_runtime_threads()
    me = threading.get_native_id()
    if thread_nice(me) < nice:
        os.setpriority(os.PRIO_PROCESS, me, nice)  # on Linux PRIO_PROCESS with a thread id sets that thread only
    return True
