"""models.py: config.json's model_type picks the model and processor classes; AutoProcessor's choice."""
import json
import os
import sys

import pytest

from mindone_qwen2vl import models

CONFIG_25 = os.path.join(os.path.dirname(__file__), "assets", "qwen2.5-vl-3b-instruct", "config.json")
HAS_25_MODEL = os.path.exists(os.path.join(os.path.dirname(models.__file__), "modeling_qwen2_5_vl.py"))


def write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(data, f)
    return str(folder)


def test_processor_classes_by_model_type():
    from mindone_qwen2vl import Qwen2_5_VLProcessor, Qwen2VLProcessor

    assert models.processor_class("qwen2_vl") is Qwen2VLProcessor
    assert models.processor_class("qwen2_5_vl") is Qwen2_5_VLProcessor


def test_qwen2_vl_model_class():
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    assert models.model_class("qwen2_vl") is Qwen2VLForConditionalGeneration


@pytest.mark.skipif(not HAS_25_MODEL, reason="modeling_qwen2_5_vl.py is not written yet")
def test_qwen2_5_vl_model_class(tmp_path):
    from mindone_qwen2vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    assert models.model_class("qwen2_5_vl") is Qwen2_5_VLForConditionalGeneration
    with open(CONFIG_25, encoding="utf-8") as f:
        folder = write(tmp_path, "config.json", json.load(f))
    model_cls, processor_cls = models.classes_of(folder)
    assert (model_cls.__name__, processor_cls.__name__) == ("Qwen2_5_VLForConditionalGeneration",
                                                            "Qwen2_5_VLProcessor")


def test_model_type_of_folders(tmp_path):
    with open(CONFIG_25, encoding="utf-8") as f:
        assert models.model_type_of(write(tmp_path / "a", "config.json", json.load(f))) == "qwen2_5_vl"
    # The oldest Qwen2-VL files name no model_type; config.py reads them as Qwen2-VL's too.
    assert models.model_type_of(write(tmp_path / "b", "config.json", {"hidden_size": 64})) == "qwen2_vl"


def test_choosing_imports_nothing_else():
    """Choosing the processor does not import either model module (the model is loaded after the inputs)."""
    before = set(sys.modules)
    models.processor_class("qwen2_5_vl")
    loaded = set(sys.modules) - before
    assert not any(name.startswith("mindone_qwen2vl.modeling") for name in loaded)


def test_unknown_model_type_names_the_file_and_the_supported_types(tmp_path):
    folder = write(tmp_path, "config.json", {"model_type": "qwen3_vl"})
    path = os.path.join(folder, "config.json")
    message = f"{path}: model_type 'qwen3_vl' is not supported; supported model types: 'qwen2_vl', 'qwen2_5_vl'"
    for call in (lambda: models.model_type_of(folder), lambda: models.classes_of(folder),
                 lambda: models.auto_processor_class(folder)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^config.json: model_type 'llava' is not supported; supported model "
                                         r"types: 'qwen2_vl', 'qwen2_5_vl'$"):
        models.model_class("llava")
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        models.model_type_of(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        models.model_type_of(str(bad))


def test_auto_processor_class_reads_the_processor_files_first(tmp_path):
    from mindone_qwen2vl import Qwen2_5_VLProcessor, Qwen2VLProcessor

    folder = write(tmp_path, "config.json", {"model_type": "qwen2_vl"})
    assert models.auto_processor_class(folder) is Qwen2VLProcessor  # nothing else names one
    write(folder, "video_preprocessor_config.json", {"processor_class": "Qwen2VLProcessor"})
    write(folder, "preprocessor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})
    assert models.auto_processor_class(folder) is Qwen2_5_VLProcessor  # preprocessor before video
    write(folder, "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    assert models.auto_processor_class(folder) is Qwen2VLProcessor  # processor_config.json first
    write(folder, "processor_config.json", {"processor_class": "LlavaProcessor"})
    with pytest.raises(ValueError, match=r"processor_config.json: processor_class 'LlavaProcessor' is not "
                                         r"supported; supported: 'Qwen2VLProcessor', 'Qwen2_5_VLProcessor'"):
        models.auto_processor_class(folder)
