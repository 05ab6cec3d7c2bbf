"""Configs read from a Hugging Face Qwen2-VL `config.json`.

Two layouts exist in the wild: the original flat one (text fields at the top level, as in the published
Qwen2-VL-2B/7B/72B-Instruct repos) and the one newer transformers write (a nested `text_config`). Both load.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional


def _pick(cls, d):
    # Tolerant: unknown keys (architectures, torch_dtype, ...) are ignored, missing ones take defaults.
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Qwen2VLVisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # width of the decoder the merger projects to
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:  # key of the original config.json
            d["in_channels"] = d["in_chans"]
        return cls(**_pick(cls, d))

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (Qwen2-VL uses 'quick_gelu')")

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads


@dataclass
class Qwen2VLTextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d):
        return cls(**_pick(cls, d))

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2-VL uses 'silu')")
        scaling = self.rope_scaling or {}
        # Older configs say {"type": "mrope"}, newer ones {"rope_type": "default"}; both mean plain M-RoPE.
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only default M-RoPE)")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"rope_scaling.mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, but head_dim / 2 "
                f"= hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} / 2 = "
                f"{self.head_dim // 2}"
            )

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> List[int]:
        section = (self.rope_scaling or {}).get("mrope_section")
        if section is None:
            # Without a section every frequency follows the temporal axis, which is plain 1-D RoPE for text.
            return [self.head_dim // 2, 0, 0]
        return list(section)


@dataclass
class Qwen2VLConfig:
    text_config: Qwen2VLTextConfig = field(default_factory=Qwen2VLTextConfig)
    vision_config: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[object] = 151645
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    torch_dtype: Optional[str] = None

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        text = dict(d.get("text_config") or {})
        # Flat layout: text fields live at the top level. Nested layout: they win where both exist.
        for k, v in d.items():
            if k not in ("text_config", "vision_config"):
                text.setdefault(k, v)
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        top = _pick(cls, d)
        top.pop("text_config", None)
        top.pop("vision_config", None)
        top["tie_word_embeddings"] = tie
        top["torch_dtype"] = d.get("torch_dtype", d.get("dtype"))
        return cls(
            text_config=Qwen2VLTextConfig.from_dict(text),
            vision_config=Qwen2VLVisionConfig.from_dict(d.get("vision_config") or {}),
            **top,
        )

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2_vl"):
            raise ValueError(f"{path}: model_type is {model_type!r}, expected 'qwen2_vl'")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path):
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def __post_init__(self):
        if self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size {self.vision_config.hidden_size} must equal the decoder hidden_size "
                f"{self.text_config.hidden_size}"
            )
