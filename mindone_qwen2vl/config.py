"""Configs read from a Hugging Face Qwen2-VL or Qwen2.5-VL `config.json`.

Two layouts exist in the wild: the original flat one (text fields at the top level, as in the published
Qwen2-VL-2B/7B/72B-Instruct and Qwen2.5-VL repos) and the one newer transformers write (a nested
`text_config`). Both load. The decoder's config is the same for both models; the vision towers differ.
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


def _vision_from_dict(cls, d):
    d = dict(d)
    if "in_chans" in d and "in_channels" not in d:  # key of the original config.json
        d["in_channels"] = d["in_chans"]
    return cls(**_pick(cls, d))


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
        return _vision_from_dict(cls, d)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (Qwen2-VL uses 'quick_gelu')")

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads

    @property
    def out_features(self):
        return self.hidden_size


@dataclass
class Qwen2_5_VLVisionConfig:
    """Qwen2.5-VL's tower: `hidden_size` is the tower's own width here (Qwen2-VL calls it embed_dim) and
    `out_hidden_size` the decoder width the merger projects to."""

    depth: int = 32
    hidden_size: int = 1280
    out_hidden_size: int = 3584
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels per side of an attention window
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: float = 4  # temporal M-RoPE positions per second of video

    @classmethod
    def from_dict(cls, d):
        return _vision_from_dict(cls, d)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size < unit or self.window_size % unit:
            raise ValueError(f"vision window_size {self.window_size} is not a multiple of patch_size * "
                             f"spatial_merge_size = {unit}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]

    @property
    def embed_dim(self):  # the name the code shared with Qwen2-VL's tower uses for the tower's width
        return self.hidden_size

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def out_features(self):
        return self.out_hidden_size

    @property
    def window_tokens(self):
        """Merged tokens per side of a window (112 px / 14 px / 2 = 4)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)


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
    model_type = "qwen2_vl"  # class attributes, not fields
    vision_config_class = Qwen2VLVisionConfig

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
            vision_config=cls.vision_config_class.from_dict(d.get("vision_config") or {}),
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
        if model_type not in (None, cls.model_type):
            raise ValueError(f"{path}: model_type is {model_type!r}, expected {cls.model_type!r}")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path):
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def __post_init__(self):
        if self.vision_config.out_features != self.text_config.hidden_size:
            key = "out_hidden_size" if isinstance(self.vision_config, Qwen2_5_VLVisionConfig) else "hidden_size"
            raise ValueError(
                f"vision_config.{key} {self.vision_config.out_features} must equal the decoder hidden_size "
                f"{self.text_config.hidden_size}"
            )


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """Qwen2.5-VL: Qwen2-VL's decoder and token ids, the windowed tower."""

    model_type = "qwen2_5_vl"
    vision_config_class = Qwen2_5_VLVisionConfig

    vision_config: Qwen2_5_VLVisionConfig = field(default_factory=Qwen2_5_VLVisionConfig)


CONFIG_CLASSES = {c.model_type: c for c in (Qwen2VLConfig, Qwen2_5_VLConfig)}


def load_config(path):
    """The config of a checkpoint folder (or config.json), of the class its `model_type` names (Qwen2-VL's
    when it names none, as the oldest files do)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # from_json_file reports the problem with its own message
    if model_type is not None and model_type not in CONFIG_CLASSES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported (one of {sorted(CONFIG_CLASSES)})")
    return CONFIG_CLASSES.get(model_type, Qwen2VLConfig).from_json_file(file)
