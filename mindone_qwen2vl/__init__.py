"""Qwen2-VL for MindSpore (CPU and Ascend), numerically matched to Hugging Face transformers."""
# mindspore must be imported before decord: the other order aborts the process
# ("random_device could not be read").
import os

import mindspore

# On the CPU backend MindSpore's matmuls are oneDNN's, and oneDNN fixes its instruction set at its first kernel.
# On an AVX-512 machine its default (brgemm) ran a batch-1 decode step slower than its AVX2 gemm (2b-slice:
# 81-85 against 61 ms), and a batch of 2-4 faster (70-92 against 106-123 ms): the AVX2 gemm reads the weights
# once per row. So batch 1, the common case, gets the AVX2 cap from the import, and `tune_cpu_matmuls` lifts
# it for batched generation. A value the user set is never touched. Ascend kernels do not go through oneDNN.
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


tune_cpu_matmuls(1)

__version__ = "0.1.0"

__all__ = [
    "Qwen2VLConfig",
    "Qwen2VLVisionConfig",
    "Qwen2VLTextConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLProcessor",
    "tune_cpu_matmuls",
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
