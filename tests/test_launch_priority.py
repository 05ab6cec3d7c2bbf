"""launch_priority.py: the opt-in that runs the model from a thread at a higher nice value (CPU backend).

The priority cannot be given back without privileges, so every lowering here happens in a thread of its own, never
in pytest's main thread. Whether it pays is a benchmark's question (docs/benchmarks.md), not a test's."""
import os
import sys
import threading

import mindspore as ms
import pytest

from test_engine import N, alone, graph_mode, rows  # noqa: F401  (graph_mode: a fixture)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are read from Linux's /proc")

RUNTIME_THREADS = ("ActorThread", "KernelThread", "infer_queue", "resize_queue", "launch_queue", "bprop_queue")


def threads(pid="self"):
    """[(thread id, name, nice)] for the threads of process `pid` (one that ends meanwhile is left out)."""
    from mindone_qwen2vl.launch_priority import thread_nice

    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out.append((int(tid), f.read().strip(), thread_nice(int(tid), pid)))
        except FileNotFoundError:
            pass
    return out


def in_thread(fn):
    """fn() in a new thread -> its result (its exception re-raised here)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(600)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_thread_nice_is_the_kernels_value():
    from mindone_qwen2vl.launch_priority import thread_nice

    def lowered():
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, 7)
        return thread_nice(), thread_nice(me), os.getpriority(os.PRIO_PROCESS, me)

    assert in_thread(lowered) == (7, 7, 7)
    assert thread_nice() == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_only_the_calling_thread_is_lowered(tiny_ours, graph_mode):  # noqa: F811
    """Lowered, then the model run from it (an image question): every other thread of the process, MindSpore's
    included (those its first kernel, graph and cache write start), keeps the process's priority."""
    from mindone_qwen2vl.launch_priority import lower_launch_priority, thread_nice

    base = thread_nice()

    def lowered():
        done = lower_launch_priority(12)
        alone(tiny_ours, rows()[0])
        me = threading.get_native_id()
        return done, thread_nice(), [t for t in threads() if t[0] != me]

    done, nice, others = in_thread(lowered)
    assert (done, nice) == (True, 12)
    assert {t[2] for t in others} == {base}, others
    for name in RUNTIME_THREADS:
        assert any(t[1].startswith(name) for t in others), (name, others)


def test_a_lower_value_than_the_threads_own_is_left_alone():
    from mindone_qwen2vl.launch_priority import lower_launch_priority, thread_nice

    def lowered_twice():
        first = lower_launch_priority(15), thread_nice()
        return first, (lower_launch_priority(3), thread_nice())

    assert in_thread(lowered_twice) == ((True, 15), (True, 15))


@pytest.mark.parametrize("bad", [0, 20, -1, True, 10.0, "10", None])
def test_bad_values_are_refused(bad):
    from mindone_qwen2vl.engine import Engine
    from mindone_qwen2vl.launch_priority import lower_launch_priority

    with pytest.raises(ValueError, match="from 1 to 19"):
        lower_launch_priority(bad)
    if bad != 0:
        with pytest.raises(ValueError, match="launch_nice must be an integer from 0 to 19"):
            Engine(None, launch_nice=bad)


def test_the_same_tokens_from_a_lowered_thread(tiny_ours, graph_mode):  # noqa: F811
    from mindone_qwen2vl.launch_priority import lower_launch_priority

    conversations = rows()[:2]  # an image and a video question
    expected = [alone(tiny_ours, c) for c in conversations]

    def lowered():
        assert lower_launch_priority(10)
        return [alone(tiny_ours, c) for c in conversations]

    assert in_thread(lowered) == expected


def test_the_engine_thread_takes_launch_nice(tiny_ours, graph_mode):  # noqa: F811
    from mindone_qwen2vl.engine import Engine
    from mindone_qwen2vl.launch_priority import thread_nice

    conversation = rows()[2]
    expected = alone(tiny_ours, conversation)
    base = thread_nice()
    engine = Engine(tiny_ours, max_batch=2, max_len=512, launch_nice=9).start()
    try:
        assert engine.submit(**conversation, max_new_tokens=N, eos_token_id=[]).result(300)[0] == expected
        assert thread_nice(engine.thread.native_id) == 9
        assert thread_nice() == base  # the caller keeps its own
    finally:
        engine.stop()

