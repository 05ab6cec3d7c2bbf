"""Qwen2-VL and Qwen2.5-VL for MindSpore (CPU and Ascend), numerically matched to Hugging Face transformers."""
__version__ = "0.1.0"

__all__ = [
    "Qwen2VLConfig",
    "Qwen2VLVisionConfig",
    "Qwen2VLTextConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2VLProcessor",
    "Qwen2_5_VLProcessor",
]

_LAZY = {
    "Qwen2VLConfig": "config",
    "Qwen2VLVisionConfig": "config",
    "Qwen2VLTextConfig": "config",
    "Qwen2VLForConditionalGeneration": "modeling_qwen2_vl",
    "Qwen2_5_VLConfig": "config",
    "Qwen2_5_VLForConditionalGeneration": "modeling_qwen2_5_vl",
    "Qwen2VLProcessor": "processing",
    "Qwen2_5_VLProcessor": "processing_qwen2_5_vl",
}


def __getattr__(name):
    # Lazy: importing the package has no effects on the process, and `import mindone_qwen2vl.qwen_vl_utils`
    # does not pull in the model or transformers.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
