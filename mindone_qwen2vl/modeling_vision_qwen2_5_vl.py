"""Qwen2.5-VL vision tower: Qwen2-VL's (modeling_vision.py) with window attention, RMSNorm and a gated MLP.

What changes, and where it is handled:
- Most blocks attend within windows of 4x4 merged tokens (112 px) instead of whole frames; the blocks in
  `fullatt_block_indexes` still attend per frame. vision_plan(window=...) reorders the patches window by
  window before the blocks, lays the windows out as attention segments, and restores the processor's order
  after the merger. Windows are segments like frames, so the same grouped attention (and the same compiled
  steps) serves both.
- RMSNorm (weight only) in the blocks and the merger's ln_q; a gated SiLU MLP with biases; `out_hidden_size`.
"""
import mindspore as ms
from mindspore import nn

from .config import Qwen2_5_VLVisionConfig
from .kernels import PortableKernels, kernels_for
from .layers import Linear, RMSNorm
from .modeling_vision import PatchMerger, Qwen2VisionTransformer, Qwen2VLVisionBlock


class Qwen2_5_VLMLP(nn.Cell):
    """down(silu(gate(x)) * up(x)), all with biases (kernels.swiglu: the fused kernel on Ascend)."""

    def __init__(self, config: Qwen2_5_VLVisionConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        self.kernels = kernels
        inter = config.intermediate_size
        self.gate_proj = Linear(config.hidden_size, inter, bias=True, dtype=dtype)
        self.up_proj = Linear(config.hidden_size, inter, bias=True, dtype=dtype)
        self.down_proj = Linear(inter, config.hidden_size, bias=True, dtype=dtype)

    def construct(self, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
        gate, up = self.gate_proj(x, gate_weight, gate_bias), self.up_proj(x, up_weight, up_bias)
        return self.down_proj(self.kernels.swiglu(gate, up), down_weight, down_bias)


class Qwen2_5_VLVisionBlock(Qwen2VLVisionBlock):
    """Qwen2-VL's block (its rotary attention, project/attend halves and compiled steps) with RMSNorms and
    the gated MLP. Bundle order: norm1, qkv (weight, bias), proj (weight, bias), norm2, gate, up and down
    (weight, bias each)."""

    QKV = 1
    PROJ = 3

    def norms_and_mlp(self, config, policy):
        kernels = kernels_for(policy)
        return (RMSNorm(config.hidden_size, 1e-6, kernels), RMSNorm(config.hidden_size, 1e-6, kernels),
                Qwen2_5_VLMLP(config, policy.compute_dtype, kernels))

    def weights(self):
        mlp = self.mlp
        return (self.norm1.weight, self.attn.qkv.weight, self.attn.qkv.bias, self.attn.proj.weight,
                self.attn.proj.bias, self.norm2.weight, mlp.gate_proj.weight, mlp.gate_proj.bias,
                mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)

    def pre_attention_norm(self, x, w):
        return self.norm1(x, w[0])

    def feed_forward(self, x, w):
        return self.mlp(self.norm2(x, w[5]), w[6], w[7], w[8], w[9], w[10], w[11])


class Qwen2_5_VLPatchMerger(PatchMerger):
    """Qwen2-VL's merger with an RMSNorm ln_q, projecting to out_hidden_size."""

    @staticmethod
    def norm(dim, kernels):
        return RMSNorm(dim, 1e-6, kernels)


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    """`visual.*` of a Qwen2.5-VL checkpoint; called like Qwen2-VL's tower, features in the processor's
    order."""

    block_class = Qwen2_5_VLVisionBlock
    merger_class = Qwen2_5_VLPatchMerger
    kernel_kind = 1

    def __init__(self, config: Qwen2_5_VLVisionConfig, policy):
        super().__init__(config, policy)
        self.window = config.window_tokens
        self.full_attention = frozenset(config.fullatt_block_indexes)

    def windowed(self, index):
        return index not in self.full_attention
