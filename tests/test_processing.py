"""Qwen2VLProcessor, images and text: equal to Hugging Face's image processor and tokenizer; saving and
loading, keyword routing and decoding as HF's processor."""
import json
import logging
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from mindone_qwen2vl import Qwen2VLProcessor
from mindone_qwen2vl.qwen_vl_utils import process_vision_info

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
IMAGES = [os.path.join(ASSETS, name) for name in ("1.jpg", "2.jpg", "test.jpg")]
IMAGE_PAD, PAD_ID = "<|image_pad|>", 151643

LIMITS = {
    "default": {},
    "raised": {"min_pixels": 1024 * 28 * 28, "max_pixels": 4096 * 28 * 28},  # every test image scaled up
    "lowered": {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28},  # every test image scaled down
}


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLProcessor.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def raw_images():
    return [Image.open(path).convert("RGB") for path in IMAGES]


def prompt(n_images, question="Describe."):
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def expanded(text, grids, token=IMAGE_PAD):
    """The prompt with each placeholder repeated t*h*w/4 times, written independently of the processor."""
    pieces = text.split(token)
    assert len(pieces) == len(grids) + 1
    out = pieces[0]
    for grid, piece in zip(grids, pieces[1:]):
        out += token * (int(np.prod(grid)) // 4) + piece
    return out


@pytest.mark.parametrize("limits", list(LIMITS))
def test_images_equal_hf_image_processor(limits, hf_tokenizer):
    ours = Qwen2VLProcessor.from_pretrained(MODEL_DIR, **LIMITS[limits])
    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR, **LIMITS[limits])
    images = raw_images()
    text = prompt(3)
    out = ours(text=[text], images=images, return_tensors="np")
    ref = hf(images=images, return_tensors="np")
    assert out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    ids = hf_tokenizer([expanded(text, ref["image_grid_thw"])], return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ids["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ids["attention_mask"])
    # The limits really apply: every image lands inside them.
    pixels = ref["image_grid_thw"][:, 1:].prod(axis=1) * 14 * 14
    if limits != "default":
        assert (pixels >= LIMITS[limits]["min_pixels"]).all() and (pixels <= LIMITS[limits]["max_pixels"]).all()


def test_grids_by_hand(processor):
    out = processor(images=raw_images(), return_tensors="np")
    # 168x300 -> 168x308, 199x300 -> 196x308, 747x1000 -> 756x1008, in 14-pixel patches
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 12, 22], [1, 14, 22], [1, 54, 72]])
    assert out["pixel_values"].shape == (12 * 22 + 14 * 22 + 54 * 72, 3 * 2 * 14 * 14)


def test_per_call_pixel_limits(processor):
    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR, **LIMITS["lowered"])
    out = processor(images=raw_images(), **LIMITS["lowered"])
    np.testing.assert_array_equal(out["pixel_values"], hf(images=raw_images())["pixel_values"])
    assert processor.image_processor.min_pixels == 3136  # the call did not change the processor


def test_qwen_vl_utils_pipeline_batch_left_padded(processor, hf_tokenizer):
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "image", "image": IMAGES[2],
                                       "max_pixels": 100 * 28 * 28}, {"type": "text", "text": "Compare them."}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    assert texts == [prompt(1, "Hi"), prompt(2, "Compare them.")]
    images, videos = process_vision_info(messages)
    assert videos is None
    out = processor(text=texts, images=images, padding=True, return_tensors="np")
    ref = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR)(images=images, return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    grids = ref["image_grid_thw"]
    expected = [expanded(texts[0], grids[:1]), expanded(texts[1], grids[1:])]
    ids = hf_tokenizer(expected, padding=True, return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ids["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ids["attention_mask"])
    short = out["attention_mask"][0]
    assert short[0] == 0 and short[-1] == 1  # left padding: prompts end together
    assert (out["input_ids"][0][short == 0] == PAD_ID).all()
    n_tokens = [(row == processor.image_token_id).sum() for row in out["input_ids"]]
    assert n_tokens == [grids[0].prod() // 4, grids[1:].prod(axis=1).sum() // 4]


def test_return_types(processor):
    image = raw_images()[0]
    plain = processor(text=prompt(1), images=image)  # numpy by default
    assert isinstance(plain["input_ids"], np.ndarray) and isinstance(plain["pixel_values"], np.ndarray)
    assert plain["input_ids"].dtype == np.int64 and plain["input_ids"].shape[0] == 1
    as_lists = processor(text=prompt(1), images=image, return_tensors=None)  # HF's default: lists of ids
    assert as_lists["input_ids"] == plain["input_ids"].tolist()
    out = processor(text=[prompt(1)], images=[image], return_tensors="ms")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert isinstance(out[key], ms.Tensor), key
    assert out["input_ids"].dtype == ms.int64 and out["pixel_values"].dtype == ms.float32
    np.testing.assert_array_equal(out["input_ids"].asnumpy()[0], plain["input_ids"][0])
    np.testing.assert_array_equal(out["pixel_values"].asnumpy(), plain["pixel_values"])
    vision_only = processor(images=[image], return_tensors="np")
    assert set(vision_only) == {"pixel_values", "image_grid_thw"}


def test_image_paths_and_arrays_in_call(processor):
    from_pil = processor(images=raw_images()[:1])["pixel_values"]
    np.testing.assert_array_equal(processor(images=IMAGES[:1])["pixel_values"], from_pil)
    np.testing.assert_array_equal(processor(images=[np.asarray(raw_images()[0])])["pixel_values"], from_pil)
    nested = processor(images=[[raw_images()[0]], [raw_images()[1]]])  # one list per sample
    np.testing.assert_array_equal(nested["pixel_values"], processor(images=raw_images()[:2])["pixel_values"])


def test_images_per_sample_with_an_empty_sample(processor, hf_tokenizer):
    a, b, c = raw_images()
    texts = [prompt(2), prompt(0, "No image."), prompt(1)]
    out = processor(text=texts, images=[[a, b], [], [c]], padding=True)
    ref = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR)(images=[a, b, c], return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    grids = ref["image_grid_thw"]
    expected = [expanded(texts[0], grids[:2]), texts[1], expanded(texts[2], grids[2:])]
    ids = hf_tokenizer(expected, padding=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(out["input_ids"], ids)
    with pytest.raises(ValueError, match="images holds no image"):
        processor(text=prompt(0), images=[[], []])


def test_decode_defaults_are_hf(processor, hf_tokenizer):
    ids = hf_tokenizer(["Hello world<|im_end|>", "A cat."], padding=True, return_tensors="np")["input_ids"]
    # As HF's processor: the tokenizer's own defaults, which keep special tokens.
    assert processor.batch_decode(ids) == hf_tokenizer.batch_decode(ids) == ["Hello world<|im_end|>", "A cat."]
    assert processor.batch_decode(ms.Tensor(ids), skip_special_tokens=True) == ["Hello world", "A cat."]
    assert processor.decode(ms.Tensor(ids[0])) == hf_tokenizer.decode(ids[0]) == "Hello world<|im_end|>"
    assert processor.decode(ids[0], skip_special_tokens=True) == "Hello world"
    assert processor.post_process_image_text_to_text(ids) == ["Hello world", "A cat."]  # HF's default there: skip


def test_save_pretrained_round_trip(tmp_path):
    """Everything comes back: a changed chat template, the video processor's own settings, limits, patch sizes."""
    from transformers import ProcessorMixin

    ours = Qwen2VLProcessor.from_pretrained(MODEL_DIR, **LIMITS["lowered"])
    ours.chat_template = ours.chat_template.replace("You are a helpful assistant.", "You are terse.")
    video = ours.video_processor
    video.min_pixels, video.max_pixels, video.do_sample_frames, video.num_frames = 8 * 784, 32 * 784, True, 4
    ours.image_processor.patch_size = video.patch_size = 16  # not the files' 14: saved, not defaulted
    ours.save_pretrained(str(tmp_path))
    assert {"chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
            "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    again = Qwen2VLProcessor.from_pretrained(str(tmp_path))
    assert again.chat_template == ours.chat_template != Qwen2VLProcessor.from_pretrained(MODEL_DIR).chat_template
    rendered = again.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>system\nYou are terse.")
    assert (again.image_processor.min_pixels, again.image_processor.max_pixels) == (16 * 28 * 28, 64 * 28 * 28)
    assert again.image_processor.size == {"shortest_edge": 16 * 28 * 28, "longest_edge": 64 * 28 * 28}
    assert again.video_processor.to_dict() == video.to_dict()
    assert (again.video_processor.min_pixels, again.video_processor.num_frames) == (8 * 784, 4)
    for name in ("patch_size", "temporal_patch_size", "merge_size"):
        assert getattr(again.image_processor, name) == getattr(ours.image_processor, name)
    assert again.image_processor.patch_size == again.video_processor.patch_size == 16
    a = ours(text=prompt(1), images=raw_images()[:1])
    b = again(text=prompt(1), images=raw_images()[:1])
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # HF reads the same: its processor's chat template, its image processor, its tokenizer's template.
    assert ProcessorMixin.get_processor_dict(str(tmp_path))[0]["chat_template"] == ours.chat_template
    hf_image = Qwen2VLImageProcessor.from_pretrained(str(tmp_path))
    assert (hf_image.min_pixels, hf_image.max_pixels, hf_image.patch_size) == (16 * 28 * 28, 64 * 28 * 28, 16)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == ours.chat_template
    with open(tmp_path / "video_preprocessor_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert saved["size"] == {"shortest_edge": 8 * 784, "longest_edge": 32 * 784}


def test_save_into_a_folder_with_chat_template_json(tmp_path):
    """chat_template.json is read first (as HF reads it): saving into such a folder keeps it in step."""
    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    ours = Qwen2VLProcessor.from_pretrained(str(folder))
    ours.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ours.save_pretrained(str(folder))
    assert Qwen2VLProcessor.from_pretrained(str(folder)).chat_template == ours.chat_template
    with open(folder / "chat_template.json", encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == ours.chat_template


def test_video_processor_settings_round_trip(tmp_path):
    from mindone_qwen2vl.processing import Qwen2VLVideoProcessor

    custom = Qwen2VLVideoProcessor(min_pixels=1000, max_pixels=90000, patch_size=16, temporal_patch_size=4,
                                   merge_size=1, fps=1.5, do_sample_frames=True, min_frames=2, max_frames=64,
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], do_normalize=False)
    custom.save_pretrained(str(tmp_path))
    assert Qwen2VLVideoProcessor.from_pretrained(str(tmp_path)).to_dict() == custom.to_dict()
    # Without a video file, the image processor's file (as HF); with one written by HF, its settings.
    assert Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR).min_pixels == 3136
    hf_written = {  # HF 4.57's layout for Qwen2-VL's video processor
        "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
        "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_pad": None, "do_rescale": True,
        "do_resize": True, "do_sample_frames": False, "fps": None, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "input_data_format": None, "max_frames": 768,
        "max_pixels": 602112, "merge_size": 2, "min_frames": 4, "min_pixels": 100352, "num_frames": None,
        "patch_size": 14, "processor_class": "Qwen2VLProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "return_metadata": False, "size": {"longest_edge": 602112, "shortest_edge": 100352}, "size_divisor": None,
        "temporal_patch_size": 2, "video_metadata": None, "video_processor_type": "Qwen2VLVideoProcessor",
    }
    with open(tmp_path / "video_preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump(hf_written, f)
    loaded = Qwen2VLVideoProcessor.from_pretrained(str(tmp_path)).to_dict()
    assert {k: loaded[k] for k in loaded if k in hf_written} == {k: hf_written[k] for k in loaded if k in hf_written}


# ---- keywords go where HF sends them ----

def test_keyword_tables_are_hf_s():
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessorKwargs

    from mindone_qwen2vl.processing import COMMON_KWARGS, IMAGES_KWARGS, TEXT_KWARGS, VIDEOS_KWARGS

    tables = Qwen2VLProcessorKwargs.__annotations__
    for name, ours in (("text_kwargs", TEXT_KWARGS), ("images_kwargs", IMAGES_KWARGS),
                       ("videos_kwargs", VIDEOS_KWARGS), ("common_kwargs", COMMON_KWARGS)):
        assert set(tables[name].__annotations__) == ours, name


def test_keyword_routing(processor, hf_tokenizer, caplog):
    image = raw_images()[0]
    lowered = LIMITS["lowered"]
    reference = processor(text=prompt(1), images=[image], **lowered)
    as_dict = processor(text=prompt(1), images=[image], images_kwargs=lowered)
    np.testing.assert_array_equal(as_dict["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(as_dict["pixel_values"], reference["pixel_values"])
    truncated = processor(text=["Hello there, world"], text_kwargs={"max_length": 2, "truncation": True})
    assert truncated["input_ids"].shape == (1, 2)
    padded = processor(text=["a", "a b c"], padding="max_length", max_length=6, return_tensors=None)
    assert [len(row) for row in padded["input_ids"]] == [6, 6] and isinstance(padded["input_ids"], list)
    no_mask = processor(text="Hi", return_attention_mask=False)
    assert set(no_mask) == {"input_ids"}
    with caplog.at_level(logging.WARNING, logger="mindone_qwen2vl.processing"):
        quiet = processor(text="Hi", colour="red")  # as HF: ignored with a warning, never sent to the tokenizer
    assert "keyword argument 'colour' is not an option" in caplog.text
    np.testing.assert_array_equal(quiet["input_ids"], processor(text="Hi")["input_ids"])
    with pytest.raises(ValueError, match="keyword argument max_pixels was given twice"):
        processor(text=prompt(1), images=[image], max_pixels=3136, images_kwargs={"max_pixels": 3136})
    with pytest.raises(TypeError, match="Qwen2VLImageProcessor has no option.*crop_size"):
        processor(text=prompt(1), images=[image], crop_size={"height": 28, "width": 28})


def test_mm_token_type_ids(processor):
    out = processor(text=prompt(1), images=raw_images()[:1], return_mm_token_type_ids=True)
    ids, types = out["input_ids"], out["mm_token_type_ids"]
    np.testing.assert_array_equal(types, (ids == processor.image_token_id).astype(types.dtype))


def test_no_input_is_an_error(processor):
    with pytest.raises(ValueError, match="needs text, images or videos"):
        processor()


def test_model_input_names(processor):
    names = processor.model_input_names
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(names)
    assert {"pixel_values_videos", "video_grid_thw"} <= set(names)


# ---- bad input ----

def test_more_images_than_placeholders(processor):
    with pytest.raises(ValueError, match=r"2 image\(s\) were given but the text holds 1 <\|image_pad\|>.*image 2 has"):
        processor(text=prompt(1), images=raw_images()[:2])


def test_fewer_images_than_placeholders(processor):
    with pytest.raises(ValueError, match=r"1 image\(s\) were given but the text holds 3 .*placeholder 2 has no image"):
        processor(text=[prompt(1), prompt(2)], images=raw_images()[:1])
    with pytest.raises(ValueError, match=r"0 image\(s\) were given but the text holds 1"):
        processor(text=prompt(1))


def test_aspect_ratio_over_200_names_the_image(processor):
    strip = Image.fromarray(np.zeros((10, 2500, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image 2 of 2 \(<PIL image RGB 2500x10>\): .*aspect ratio.*got 250"):
        processor(text=prompt(2), images=[raw_images()[0], strip])


@pytest.mark.parametrize("height, width", [(1, 1), (1, 2), (1, 40), (3, 40)])
def test_images_a_few_pixels_high(processor, height, width):
    """A 1x1 image (HF failed: "mean must have 1 elements") and other images 1 or 3 pixels high, which HF reads
    channels first: as PIL images, and 1 pixel high also as HxWx3 arrays, the grid is smart_resize's and the
    pixels those of HF's processor told the channels are last."""
    from mindone_qwen2vl.qwen_vl_utils import smart_resize

    pixels = (np.arange(height * width * 3).reshape(height, width, 3) * 37 % 256).astype(np.uint8)
    ip = processor.image_processor
    h, w = smart_resize(height, width, min_pixels=ip.min_pixels, max_pixels=ip.max_pixels)
    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR)(images=pixels, input_data_format="channels_last")
    sources = [Image.fromarray(pixels)] + ([pixels] if height == 1 else [])
    for image in sources:
        out = processor(text=prompt(1), images=[image])
        assert out["image_grid_thw"].tolist() == [[1, h // 14, w // 14]], type(image)
        np.testing.assert_allclose(out["pixel_values"], hf["pixel_values"], atol=1e-6, err_msg=str(type(image)))


def test_missing_image_path_in_call(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        processor(text=prompt(1), images=[str(tmp_path / "nope.jpg")])


def test_truncation_inside_vision_tokens(processor):
    with pytest.raises(ValueError, match=r"truncation cut <\|image_pad\|> tokens \(66 in the text, \d+ kept\)"):
        processor(text=prompt(1), images=raw_images()[:1], truncation=True, max_length=50)


@pytest.mark.slow
def test_works_without_torch(tmp_path):
    """The whole preprocessing path in a Python that cannot see torch or torchvision."""
    import site
    import subprocess
    import sys

    hidden = ("torch", "torchvision", "torchgen", "functorch")
    packages = tmp_path / "site"
    packages.mkdir()
    for folder in site.getsitepackages():
        for entry in os.listdir(folder):
            if entry.split("-")[0].split(".")[0] not in hidden and not (packages / entry).exists():
                os.symlink(os.path.join(folder, entry), packages / entry)
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    code = f"""
import sys
from mindone_qwen2vl import Qwen2VLProcessor
from mindone_qwen2vl.qwen_vl_utils import process_vision_info
p = Qwen2VLProcessor.from_pretrained({MODEL_DIR!r})
messages = [{{"role": "user", "content": [{{"type": "image", "image": {IMAGES[0]!r}}},
             {{"type": "video", "video": {os.path.join(ASSETS, "4.mp4")!r}, "nframes": 4}},
             {{"type": "text", "text": "?"}}]}}]
images, videos = process_vision_info(messages)
out = p(text=[p.apply_chat_template(messages)], images=images, videos=videos, return_tensors="ms")
print(out["image_grid_thw"].asnumpy().tolist(), out["video_grid_thw"].asnumpy().tolist())
print(sorted(m for m in sys.modules if m.split(".")[0] in {hidden!r}))
"""
    env = {**os.environ, "PYTHONPATH": f"{packages}{os.pathsep}{repo}"}
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "[[1, 12, 22]] [[2, 24, 24]]"
    assert lines[-1] == "[]"
