# mindspore first: importing decord before it aborts the process.
import mindspore as ms  # noqa: F401
import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if ms.get_context("device_target") == "Ascend":
        return
    skip = pytest.mark.skip(reason="needs an Ascend NPU (this MindSpore runs on the CPU backend)")
    for item in items:
        if "ascend" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["pynative", "graph"])
def ms_mode(request):
    """Runs a test once in PYNATIVE_MODE and once in GRAPH_MODE."""
    mode = ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE
    ms.set_context(mode=mode)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(HF model, checkpoint folder) of a tiny random Qwen2-VL with tied embeddings, old key names."""
    model = tiny.hf_model(tiny.hf_config(tied=True), seed=0)
    folder = str(tmp_path_factory.mktemp("tiny_qwen2vl"))
    tiny.save_checkpoint(model, folder)
    return model, folder


@pytest.fixture(scope="session")
def tiny_ours(tiny_hf):
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False)


@pytest.fixture(scope="session")
def tiny_eager(tiny_hf):
    """The same checkpoint with eager attention (the numerical reference; the CPU's default is sdpa)."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, attn_implementation="eager")
    assert model.policy.attn_implementation == "eager"
    return model


@pytest.fixture(scope="module")
def quiet_hf_video_deprecation():
    """HF's numpy image processor warns on every video call that the path is deprecated; it is the reference
    of the video tests, which ask for this fixture."""
    logger = logging.getLogger("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
