"""Qwen2VLProcessor.apply_chat_template: rendered strings, and tokenize=True with media loaded per item."""
import functools
import http.server
import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from mindone_qwen2vl import Qwen2VLProcessor
from mindone_qwen2vl.qwen_vl_utils import fetch_video

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
JPG1, JPG2, V4 = (os.path.join(ASSETS, n) for n in ("1.jpg", "2.jpg", "4.mp4"))
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep request lines out of the test output
        pass



@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def http_assets():
    handler = functools.partial(QuietHandler, directory=ASSETS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def conversation(image1=None, video=None, image2=None):
    image1 = image1 or {"type": "image", "image": JPG1}
    video = video or {"type": "video", "video": V4}
    image2 = image2 or {"type": "image", "image": JPG2}
    return [
        {"role": "user", "content": [image1, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A street."}]},
        {"role": "user", "content": [video, image2, {"type": "text", "text": "And these?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Thanks."},
    ]


PLAIN = (
    SYSTEM
    + f"<|im_start|>user\n{IMG}What is this?<|im_end|>\n"
    + "<|im_start|>assistant\nA street.<|im_end|>\n"
    + f"<|im_start|>user\n{VID}{IMG}And these?<|im_end|>\n"
    + "<|im_start|>assistant\nA cat.<|im_end|>\n"
    + "<|im_start|>user\nThanks.<|im_end|>\n"
)
WITH_IDS = PLAIN.replace(f"{IMG}What", f"Picture 1: {IMG}What").replace(
    f"{VID}{IMG}And", f"Video 1: {VID}Picture 2: {IMG}And"
)


def test_template_strings(processor):
    assert processor.apply_chat_template(conversation()) == PLAIN
    assert processor.apply_chat_template(conversation(), add_generation_prompt=True) == (
        PLAIN + "<|im_start|>assistant\n"
    )
    # Picture/Video numbers count through the whole conversation, not per message.
    assert processor.apply_chat_template(conversation(), add_vision_id=True) == WITH_IDS
    # The tokenizer's own rendering of the bundled template agrees.
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tokenizer.apply_chat_template(conversation(), tokenize=False, add_vision_id=True) == WITH_IDS


def test_template_batch_and_system(processor):
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = processor.apply_chat_template([conversation(), own_system])
    assert out == [PLAIN, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"]


def hf_expected(processor, text, images, video, fps):
    """What HF's processor gives: its image processor on the decoded images, its numpy video path on
    qwen-vl-utils frames, its tokenizer on the prompt with placeholders expanded."""
    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR)
    image_out = hf(images=images, return_tensors="np")
    logging.getLogger("transformers.models.qwen2_vl.image_processing_qwen2_vl").setLevel(logging.ERROR)
    video_out = hf(images=None, videos=[fetch_video({"video": video, "fps": fps})], return_tensors="np")
    grids = list(image_out["image_grid_thw"])
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p for g, p in zip(grids, pieces[1:]))
    text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(video_out["video_grid_thw"][0].prod()) // 4))
    ids = AutoTokenizer.from_pretrained(MODEL_DIR)([text], return_tensors="np")
    return image_out, video_out, ids


def test_tokenize_return_dict_with_url_path_and_video(processor, http_assets):
    conv = conversation(
        image1={"type": "image", "url": f"{http_assets}/1.jpg"},
        video={"type": "video", "path": V4},
        image2={"type": "image", "path": JPG2},
    )
    out = processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np", fps=1
    )
    images = [Image.open(p).convert("RGB") for p in (JPG1, JPG2)]
    text = PLAIN + "<|im_start|>assistant\n"
    image_out, video_out, ids = hf_expected(processor, text, images, V4, fps=1)
    np.testing.assert_array_equal(out["pixel_values"], image_out["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], image_out["image_grid_thw"])
    np.testing.assert_array_equal(out["pixel_values_videos"], video_out["pixel_values_videos"])
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 24, 24]])  # fps=1 on 5 s: 4 frames of 336x336
    np.testing.assert_array_equal(out["input_ids"], ids["input_ids"])
    # return_dict=False gives the ids alone
    ids_only = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, fps=1)
    np.testing.assert_array_equal(ids_only, ids["input_ids"])


def test_tokenize_item_options(processor):
    conv = [{"role": "user", "content": [
        {"type": "image", "image": JPG1, "max_pixels": 32 * 28 * 28},  # goes through fetch_image
        {"type": "video", "video": V4, "nframes": 6},  # item settings win over fps=
        {"type": "text", "text": "?"},
    ]}]
    out = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="ms", fps=1)
    assert out["image_grid_thw"].asnumpy().tolist() == [[1, 8, 14]]  # 168x300 into 32*28*28: 112x196
    assert out["video_grid_thw"].asnumpy().tolist() == [[3, 24, 24]]
    out = processor.apply_chat_template(conv[:0] + [{"role": "user", "content": [
        {"type": "video", "video": V4}, {"type": "text", "text": "?"}]}], tokenize=True, return_dict=True,
        num_frames=8)
    assert out["video_grid_thw"].tolist() == [[4, 24, 24]]


def test_tokenize_batch_is_left_padded(processor):
    short = [{"role": "user", "content": [{"type": "image", "image": JPG1}, {"type": "text", "text": "Hi"}]}]
    long = [{"role": "user", "content": [{"type": "image", "image": JPG2}, {"type": "text", "text": "Hi " * 20}]}]
    out = processor.apply_chat_template([short, long], tokenize=True, return_dict=True, padding=True,
                                        return_tensors="np")
    assert out["input_ids"].shape[0] == 2 and out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert out["image_grid_thw"].tolist() == [[1, 12, 22], [1, 14, 22]]


def test_tokenize_errors(processor, tmp_path):
    conv = [{"role": "user", "content": [{"type": "video", "video": V4}]}]
    with pytest.raises(ValueError, match="give either fps=1 or num_frames=4, not both"):
        processor.apply_chat_template(conv, tokenize=True, fps=1, num_frames=4)
    with pytest.raises(ValueError, match=r"image item .* names no image: give one of 'image', 'url'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video", "path": str(tmp_path / "nope.mp4")}]}], tokenize=True
        )
    with pytest.raises(ValueError, match=r"video .*4.mp4': nframes 300 is outside \[2, 150\], the video's frame count"):
        processor.apply_chat_template(conv, tokenize=True, num_frames=300)


def test_tokenize_passes_processor_options(processor):
    """Keywords that are processor options go to __call__ (as HF), the rest to the template."""
    conv = [{"role": "user", "content": [{"type": "image", "image": JPG1}, {"type": "text", "text": "?"}]}]
    flat = processor.apply_chat_template(conv, tokenize=True, return_dict=True, max_pixels=32 * 28 * 28)
    assert flat["image_grid_thw"].tolist() == [[1, 8, 14]]  # 168x300 into 32*28*28: 112x196
    as_dict = processor.apply_chat_template(conv, tokenize=True, return_dict=True,
                                            images_kwargs={"max_pixels": 32 * 28 * 28})
    np.testing.assert_array_equal(as_dict["input_ids"], flat["input_ids"])
    with_ids = processor.apply_chat_template(conv, tokenize=True, add_vision_id=True, max_pixels=32 * 28 * 28,
                                             return_tensors=None)
    assert processor.tokenizer.decode(with_ids[0]).startswith(SYSTEM + "<|im_start|>user\nPicture 1: <|vision_start|>")
    with pytest.raises(ValueError, match="truncation cut <\\|image_pad\\|> tokens"):
        processor.apply_chat_template(conv, tokenize=True, truncation=True, max_length=40)
