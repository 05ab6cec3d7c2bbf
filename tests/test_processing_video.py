"""Qwen2VLVideoProcessor and videos through Qwen2VLProcessor: equal to HF's numpy video path."""
import logging
import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from mindone_qwen2vl import Qwen2VLProcessor
from mindone_qwen2vl.processing import Qwen2VLVideoProcessor
from mindone_qwen2vl.qwen_vl_utils import fetch_video

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
V4, V3 = os.path.join(ASSETS, "4.mp4"), os.path.join(ASSETS, "3.mp4")
VIDEO_PAD = "<|video_pad|>"

LIMITS = {
    "default": {},
    "raised": {"min_pixels": 1024 * 28 * 28, "max_pixels": 4096 * 28 * 28},
    "lowered": {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28},
}


@pytest.fixture(autouse=True, scope="module")
def quiet_hf_video_deprecation():
    # HF's numpy image processor warns on every video call that the path is deprecated; it is our reference.
    logger = logging.getLogger("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def videos():
    """Videos in every accepted form; two with an odd frame count, which HF completes with the last frame."""
    v4 = fetch_video({"video": V4, "nframes": 4})  # (4, 3, 336, 336) uint8
    v3 = fetch_video({"video": V3, "fps": 1.0})  # (6, 3, 364, 644)
    odd = v3[:5].transpose(0, 2, 3, 1)  # (5, H, W, 3), channels last
    frames = [Image.fromarray(f) for f in v4[:3].transpose(0, 2, 3, 1)]  # 3 PIL frames
    as_float = v4.astype(np.float32)  # what upstream qwen-vl-utils returns (integer-valued floats)
    return [v4, v3, odd, frames, as_float]


def hf_reference(videos, limits):
    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR, **limits)
    outs = [hf(images=None, videos=[video], return_tensors="np") for video in videos]
    return (
        np.concatenate([o["pixel_values_videos"] for o in outs]),
        np.concatenate([o["video_grid_thw"] for o in outs]),
    )


@pytest.mark.parametrize("limits", list(LIMITS))
def test_video_processor_equals_hf_numpy_video_path(videos, limits):
    ours = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR, **LIMITS[limits])(videos, return_tensors="np")
    pixels, grids = hf_reference(videos, LIMITS[limits])
    assert ours["pixel_values_videos"].dtype == np.float32
    np.testing.assert_array_equal(ours["video_grid_thw"], grids)
    np.testing.assert_array_equal(ours["pixel_values_videos"], pixels)
    assert list(grids[:, 0]) == [2, 3, 3, 2, 2]  # temporal patches of 2 frames; 5 and 3 frames padded


def test_grid_by_hand(videos):
    out = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR)(videos[:2])
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 24, 24], [3, 26, 46]])
    assert out["pixel_values_videos"].shape == (2 * 24 * 24 + 3 * 26 * 46, 1176)


def test_single_video_forms(videos):
    vp = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR)
    one = vp([videos[0]])["pixel_values_videos"]
    np.testing.assert_array_equal(vp(videos[0])["pixel_values_videos"], one)  # a bare array
    np.testing.assert_array_equal(vp(videos[0].transpose(0, 2, 3, 1))["pixel_values_videos"], one)  # THWC
    frames = [Image.fromarray(f) for f in videos[0].transpose(0, 2, 3, 1)]
    np.testing.assert_array_equal(vp(frames)["pixel_values_videos"], one)  # a bare list of frames


def test_processor_with_video_and_image(videos):
    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    assert processor.video_processor.min_pixels == 256 * 28 * 28  # limits reach videos too, as in HF
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    image = Image.open(os.path.join(ASSETS, "1.jpg")).convert("RGB")
    text = (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    out = processor(text=[text], images=[image], videos=videos[:1], return_tensors="np")
    limits = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
    pixels, grids = hf_reference(videos[:1], limits)
    np.testing.assert_array_equal(out["pixel_values_videos"], pixels)
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 32, 32]])  # 336 -> 448 for min_pixels
    image_grid = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR, **limits)(images=[image])["image_grid_thw"]
    expected = text.replace(VIDEO_PAD, VIDEO_PAD * (2 * 32 * 32 // 4)).replace(
        "<|image_pad|>", "<|image_pad|>" * int(image_grid.prod() // 4)
    )
    np.testing.assert_array_equal(out["input_ids"], tokenizer([expected], return_tensors="np")["input_ids"])


# ---- bad input ----

def test_video_placeholder_mismatch(videos):
    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR)
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    with pytest.raises(ValueError, match=r"2 video\(s\) were given but the text holds 1 <\|video_pad\|>.*video 2 has"):
        processor(text=text, videos=videos[:2])
    with pytest.raises(ValueError, match=r"1 video\(s\) were given but the text holds 2 .*placeholder 2 has no video"):
        processor(text=text * 2, videos=videos[:1])


def test_bad_video_arrays():
    vp = Qwen2VLVideoProcessor()
    with pytest.raises(ValueError, match=r"video 1 of 1: shape \(2, 5, 5, 5\) has no RGB channel axis"):
        vp([np.zeros((2, 5, 5, 5), np.uint8)])
    with pytest.raises(ValueError, match="video 2 of 2: expected pixel values 0..255"):
        vp([np.zeros((2, 56, 56, 3), np.uint8), np.full((2, 56, 56, 3), 0.5, np.float32)])
    with pytest.raises(ValueError, match="video 1 of 1: expected a 4-D array or a non-empty list of frames"):
        vp([[]])
    with pytest.raises(ValueError, match="videos is empty"):
        vp([])
    with pytest.raises(ValueError, match="video 1 of 1: .*aspect ratio must be smaller than 200"):
        vp([np.zeros((2, 3, 4, 1000), np.uint8)])
