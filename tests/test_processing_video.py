"""Qwen2VLVideoProcessor and videos through Qwen2VLProcessor: equal to HF's numpy video path."""
import os

import numpy as np
import pytest
import upstream
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from mindone_qwen2vl import Qwen2VLProcessor
from mindone_qwen2vl.processing import Qwen2VLVideoProcessor, hf_frame_count, hf_frame_indices
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


pytestmark = pytest.mark.usefixtures("quiet_hf_video_deprecation")  # conftest.py


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
    with pytest.raises(ValueError, match="videos holds no video"):
        vp([[]])  # one sample without videos
    with pytest.raises(ValueError, match="videos holds no video"):
        vp([])
    with pytest.raises(ValueError, match=r"videos: <int> is neither a video .* nor a list of videos"):
        vp([np.zeros((2, 56, 56, 3), np.uint8), 3])
    with pytest.raises(ValueError, match="videos: '.*4.mp4' is a path or URL; the processor takes decoded frames"):
        vp(V4)
    with pytest.raises(ValueError, match="video 1 of 1: .*aspect ratio must be smaller than 200"):
        vp([np.zeros((2, 3, 4, 1000), np.uint8)])


# ---- per-sample lists, as HF's make_batched_videos reads them ----

def test_nested_video_lists(videos):
    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR)
    v4, v3 = videos[0], videos[1]
    one = "<|vision_start|><|video_pad|><|vision_end|>Describe."
    flat = processor(text=[one, one], videos=[v4, v3], padding=True)
    for nested in ([[v4], [v3]], [[], [v4], [v3]], [[v4], [], [v3]], ([v4], [v3])):
        out = processor(text=[one, one], videos=nested, padding=True)
        for key in ("input_ids", "pixel_values_videos", "video_grid_thw"):
            np.testing.assert_array_equal(out[key], flat[key])
    two = processor(text=[one + one], videos=[[v4, v3]])  # two videos of one sample
    np.testing.assert_array_equal(two["pixel_values_videos"], flat["pixel_values_videos"])
    frames = [Image.fromarray(f) for f in v4.transpose(0, 2, 3, 1)]
    np.testing.assert_array_equal(processor(text=[one, one], videos=[[frames], [frames]])["video_grid_thw"],
                                  [[2, 24, 24], [2, 24, 24]])


def test_single_frame_is_a_one_frame_video(videos):
    frame = Image.fromarray(videos[0][0].transpose(1, 2, 0))
    ours = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR)(frame)
    pixels, grids = hf_reference([frame], {})
    np.testing.assert_array_equal(ours["video_grid_thw"], grids)
    np.testing.assert_array_equal(ours["pixel_values_videos"], pixels)


# ---- keywords: routed as HF's processor routes them ----

def test_video_options_reach_the_video_processor(videos):
    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR)
    text = "<|vision_start|><|video_pad|><|vision_end|>"
    lowered = {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28}
    out = processor(text=text, videos=videos[:1], videos_kwargs=lowered)
    np.testing.assert_array_equal(out["pixel_values_videos"], hf_reference(videos[:1], lowered)[0])
    # As in HF, a flat min_pixels/max_pixels is an image option: videos keep their limits.
    flat = processor(text=text, videos=videos[:1], **lowered)
    np.testing.assert_array_equal(flat["video_grid_thw"], [[2, 24, 24]])
    # `size` is an option of both.
    size = processor(text=text, videos=videos[:1], size={"shortest_edge": 16 * 784, "longest_edge": 64 * 784})
    np.testing.assert_array_equal(size["pixel_values_videos"], out["pixel_values_videos"])
    not_normalized = processor(text=text, videos=videos[:1], do_normalize=False, do_rescale=False)
    assert not_normalized["pixel_values_videos"].max() > 200  # raw 0..255 values
    with pytest.raises(ValueError, match="keyword argument fps was given twice"):
        processor(text=text, videos=videos[:1], fps=[2.0], videos_kwargs={"fps": [1.0]})
    with pytest.raises(ValueError, match="video processor option do_center_crop=True is not supported"):
        processor(text=text, videos=videos[:1], do_center_crop=True)
    with pytest.raises(ValueError, match="video processor option resample=0 is not supported"):
        processor(text=text, videos=videos[:1], videos_kwargs={"resample": 0})
    with pytest.raises(TypeError, match="unknown video processor option.*colour"):
        processor(text=text, videos=videos[:1], videos_kwargs={"colour": 1})


def test_process_vision_info_kwargs_go_to_the_processor():
    """As qwen-vl-utils' README: process_vision_info(..., return_video_kwargs=True), then
    processor(..., **video_kwargs)."""
    from mindone_qwen2vl.qwen_vl_utils import process_vision_info

    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR)
    messages = [{"role": "user", "content": [
        {"type": "video", "video": V4, "fps": 1.0}, {"type": "video", "video": V3, "nframes": 4},
        {"type": "text", "text": "Compare."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
    assert video_kwargs == {"do_sample_frames": False, "fps": [0.8, pytest.approx(4 / 146 * 23.976023976023978)]}
    out = processor(text=[text], images=images, videos=videos, padding=True, return_tensors="np", **video_kwargs)
    plain = processor(text=[text], images=images, videos=videos, padding=True, return_tensors="np")
    for key in plain:
        np.testing.assert_array_equal(out[key], plain[key])  # the fps describe the frames; Qwen2-VL does not use it
    assert out["video_grid_thw"].tolist() == [[2, 24, 24], [2, 26, 46]]


# ---- do_sample_frames: HF 4.57's sampler ----

def hf_sample_frames(total, video_fps, **options):
    """Indices from HF's own Qwen2VLVideoProcessor.sample_frames (called unbound: it needs only torch)."""
    import types

    from transformers.video_utils import VideoMetadata

    hf_class = upstream.hf_video_processor_class()
    defaults = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    return hf_class.sample_frames(defaults, metadata, **options).numpy().astype(np.int64)


def test_frame_sampler_equals_hf():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        total = int(rng.integers(1, 3000))
        video_fps = float(rng.choice([24.0, 25.0, 29.97, 30.0, rng.uniform(1, 60)]))
        options = {"num_frames": int(rng.integers(1, 400))} if rng.random() < 0.5 else {
            "fps": float(rng.choice([0.5, 1.0, 2.0, rng.uniform(0.1, 8)]))}
        if rng.random() < 0.3:
            options.update(min_frames=int(rng.integers(1, 20)), max_frames=int(rng.integers(2, 800)))
        try:
            expected = hf_sample_frames(total, video_fps, **options)
        except (ValueError, ZeroDivisionError):
            expected = None
        settings = {"min_frames": 4, "max_frames": 768, **options}
        try:
            count = hf_frame_count(total, video_fps, settings.get("fps"), settings.get("num_frames"), 2,
                                   settings["min_frames"], settings["max_frames"])
            ours = hf_frame_indices(total, count)
        except ValueError:
            ours = None
        if expected is None or ours is None:
            assert expected is None and ours is None, (total, video_fps, options)
        else:
            np.testing.assert_array_equal(ours, expected, err_msg=str((total, video_fps, options)))


def test_do_sample_frames_picks_hf_frames():
    frames = fetch_video({"video": V4, "nframes": 150, "max_pixels": 16 * 28 * 28})  # every frame, 112x112: 8x8 patches
    vp = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR)
    by_count = vp(frames, do_sample_frames=True, num_frames=8)
    picked = frames[hf_sample_frames(150, 30.0, num_frames=8)]
    np.testing.assert_array_equal(by_count["pixel_values_videos"], vp(picked)["pixel_values_videos"])
    metadata = {"fps": 30.0, "total_num_frames": 150}
    by_rate = vp([frames, frames], do_sample_frames=True, fps=[1.0, 2.0], video_metadata=[metadata, metadata])
    assert by_rate["video_grid_thw"][:, 0].tolist() == [2, 5]  # 5 s at 1 and 2 fps: 4 and 10 frames
    one = frames[hf_sample_frames(150, 30.0, fps=2.0)]
    assert len(one) == 10
    np.testing.assert_array_equal(by_rate["pixel_values_videos"][-5 * 8 * 8:], vp(one)["pixel_values_videos"])
    config = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR, do_sample_frames=True, num_frames=4)
    assert config(frames)["video_grid_thw"].tolist() == [[2, 8, 8]]  # the processor's own settings


def test_frame_options_are_never_ignored():
    frames = fetch_video({"video": V4, "nframes": 8, "max_pixels": 16 * 28 * 28})
    vp = Qwen2VLVideoProcessor.from_pretrained(MODEL_DIR)
    with pytest.raises(ValueError, match="num_frames=4 select frames only with do_sample_frames=True"):
        vp(frames, num_frames=4)
    with pytest.raises(ValueError, match="give either num_frames=4 or fps=2, not both"):
        vp(frames, do_sample_frames=True, num_frames=4, fps=2)
    with pytest.raises(ValueError, match="do_sample_frames=True needs fps .* or num_frames"):
        vp(frames, do_sample_frames=True)
    with pytest.raises(ValueError, match=r"video 1 of 1: sampling at fps=2 needs the video's own frame rate"):
        vp(frames, do_sample_frames=True, fps=2)
    with pytest.raises(ValueError, match=r"fps gives 2 value\(s\) for 1 video\(s\)"):
        vp(frames, fps=[2.0, 1.0])
    with pytest.raises(ValueError, match="fps must be positive numbers"):
        vp(frames, fps=0)
    with pytest.raises(ValueError, match="video 1 of 1: cannot sample 10 frames from a video of 8"):
        vp(frames, do_sample_frames=True, num_frames=10)
    with pytest.raises(ValueError, match="video_metadata says 20 frames but the video has 8"):
        vp(frames, do_sample_frames=True, num_frames=4, video_metadata={"total_num_frames": 20, "fps": 30})
    # fps alone, without sampling, describes the frames given: accepted, and the output is the frames'.
    np.testing.assert_array_equal(vp(frames, fps=2.0)["pixel_values_videos"], vp(frames)["pixel_values_videos"])


# ---- the model card's route with the real qwen-vl-utils package ----

def expand(texts, token, grids):
    """Each placeholder repeated t*h*w/4 times, in order through the batch (as HF's processor does)."""
    grids, out = iter(grids), []
    for text in texts:
        pieces = text.split(token)
        out.append(pieces[0] + "".join(token * (int(np.prod(next(grids))) // 4) + p for p in pieces[1:]))
    return out


def test_model_card_route_gives_hf_ids():
    """Real qwen-vl-utils 0.0.14 + HF's processor (its image processor, its numpy video path for the grids and
    pixels, its tokenizer) give the ids that our process_vision_info + our processor give."""
    real = upstream.qwen_vl_utils()
    from mindone_qwen2vl.qwen_vl_utils import process_vision_info

    processor = Qwen2VLProcessor.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    jpg1, jpg2 = os.path.join(ASSETS, "1.jpg"), os.path.join(ASSETS, "2.jpg")
    messages = [
        [{"role": "user", "content": [
            {"type": "image", "image": jpg1}, {"type": "video", "video": V4, "fps": 1.0},
            {"type": "text", "text": "What happens?"}]}],
        [{"role": "user", "content": [
            {"type": "video", "video": [jpg2, jpg2, jpg2]},  # a video given as frames
            {"type": "video", "video": V3, "max_pixels": 200000},
            {"type": "image", "image": os.path.join(ASSETS, "test.jpg"), "max_pixels": 256 * 28 * 28},
            {"type": "text", "text": "And here?"}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    their_images, their_videos, their_kwargs = real.process_vision_info(messages, return_video_kwargs=True)
    images, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
    assert kwargs == their_kwargs

    hf = Qwen2VLImageProcessor.from_pretrained(MODEL_DIR)
    image_out = hf(images=their_images, return_tensors="np")
    video_outs = [hf(images=None, videos=[v], return_tensors="np") for v in their_videos]
    video_grids = np.concatenate([o["video_grid_thw"] for o in video_outs])
    expanded = expand(expand(texts, "<|image_pad|>", image_out["image_grid_thw"]), VIDEO_PAD, video_grids)
    tokenizer.padding_side = "left"
    hf_ids = tokenizer(expanded, padding=True, return_tensors="np")

    ours = processor(text=texts, images=images, videos=videos, padding=True, **kwargs)
    with_theirs = processor(text=texts, images=their_images, videos=their_videos, padding=True, **their_kwargs)
    for out in (ours, with_theirs):
        np.testing.assert_array_equal(out["input_ids"], hf_ids["input_ids"])
        np.testing.assert_array_equal(out["attention_mask"], hf_ids["attention_mask"])
        np.testing.assert_array_equal(out["image_grid_thw"], image_out["image_grid_thw"])
        np.testing.assert_array_equal(out["video_grid_thw"], video_grids)
        np.testing.assert_array_equal(out["pixel_values"], image_out["pixel_values"])
    # Given the same frames, the video pixels are HF's exactly; from our own frames, as close as PIL is to torch.
    their_pixels = np.concatenate([o["pixel_values_videos"] for o in video_outs])
    np.testing.assert_array_equal(with_theirs["pixel_values_videos"], their_pixels)
    assert np.abs(ours["pixel_values_videos"] - their_pixels).mean() < 0.01
    # 2.jpg frames (300x199) -> 280x224 (multiples of 56) -> 364x308 (video minimum); 3.mp4 in 200000 pixels.
    assert video_grids.tolist() == [[2, 24, 24], [2, 22, 26], [6, 22, 42]]
