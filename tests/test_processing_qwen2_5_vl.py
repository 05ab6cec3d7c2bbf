"""Qwen2_5_VLProcessor: equal to HF 4.57's Qwen2_5_VLProcessor (second_per_grid_ts included), fed by
qwen-vl-utils' return_video_kwargs, saved and loaded as HF does; Qwen2VLProcessor's outputs unchanged."""
import json
import os
import shutil

import numpy as np
import pytest
import upstream
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from mindone_qwen2vl import Qwen2_5_VLProcessor, Qwen2VLProcessor
from mindone_qwen2vl.models import auto_processor_class
from mindone_qwen2vl.qwen_vl_utils import process_vision_info

HERE = os.path.dirname(__file__)
TOKENIZER_DIR = os.path.join(HERE, "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
CONFIG_DIR = os.path.join(HERE, "assets", "qwen2.5-vl-3b-instruct")
ASSETS = os.path.join(HERE, "assets")
JPG1, JPG2, BIG = (os.path.join(ASSETS, n) for n in ("1.jpg", "2.jpg", "test.jpg"))
V4 = os.path.join(ASSETS, "4.mp4")  # 224x224, 30 fps, 150 frames
SMALL = {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28}  # per video frame: few patches, fast
VISION = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
          "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def qwen25_folder(folder):
    """A Qwen2.5-VL-3B-Instruct processor folder: its own configs, Qwen2-VL's (identical) tokenizer files."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(TOKENIZER_DIR):
        if not name.endswith("config.json") or name == "tokenizer_config.json":
            shutil.copy(os.path.join(TOKENIZER_DIR, name), folder)
    for name in os.listdir(CONFIG_DIR):
        shutil.copy(os.path.join(CONFIG_DIR, name), folder)
    return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return qwen25_folder(tmp_path_factory.mktemp("qwen25_processor"))


@pytest.fixture(scope="module")
def ours(folder):
    processor = Qwen2_5_VLProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor


pytestmark = pytest.mark.usefixtures("quiet_hf_video_deprecation")  # conftest.py


class _NumpyVideos:
    """HF's numpy video path (Qwen2VLImageProcessor(videos=...)) in the video processor's place: HF's own
    Qwen2VLVideoProcessor needs torchvision, and its pixels equal this path's (test_processing_video.py)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size

    def __call__(self, videos, fps=None, do_sample_frames=None, return_tensors=None, **unused):
        assert not do_sample_frames  # the reference keeps every frame
        outs = [self.image_processor(images=None, videos=[v], return_tensors="np") for v in videos]
        return {"pixel_values_videos": np.concatenate([o["pixel_values_videos"] for o in outs]),
                "video_grid_thw": np.concatenate([o["video_grid_thw"] for o in outs])}


@pytest.fixture(scope="module")
def hf(folder):
    """HF 4.57's Qwen2_5_VLProcessor: its __call__, with its image processor and tokenizer. Built without
    ProcessorMixin.__init__, which refuses any video processor when torchvision is absent."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as HF

    processor = HF.__new__(HF)
    processor.image_processor = Qwen2VLImageProcessor.from_pretrained(folder)
    processor.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    processor.video_processor = _NumpyVideos(processor.image_processor)
    processor.chat_template = None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id, processor.video_token_id = processor.tokenizer.convert_tokens_to_ids(
        [processor.image_token, processor.video_token])
    return processor


def prompt(*kinds, question="Describe."):
    vision = "".join(VISION[k] for k in kinds)
    return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"


def images():
    return [Image.open(p).convert("RGB").resize(size) for p, size in ((JPG1, (150, 84)), (JPG2, (100, 67)))]


def small_videos():
    """Three short videos of odd sizes and frame counts (uint8, channels last and first)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (4, 60, 90, 3), dtype=np.uint8),
            rng.integers(0, 256, (3, 3, 50, 70), dtype=np.uint8),
            rng.integers(0, 256, (6, 84, 56, 3), dtype=np.uint8)]


def assert_same(out, ref):
    assert set(out) == set(ref)
    for key in ref:
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(ref[key]), err_msg=key)
        assert np.asarray(out[key]).dtype == np.asarray(ref[key]).dtype, key


def test_images_several_and_text_only_rows_padded_equal_hf(ours, hf):
    texts = [prompt("image"), prompt(question="Text only, a longer question than the others."),
             prompt("image", "image", question="Compare.")]
    pics = [images()[0], images()[1], images()[0]]
    assert_same(ours(text=texts, images=pics, padding=True, return_tensors="np"),
                hf(text=texts, images=pics, padding=True, return_tensors="np"))
    only_text = [prompt(question="Hi"), prompt(question="Hello there")]
    out = ours(text=only_text, padding=True, return_tensors="np")
    assert_same(out, hf(text=only_text, padding=True, return_tensors="np"))
    assert "second_per_grid_ts" not in out and out["attention_mask"][0, 0] == 0  # left padded


@pytest.mark.parametrize("fps", [None, 1, 2.0, 4.0, 0.5, [1.0, 3.0, 0.25]], ids=str)
def test_videos_at_several_fps_equal_hf(ours, hf, fps):
    """HF casts nothing here: second_per_grid_ts = temporal_patch_size / fps, one per video, 2 fps by default."""
    texts = [prompt("video", "image"), prompt("video", "video", question="Compare the clips.")]
    options = {} if fps is None else {"fps": fps}
    out = ours(text=texts, images=images()[:1], videos=small_videos(), padding=True, return_tensors="np", **options)
    ref = hf(text=texts, images=images()[:1], videos=small_videos(), padding=True, return_tensors="np", **options)
    assert_same(out, ref)
    expected = [2 / f for f in fps] if isinstance(fps, list) else [2 / (fps or 2.0)] * 3
    assert out["second_per_grid_ts"].tolist() == expected


def test_python_lists_and_videos_without_text_equal_hf(ours, hf):
    out = ours(text=[prompt("video")], videos=small_videos()[:1], fps=4.0, return_tensors=None)
    ref = hf(text=[prompt("video")], videos=small_videos()[:1], fps=4.0, return_tensors=None)
    assert out["second_per_grid_ts"] == ref["second_per_grid_ts"] == [0.5]
    assert out["input_ids"] == ref["input_ids"]
    alone = ours(videos=small_videos(), fps=[1, 2, 4])
    assert alone["second_per_grid_ts"].tolist() == [2.0, 1.0, 0.5] and "input_ids" not in alone
    with pytest.raises(ValueError, match=r"fps gives 2 value\(s\) for 3 video"):
        ours(text=[prompt("video", "video", "video")], videos=small_videos(), fps=[1.0, 2.0])


def test_rate_of_the_frames_where_no_fps_is_given(ours):
    """Without fps HF assumes 2 fps; ours uses what is known of the frames: the rate it sampled at, or the one
    video_metadata describes (qwen-vl-utils' return_video_metadata route), and 2 fps only when nothing says."""
    frames = np.random.default_rng(1).integers(0, 256, (150, 56, 56, 3), dtype=np.uint8)  # 5 s at 30 fps
    meta = {"fps": 30.0, "total_num_frames": 150}
    text = [prompt("video")]
    by_count = ours(text=text, videos=[frames], do_sample_frames=True, num_frames=8, video_metadata=[meta])
    assert by_count["second_per_grid_ts"].tolist() == [2 / (8 / 5)]  # 8 frames over 5 s
    by_rate = ours(text=text, videos=[frames], do_sample_frames=True, fps=1.0, video_metadata=[meta])
    assert by_rate["second_per_grid_ts"].tolist() == [2.0]
    every_15th = dict(meta, frames_indices=list(range(0, 150, 15)))
    described = ours(text=text, videos=[frames[::15]], video_metadata=[every_15th])
    assert described["second_per_grid_ts"].tolist() == [1.0]  # 10 frames of 5 s: 2 fps
    assert ours(text=text, videos=[frames[:4]])["second_per_grid_ts"].tolist() == [1.0]


def test_process_vision_info_feeds_the_processor_as_the_real_package(ours, hf):
    """Real qwen-vl-utils 0.0.14 + HF's processor and our process_vision_info + our processor give the same
    second_per_grid_ts, ids and grids; both routes of qwen-vl-utils (fps, or metadata) give ours the same."""
    real = upstream.qwen_vl_utils()
    messages = [{"role": "user", "content": [
        {"type": "video", "video": V4, "fps": 1.0, **SMALL},  # 4 frames at 0.8 fps
        {"type": "video", "video": [JPG2, JPG2, JPG2], **SMALL},  # frames: 2 fps
        {"type": "image", "image": JPG1},
        {"type": "text", "text": "What happens?"}]}]
    text = [ours.apply_chat_template(messages, add_generation_prompt=True)]
    their_images, their_videos, their_kwargs = real.process_vision_info(messages, return_video_kwargs=True)
    imgs, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
    assert kwargs == their_kwargs == {"do_sample_frames": False, "fps": [0.8, 2.0]}
    ref = hf(text=text, images=their_images, videos=[v.numpy() for v in their_videos], return_tensors="np",
             **their_kwargs)
    out = ours(text=text, images=imgs, videos=videos, return_tensors="np", **kwargs)
    assert out["second_per_grid_ts"].tolist() == ref["second_per_grid_ts"].tolist() == [2.5, 1.0]
    for key in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw", "pixel_values"):
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    # return_video_metadata: no fps in the kwargs; the metadata gives ours the same rates (HF would say 1.0).
    imgs, pairs, kwargs = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
    by_metadata = ours(text=text, images=imgs, videos=[v for v, _ in pairs], video_metadata=[m for _, m in pairs],
                       **kwargs)
    assert by_metadata["second_per_grid_ts"].tolist() == [2.5, 1.0]
    # And the chat template route samples the same frames and reports the same rates.
    chat = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat["second_per_grid_ts"].tolist() == [2.5, 1.0]
    np.testing.assert_array_equal(chat["input_ids"], out["input_ids"])


def test_chat_template_fps_and_explicit_fps(ours):
    messages = [{"role": "user", "content": [{"type": "video", "video": V4, **SMALL},
                                             {"type": "text", "text": "?"}]}]
    sampled = ours.apply_chat_template(messages, tokenize=True, return_dict=True, fps=4.0)
    assert sampled["second_per_grid_ts"].tolist() == [0.5]  # 20 frames of 5 s: 4 fps
    default = ours.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert default["second_per_grid_ts"].tolist() == [1.0]  # qwen-vl-utils' 2 fps
    told = ours.apply_chat_template(messages, tokenize=True, return_dict=True, videos_kwargs={"fps": 1.0})
    assert told["second_per_grid_ts"].tolist() == [2.0]  # the caller's fps wins, as in __call__


def test_qwen2_vl_processor_outputs_unchanged(folder, ours):
    """HF's Qwen2VLProcessor returns no second_per_grid_ts; everything else is the same as 2.5's."""
    qwen2 = Qwen2VLProcessor.from_pretrained(folder)
    qwen2.tokenizer.padding_side = "left"
    texts = [prompt("video", "image"), prompt("video", "video")]
    out2 = qwen2(text=texts, images=images()[:1], videos=small_videos(), padding=True, fps=1.0)
    out25 = ours(text=texts, images=images()[:1], videos=small_videos(), padding=True, fps=1.0)
    assert set(out25) - set(out2) == {"second_per_grid_ts"}
    for key in out2:
        np.testing.assert_array_equal(out2[key], out25[key])
    messages = [{"role": "user", "content": [{"type": "video", "video": V4, "nframes": 4, **SMALL},
                                             {"type": "text", "text": "?"}]}]
    assert "second_per_grid_ts" not in qwen2.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert "second_per_grid_ts" not in qwen2.model_input_names


def test_model_input_names_and_keyword_tables_are_hf_s(ours, hf):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessorKwargs

    from mindone_qwen2vl.processing import IMAGES_KWARGS, TEXT_KWARGS, VIDEOS_KWARGS

    assert set(ours.model_input_names) == set(hf.model_input_names)
    assert ours.model_input_names[-1] == "second_per_grid_ts"
    tables = Qwen2_5_VLProcessorKwargs.__annotations__
    for name, table in (("text_kwargs", TEXT_KWARGS), ("images_kwargs", IMAGES_KWARGS),
                        ("videos_kwargs", VIDEOS_KWARGS)):
        assert set(tables[name].__annotations__) == table, name


def test_save_pretrained_round_trip(ours, folder, tmp_path):
    from transformers import ProcessorMixin

    ours.save_pretrained(str(tmp_path))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        with open(tmp_path / name, encoding="utf-8") as f:
            assert json.load(f)["processor_class"] == "Qwen2_5_VLProcessor", name
    again = Qwen2_5_VLProcessor.from_pretrained(str(tmp_path))
    assert again.video_processor.to_dict() == ours.video_processor.to_dict()
    assert again.chat_template == ours.chat_template
    assert ProcessorMixin.get_processor_dict(str(tmp_path))[0]["chat_template"] == ours.chat_template
    a = ours(text=[prompt("video", "image")], images=images()[:1], videos=small_videos()[:1], fps=4.0)
    b = again(text=[prompt("video", "image")], images=images()[:1], videos=small_videos()[:1], fps=4.0)
    assert_same(a, b)
    # AutoProcessor's choice reads the saved files; a Qwen2-VL processor saved there names itself.
    assert auto_processor_class(str(tmp_path)) is Qwen2_5_VLProcessor
    Qwen2VLProcessor.from_pretrained(folder).save_pretrained(str(tmp_path / "as_qwen2"))
    with open(tmp_path / "as_qwen2" / "video_preprocessor_config.json", encoding="utf-8") as f:
        assert json.load(f)["processor_class"] == "Qwen2VLProcessor"


def test_another_video_processor_gets_hf_s_rule(folder, hf):
    """With a video processor of another kind (here HF's numpy path, as HF's own would be), only the fps given
    sets second_per_grid_ts, as in HF."""
    other = Qwen2_5_VLProcessor(hf.image_processor, hf.tokenizer, hf.video_processor)
    texts = [prompt("video", "video", "video")]
    for options in ({}, {"fps": 4.0}, {"fps": [1, 2, 4]}):
        assert_same(other(text=texts, videos=small_videos(), return_tensors="np", **options),
                    hf(text=texts, videos=small_videos(), return_tensors="np", **options))
    with pytest.raises(ValueError, match=r"fps gives 2 value\(s\) for 3 video"):
        other(text=texts, videos=small_videos(), fps=[1.0, 2.0])


def test_hf_calling_conventions_equal_hf(ours, hf, folder, tmp_path):
    """Issue 20's processor items on Qwen2.5-VL's processor: per-sample lists, *_kwargs dicts, fps per video,
    processor() with nothing, decode defaults, and a save/load of changed settings."""
    a, b = images()
    v1, v2, v3 = small_videos()
    texts = [prompt("image", "video"), prompt(question="Nothing to see."), prompt("video", "image", "video")]
    nested = ours(text=texts, images=[[a], [], [b]], videos=[[v1], [], [v2, v3]], text_kwargs={"padding": True},
                  videos_kwargs={"fps": [2.0, 1.0, 4.0]}, return_tensors="np")
    ref = hf(text=texts, images=[[a], [], [b]], videos=[v1, v2, v3], text_kwargs={"padding": True},
             videos_kwargs={"fps": [2.0, 1.0, 4.0]}, return_tensors="np")
    assert_same(nested, ref)
    assert nested["second_per_grid_ts"].tolist() == [1.0, 2.0, 0.5]
    flat = ours(text=texts, images=[a, b], videos=[v1, v2, v3], padding=True, fps=[2.0, 1.0, 4.0])
    assert_same(nested, flat)
    with pytest.raises(ValueError, match="Qwen2_5_VLProcessor needs text, images or videos"):
        ours()
    ids = ours.tokenizer(["Hi<|im_end|>"], return_tensors="np")["input_ids"]
    assert ours.batch_decode(ids) == hf.tokenizer.batch_decode(ids) == ["Hi<|im_end|>"]
    assert ours.decode(ids[0], skip_special_tokens=True) == "Hi"

    changed = Qwen2_5_VLProcessor.from_pretrained(folder, **SMALL)
    changed.chat_template = changed.chat_template.replace("You are a helpful assistant.", "Be brief.")
    changed.video_processor.fps, changed.video_processor.do_sample_frames = 1.0, True
    changed.video_processor.max_pixels = 32 * 28 * 28
    changed.save_pretrained(str(tmp_path))
    again = Qwen2_5_VLProcessor.from_pretrained(str(tmp_path))
    assert again.chat_template == changed.chat_template and "Be brief." in again.chat_template
    assert again.video_processor.to_dict() == changed.video_processor.to_dict()
    assert (again.image_processor.min_pixels, again.image_processor.max_pixels) == (SMALL["min_pixels"],
                                                                                 SMALL["max_pixels"])
