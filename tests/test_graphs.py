"""Graphs across requests: a workload run again in one process compiles nothing more and does not grow memory."""
import mindspore as ms

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
