"""The one precision policy: which dtype each part of the model computes in, on Ascend and on a CPU.

Fixed whatever the policy (numerics that bf16/fp16 would spoil):
- LayerNorm, RMSNorm and their parameters: float32 (fp16 LayerNorm has no CPU kernel; norms of bf16
  activations lose the small differences the next layer reads).
- softmax (attention scores), rotary tables and the rotation itself, final logits: float32.
Chosen by the policy:
- compute_dtype (`mindspore_dtype`): Linear/Embedding weights and activations.
- conv_dtype: the patch-embed Conv3d (bf16 on Ascend, where Conv3D runs in fp16/bf16 only).
- attn_implementation: "eager" (everywhere), "flash_attention_2" (Ascend) or "sdpa" (the CPU backend's fused
  kernel, cpu_kernels.py); flash runs its q/k/v in FLASH_DTYPE (fp16), the dtype its kernel is fastest and
  validated in; sdpa computes in float32.
- cache_dtype: the KV cache stores keys and values in the dtype attention reads them in: the flash dtype under
  flash attention (each key is cast once when written, instead of the whole cache at every layer of every
  decode step), else the compute dtype.
On a CPU, bf16 matmul/softmax/conv and flash attention have no kernels: asking for them warns and falls back
(bf16 -> float32, flash -> the CPU's default), never aborts. The CPU's default attention is "sdpa"; where its
kernel cannot be built (no C++ compiler) it warns and uses eager.
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import mindspore as ms


FLASH_DTYPE = ms.float16
NORM_DTYPE = ms.float32
ATTN_IMPLEMENTATIONS = ("eager", "flash_attention_2", "sdpa")  # attention.py implements each

_DTYPES = {
    "fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16, "float16": ms.float16,
    "bf16": ms.bfloat16, "bfloat16": ms.bfloat16,
}


def parse_dtype(dtype):
    """'bf16' / 'float16' / ms.float32 ... -> a MindSpore dtype."""
    if dtype is None or isinstance(dtype, ms.Type):
        return dtype
    key = str(dtype).lower().replace("torch.", "").replace("mindspore.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of fp32, fp16, bf16")
    return _DTYPES[key]


def device_target():
    return ms.get_context("device_target")


@dataclass(frozen=True)
class PrecisionPolicy:
    compute_dtype: ms.Type = ms.float32
    conv_dtype: ms.Type = ms.float32
    attn_implementation: str = "eager"
    device: str = "CPU"
    flash_dtype: ms.Type = FLASH_DTYPE
    # None: MindSpore's ops.flash_attention_score. CPU tests give an emulation of its documented semantics.
    flash_kernel: Optional[Callable] = None

    norm_dtype = NORM_DTYPE
    softmax_dtype = ms.float32
    rope_dtype = ms.float32
    logits_dtype = ms.float32

    @property
    def cache_dtype(self):
        return self.flash_dtype if self.attn_implementation == "flash_attention_2" else self.compute_dtype

    def describe(self):
        """Module -> dtype, for logs, the README table and tests."""
        attn = {"flash_attention_2": f"flash_attention_2 ({self.flash_dtype})",
                "sdpa": "sdpa (the fused CPU kernel, float32)"}.get(
            self.attn_implementation, f"eager ({self.compute_dtype}, softmax {self.softmax_dtype})")
        return {
            "device": self.device,
            "linear/embedding": str(self.compute_dtype),
            "patch_embed Conv3d": str(self.conv_dtype),
            "attention": attn,
            "KV cache": str(self.cache_dtype),
            "LayerNorm/RMSNorm": str(self.norm_dtype),
            "rotary": str(self.rope_dtype),
            "logits": str(self.logits_dtype),
        }


def resolve_policy(mindspore_dtype=ms.float32, attn_implementation=None, conv_dtype=None, device=None):
    """The policy for this device. Ascend defaults: flash attention, bf16 Conv3d. Elsewhere: the fused CPU
    kernel (sdpa; eager where it cannot be built), and the dtypes the CPU kernels support (see the module
    docstring for the fallbacks)."""
    device = device or device_target()
    dtype = parse_dtype(mindspore_dtype) or ms.float32
    conv = parse_dtype(conv_dtype)
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if device == "Ascend":
        if attn_implementation == "sdpa":
            warnings.warn("sdpa is the CPU backend's fused attention kernel; on Ascend the fused kernel is "
                          "flash_attention_2: using it", stacklevel=3)
            attn_implementation = "flash_attention_2"
        return PrecisionPolicy(dtype, conv or ms.bfloat16, attn_implementation or "flash_attention_2", device)
    if dtype == ms.bfloat16:
        warnings.warn(f"bfloat16 matmul/softmax have no {device} kernels in MindSpore: computing in float32 "
                      "instead (bfloat16 is for Ascend)", stacklevel=3)
        dtype = ms.float32
    if conv == ms.bfloat16 or conv is None:
        conv = dtype  # fp32 or fp16: both have CPU Conv3d kernels
    if attn_implementation == "flash_attention_2":
        warnings.warn(f"flash_attention_2 needs an Ascend NPU (ops.flash_attention_score has no {device} "
                      "kernel): using the CPU's fused kernel, sdpa, instead", stacklevel=3)
    attn = attn_implementation if attn_implementation == "eager" else "sdpa"
    if attn == "sdpa":
        from . import cpu_kernels

        ok, why = cpu_kernels.available()
        if not ok:
            warnings.warn(f"sdpa (the fused CPU attention kernel) is not available: {why}; using eager attention, "
                          "slower and holding every score", stacklevel=3)
            attn = "eager"
    return PrecisionPolicy(dtype, conv, attn, device)
