"""The top-level Qwen2.5-VL model: Qwen2-VL's (modeling_qwen2_vl) with the windowed vision tower and video
positions in seconds.

Everything else is shared: the decoder (Qwen2.5-VL's is Qwen2-VL's), merging features into the embeddings,
forward, generate, loading (both HF key layouts), conversion, the precision policy and tensor parallelism.
"""
from typing import Optional

from .config import Qwen2_5_VLConfig
from .modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from .modeling_vision_qwen2_5_vl import Qwen2_5_VisionTransformer
from .precision import PrecisionPolicy


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: `visual` (windowed tower), `model` (decoder), `lm_head`; HF parameter names.

    forward / generate take HF's `second_per_grid_ts` (seconds per temporal grid step of each video, from the
    processor): video frames sit at their time times `tokens_per_second` on the temporal M-RoPE axis, with
    fractional seconds kept (see inputs.temporal_positions for how that differs from HF 4.57.1)."""

    config_class = Qwen2_5_VLConfig
    vision_class = Qwen2_5_VisionTransformer

    def __init__(self, config: Qwen2_5_VLConfig, policy: Optional[PrecisionPolicy] = None):
        super().__init__(config, policy)
        self.tokens_per_second = config.vision_config.tokens_per_second
