"""Qwen2-VL for MindSpore (CPU and Ascend), numerically matched to Hugging Face transformers."""
# mindspore must be imported before decord: the other order aborts the process
# ("random_device could not be read").
import os

import mindspore

# On the CPU backend MindSpore's matmuls are oneDNN's. On an AVX-512 machine oneDNN picks its brgemm matmul,
# which ran the one-row products of a decode step 1.3-1.6x slower than its AVX2 gemm (2B lm_head, 933 MB:
# 52-62 vs 34-46 ms; whole 2b-slice decode step 90 vs 70 ms), while prompt and vision products timed the same
# (docs/benchmarks.md). oneDNN reads this once, at its first kernel: set before any, unless the user set it.
# Ascend kernels do not go through oneDNN.
if mindspore.get_context("device_target") == "CPU":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

__version__ = "0.1.0"

__all__ = [
    "Qwen2VLConfig",
    "Qwen2VLVisionConfig",
    "Qwen2VLTextConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLProcessor",
]

_LAZY = {
    "Qwen2VLConfig": "config",
    "Qwen2VLVisionConfig": "config",
    "Qwen2VLTextConfig": "config",
    "Qwen2VLForConditionalGeneration": "modeling_qwen2_vl",
    "Qwen2VLProcessor": "processing",
}


def __getattr__(name):
    # Lazy so that `import mindone_qwen2vl.qwen_vl_utils` does not pull in the model or transformers.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
