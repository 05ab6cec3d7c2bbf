"""Graphs across requests: a workload run again in one process compiles nothing more and does not grow memory."""
import time

import mindspore as ms
import numpy as np

from test_generation import case_inputs


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_a_workload_again_compiles_nothing_and_keeps_memory_flat(tiny_ours):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        cases = ["image", "video", "text_only", "mixed_left_padded_batch"]
        for case in cases:
            tiny_ours.generate(**case_inputs(case), max_new_tokens=4)
        graphs, before = tiny_ours.compiled_graphs(), rss_mb()
        for _ in range(3):
            for case in cases:
                tiny_ours.generate(**case_inputs(case), max_new_tokens=4)
        assert tiny_ours.compiled_graphs() == graphs
        growth = rss_mb() - before
        print(f"RSS growth over 12 more requests: {growth:.1f} MB")
        assert growth < 30
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_a_repeated_image_size_gets_static_graphs_equal_to_the_dynamic_ones(tiny_hf, monkeypatch):
    """graphs.HotLayouts: a size that has cost enough runs in static graphs of its own (here at once: the gain is
    pinned high, as if compiling were free), whose features and generation equal the dynamic ones and HF's; a
    size over the budget stays dynamic; nothing compiles twice. A fresh model, so that the counts are this test's.
    The two block steps are what runs where the CPU's block kernel does not apply (eager, float16, Ascend)."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.graphs import HotLayouts
    from test_generation import case_inputs, hf_generate
    from test_modeling_vision import hf_visual
    from tiny import random_pixels, rel_err

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False)
    small, big = np.array([(1, 4, 6)]), np.array([(1, 8, 4)])  # 24 and 32 patches
    monkeypatch.setattr(model.visual, "block_kernels", lambda: None)
    model.visual.hot_layouts = hot = HotLayouts(budget=30, limit=4, gain=1e6)
    pixels = {24: random_pixels(small, 3), 32: random_pixels(big, 4)}

    def vision(grid):
        return model.get_vision_features(pixels[int(grid.prod())], grid).asnumpy()

    def blocks():
        graphs = model.compiled_graphs()
        return graphs["vision.project"], graphs["vision.attend"]

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        first = vision(small)  # the first call of all: its time stands for a compilation
        assert hot.compile_s is not None and not hot.hot
        again = vision(small)  # dynamic, and now its time is known
        assert blocks() == (1, 1) and not hot.hot
        static = vision(small)
        assert hot.hot == {((1, 4, 6),): 24} and blocks() == (2, 2)
        assert hot.compiled == {((1, 4, 6),)} and hot.compile_s >= 0
        np.testing.assert_array_equal(again, first)
        assert rel_err(static, first) < 1e-6
        assert rel_err(static, hf_visual(tiny_hf[0], pixels[24], small)) < 1e-5
        for _ in range(3):
            vision(big)  # 24 + 32 patches > the budget of 30: stays dynamic
        assert list(hot.hot) == [((1, 4, 6),)] and blocks() == (2, 2)
        # The image case's grid is the hot one: greedy tokens through the static graphs equal HF's.
        inputs = case_inputs("image")
        assert model.visual.layout(inputs["image_grid_thw"]) in hot.hot
        np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=8),
                                      hf_generate(tiny_hf[0], inputs, max_new_tokens=8))
        assert blocks() == (2, 2)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_hot_layouts_rent_before_they_buy_and_stay_bounded():
    """The policy alone, with the time a call takes given by the call: the first call of all less the next call
    of its layout stands for a compilation; a layout is promoted once gain x its dynamic time reaches that cost,
    which is then re-measured from its first static call; the hot layouts stay within limit and budget."""
    from mindone_qwen2vl.graphs import HotLayouts

    hot = HotLayouts(budget=100, limit=2, gain=0.5)

    def call(layout, patches, seconds):
        def fn(static):
            time.sleep(seconds / 2 if static else seconds)  # static twice as fast: a gain of 0.5
            return static
        return hot.run(layout, patches, fn)

    # (Bounds leave room for sleep overshooting on a busy machine.)
    assert call("a", 10, 0.3) is False  # the first call of all (compilation and a run): a stand-in
    first = hot.compile_s
    assert 0.3 <= first < 0.6
    assert call("b", 10, 0.01) is False  # another layout: the stand-in stays
    assert hot.compile_s == first
    assert call("a", 10, 0.1) is False  # the first layout again: 0.3 - 0.1 s was compiling
    assert 0.05 < hot.compile_s < first - 0.09
    hot.compile_s = 0.2  # pinned, so that only the calls' own times count from here
    dynamic = 1
    while not call("a", 10, 0.1):  # promoted once 0.5 x its dynamic seconds (0.1 a call) reach 0.2
        dynamic += 1
        assert dynamic <= 4
    assert dynamic >= 3  # 0.4 s run dynamic (0.3 and a little more if sleep overshoots)
    assert hot.hot == {"a": 10} and "a" not in hot.spent
    assert 0 <= hot.compile_s < 0.15  # re-measured (not the pinned 0.2): the first static call cost its run
    hot.compile_s = 0.0  # as if compiling were free: promoted once seen run dynamic
    assert call("c", 95, 0.01) is False and call("c", 95, 0.01) is False  # 10 + 95 > 100 patches
    assert call("d", 50, 0.01) is False
    assert call("d", 50, 0.01) is True
    assert call("e", 5, 0.01) is False and call("e", 5, 0.01) is False  # two layouts are the limit
    assert hot.hot == {"a": 10, "d": 50} and hot.used() == 60


def test_a_layout_whose_static_graphs_fail_goes_back_to_the_dynamic_ones():
    """A static run that raises (what an out-of-memory compilation would do) gives the request the dynamic result,
    with a warning naming the layout, and that layout is never promoted again; the dynamic path's own errors
    still reach the caller."""
    import pytest

    from mindone_qwen2vl.graphs import HotLayouts

    hot = HotLayouts(budget=100, limit=4, gain=1e6)
    calls = []

    def fn(static):
        calls.append(static)
        if static:
            raise RuntimeError("Out of memory")
        return "dynamic"

    assert hot.run("a", 10, fn) == "dynamic"  # the first call of all
    assert hot.run("a", 10, fn) == "dynamic"  # seen run dynamic: promoted at the next call
    with pytest.warns(UserWarning, match=r"static vision graphs for a failed \(RuntimeError: Out of memory\)"):
        assert hot.run("a", 10, fn) == "dynamic"
    assert calls == [False, False, True, False]
    assert hot.failed == {"a"} and not hot.hot and hot.used() == 0
    for _ in range(3):
        assert hot.run("a", 10, fn) == "dynamic"
    assert calls[-3:] == [False, False, False]

    def broken(static):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        hot.run("b", 10, broken)


def test_a_compiling_call_collects_only_new_objects():
    """MindSpore runs a full gc.collect() before each compilation; a step's compiling calls set the process's
    objects aside for it (graphs.new_objects_collected_only) and put them back after. Objects someone else froze
    stay frozen. graphs.compiling() says when such a call runs (cli_interrupt waits for it)."""
    import gc

    from mindone_qwen2vl.graphs import Step, compiling, dynamic
    from mindspore import Tensor

    class Double(Step):
        def specs(self):
            return (dynamic((None,)),)

        def construct(self, x):
            return x * 2.0

    class Triple(Step):  # static shapes: every call may compile
        def construct(self, x):
            return x * 3.0

    seen = []  # objects set aside during each full collection
    during = []  # compiling() then

    def watch(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(gc.get_freeze_count())
            during.append(compiling())

    x = Tensor(np.ones(5, np.float32))
    ms.set_context(mode=ms.GRAPH_MODE)
    gc.callbacks.append(watch)
    try:
        assert gc.get_freeze_count() == 0
        double, triple = Double(), Triple()
        np.testing.assert_array_equal(double(x).asnumpy(), np.full(5, 2.0, np.float32))
        assert seen and min(seen) > 10000, seen  # MindSpore's collection ran with the process set aside
        assert gc.get_freeze_count() == 0  # and everything is back
        assert during and all(during) and not compiling()
        seen.clear()
        double(x)  # compiled: the fast path, no collection
        assert not seen
        np.testing.assert_array_equal(triple(Tensor(np.ones(7, np.float32))).asnumpy(), np.full(7, 3.0, np.float32))
        assert seen and min(seen) > 10000 and gc.get_freeze_count() == 0
        # Frozen by someone else: left as it is.
        gc.freeze()
        frozen = gc.get_freeze_count()
        seen.clear()
        triple(Tensor(np.ones(9, np.float32)))  # a new shape: compiles
        assert seen and gc.get_freeze_count() > frozen // 2  # still frozen (a few of them freed since)
    finally:
        gc.unfreeze()
        gc.callbacks.remove(watch)
        ms.set_context(mode=ms.PYNATIVE_MODE)
