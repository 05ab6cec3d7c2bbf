"""YAML presets (configs/*.yaml): model, precision, mode, pixel limits and tensor parallel size per model size."""
import os
import sys

import yaml

from .precision import PrecisionPolicy, resolve_policy

# A clone (or editable install) has configs/ beside the package; `pip install .` copies it to <prefix>/share.
CONFIG_DIRS = [
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"),
    os.path.join(sys.prefix, "share", "mindone_qwen2vl", "configs"),
]

# key -> type; anything else in a preset is a typo worth an error rather than a silently ignored setting.
PRESET_KEYS = {
    "model_name_or_path": str,
    "mindspore_dtype": str,
    "conv_dtype": str,
    "attn_implementation": str,
    "mode": str,
    "tensor_parallel_size": int,
    "min_pixels": int,
    "max_pixels": int,
    "video_max_pixels": int,
    "video_total_pixels": int,
    "fps": float,
    "max_new_tokens": int,
}


def preset_path(name_or_path):
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml"
    for folder in CONFIG_DIRS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    known = sorted({f[:-5] for d in CONFIG_DIRS if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".yaml")})
    raise FileNotFoundError(f"no preset {name_or_path!r}: not a file, and not one of {known}")


def load_preset(name_or_path) -> dict:
    path = preset_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        # PyYAML's message spans lines (context, then problem); the error is printed as one line.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    for key, value in data.items():
        if key not in PRESET_KEYS:
            raise ValueError(f"{path}: unknown setting {key!r} (known: {', '.join(PRESET_KEYS)})")
        want = PRESET_KEYS[key]
        if not isinstance(value, want) and not (want is float and isinstance(value, int)):
            raise ValueError(f"{path}: {key} should be {want.__name__}, got {value!r}")
    return data


def preset_policy(preset: dict, device=None) -> PrecisionPolicy:
    """The precision policy a preset asks for, on this device (CPU fallbacks apply, see precision.py)."""
    return resolve_policy(preset.get("mindspore_dtype", "fp32"), preset.get("attn_implementation"),
                          preset.get("conv_dtype"), device=device)
