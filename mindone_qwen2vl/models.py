"""Which classes serve a checkpoint: its config.json's `model_type` names the model and the processor.

The classes are imported only when asked for, so choosing one costs nothing and the modules of the other model
are never loaded. The scripts and the server go through `classes_of(folder)`; `auto_processor_class` picks a
processor as HF's AutoProcessor does, from the processor files first.
"""
import importlib
import json
import os

__all__ = ["MODEL_TYPES", "model_class", "processor_class", "model_type_of", "classes_of", "auto_processor_class"]

# model_type -> ((module, model class), (module, processor class)), modules relative to this package.
MODEL_TYPES = {
    "qwen2_vl": (("modeling_qwen2_vl", "Qwen2VLForConditionalGeneration"), ("processing", "Qwen2VLProcessor")),
    "qwen2_5_vl": (("modeling_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                   ("processing_qwen2_5_vl", "Qwen2_5_VLProcessor")),
}
# Where a checkpoint names no model_type it is Qwen2-VL's, as config.py reads it (the oldest files name none).
DEFAULT_MODEL_TYPE = "qwen2_vl"
CONFIG_FILE = "config.json"
# The files AutoProcessor reads a `processor_class` from, in its order, before falling back to config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def _checked(model_type, source):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(map(repr, MODEL_TYPES))}")
    return MODEL_TYPES[model_type]


def _load(module, name):
    return getattr(importlib.import_module(f".{module}", __package__), name)


def model_class(model_type, source=CONFIG_FILE):
    """The model class of a `model_type` ("qwen2_vl", "qwen2_5_vl"); `source` names the file in the error."""
    return _load(*_checked(model_type, source)[0])


def processor_class(model_type, source=CONFIG_FILE):
    """The processor class of a `model_type`; `source` names the file in the error."""
    return _load(*_checked(model_type, source)[1])


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def model_type_of(folder) -> str:
    """config.json's `model_type` of a checkpoint folder, checked against the supported ones."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} at {path}")
    model_type = _read_json(path).get("model_type", DEFAULT_MODEL_TYPE)
    _checked(model_type, path)
    return model_type


def classes_of(folder):
    """(model class, processor class) of a checkpoint folder, by its config.json's `model_type`."""
    model_type = model_type_of(folder)
    source = os.path.join(folder, CONFIG_FILE)
    return model_class(model_type, source), processor_class(model_type, source)


def auto_processor_class(folder):
    """The processor class AutoProcessor would choose for a folder: the `processor_class` its processor files
    name (processor_config.json, preprocessor_config.json, video_preprocessor_config.json, in this order), else
    the one of config.json's `model_type`."""
    known = {processor: model_type for model_type, (_, (_, processor)) in MODEL_TYPES.items()}
    for name in PROCESSOR_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        named = _read_json(path).get("processor_class")
        if named is None:
            continue
        if named not in known:
            raise ValueError(f"{path}: processor_class {named!r} is not supported; supported: "
                             f"{', '.join(map(repr, known))}")
        return processor_class(known[named], path)
    return processor_class(model_type_of(folder))
