"""Qwen2-VL's rules for turning the images and videos of a conversation into model-ready pixels.

Follows the published ``qwen-vl-utils`` 0.0.8 (the Qwen2-VL release) without torch: frame counts,
frame indices, resize targets and defaults are the same. Two later upstream additions are included:
transparent images are laid over white, and ``video_start``/``video_end`` select a frame range with
decord too. Returned videos are uint8 numpy arrays ``(T, 3, H, W)`` instead of float torch tensors.

Frames are resized with PIL's bicubic filter; upstream uses torchvision's antialiased bicubic,
which PIL's filter approximates to within 2 of 255 on under 1% of the values (tested).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile

import numpy as np
from PIL import Image

from .content_items import IMAGE_SOURCE_KEYS, VIDEO_SOURCE_KEYS, is_image_item, vision_items
from .image_io import load_image
from .sources import describe, is_url, local_path, read_url
from .video_reader import VideoReader, get_video_reader_backend, is_available

logger = logging.getLogger(__name__)

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor``, scaled into [min_pixels, max_pixels] keeping the
    aspect ratio; a ValueError when the long side is more than ``MAX_RATIO`` times the short side."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio} ({height}x{width}, height x width)"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def _source(ele: dict, keys, kind: str):
    for key in keys:
        if key in ele:
            return ele[key]
    raise ValueError(f"{kind} item {ele!r} has none of the keys {', '.join(map(repr, keys))}")


def _target_size(ele: dict, height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    if "resized_height" in ele and "resized_width" in ele:
        return smart_resize(ele["resized_height"], ele["resized_width"], factor=factor)
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def fetch_image(ele: dict, size_factor: int = IMAGE_FACTOR) -> Image.Image:
    """The RGB image of a content item, resized to multiples of ``size_factor``.

    Item keys: the source (``image``, ``url``, ``path`` or ``image_url``), then ``resized_height`` and
    ``resized_width``, or ``min_pixels``/``max_pixels`` (defaults MIN_PIXELS, MAX_PIXELS).
    """
    source = _source(ele, IMAGE_SOURCE_KEYS, "image")
    image = load_image(source)
    width, height = image.size
    try:
        size = _target_size(
            ele, height, width, size_factor, ele.get("min_pixels", MIN_PIXELS), ele.get("max_pixels", MAX_PIXELS)
        )
    except ValueError as err:
        raise ValueError(f"image {describe(source)}: {err}") from err
    resized_height, resized_width = size
    return image.resize((resized_width, resized_height), resample=Image.BICUBIC)


def smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
    """How many frames to sample: ``nframes`` rounded to an even count, or ``fps`` (default FPS) times the
    duration, kept within [min_frames, max_frames] (defaults 4 and min(768, total_frames)) and rounded to
    an even count. A ValueError when the count falls outside [2, total_frames] or both keys are given."""
    if "fps" in ele and "nframes" in ele:
        raise ValueError(f"give either 'fps' or 'nframes' for a video, not both (got fps={ele['fps']}, "
                         f"nframes={ele['nframes']})")
    if "nframes" in ele:
        nframes = round_by_factor(ele["nframes"], FRAME_FACTOR)
    else:
        fps = ele.get("fps", FPS)
        min_frames = ceil_by_factor(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by_factor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = min(max(nframes, min_frames), max_frames)
        nframes = round_by_factor(nframes, FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {nframes}.")
    return nframes


def calculate_video_frame_range(ele: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(first frame, last frame, frame count) of the ``video_start``..``video_end`` seconds of a video."""
    video_start, video_end = ele.get("video_start"), ele.get("video_end")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0
    if video_start is not None:
        start = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(
            f"video_start={video_start}, video_end={video_end} select no frames (frames {start}..{end}) of a "
            f"{duration:.2f} s video ({total_frames} frames at {video_fps:g} fps)"
        )
    return start, end, end - start + 1


def sample_frame_indices(start: int, end: int, nframes: int) -> np.ndarray:
    """``nframes`` evenly spaced indices from ``start`` to ``end``, both included.

    Upstream rounds ``torch.linspace`` in float32; float64 gives the same indices for videos up to
    10,000 frames (tested) and, past that, may differ from it by one frame where float32 rounds badly.
    """
    return np.round(np.linspace(start, end, nframes)).astype(np.int64)


def _open_video(path: str) -> VideoReader:
    backend = get_video_reader_backend()
    try:
        return VideoReader(path, backend)
    except ValueError as err:
        if backend == "av" or os.environ.get("FORCE_QWENVL_VIDEO_READER") or not is_available("av"):
            raise
        logger.warning("decord cannot read %r (%s); trying PyAV", path, err)
        return VideoReader(path, "av")


def _read_video(ele: dict, path: str, name: str):
    reader = _open_video(path)
    start, end, total = calculate_video_frame_range(ele, reader.num_frames, reader.fps)
    try:
        nframes = smart_nframes(ele, total_frames=total, video_fps=reader.fps)
    except ValueError as err:
        raise ValueError(f"video {name}: {err}") from err
    frames = reader.get_frames(sample_frame_indices(start, end, nframes))
    sample_fps = nframes / max(total, 1e-6) * reader.fps
    return frames, sample_fps


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def fetch_video(ele: dict, image_factor: int = IMAGE_FACTOR, return_video_sample_fps: bool = False):
    """The frames of a video content item.

    A path, ``file://`` path or http(s) URL in ``ele["video"]`` gives a uint8 array ``(T, 3, H, W)``:
    T frames chosen by ``smart_nframes`` (keys ``fps``/``nframes``, ``min_frames``/``max_frames``,
    ``video_start``/``video_end`` in seconds), all resized to one size, a multiple of ``image_factor``,
    within ``min_pixels``..``max_pixels`` where max_pixels defaults to the share of ``total_pixels`` of one
    pair of frames (capped at VIDEO_MAX_PIXELS). A list of frames (anything ``fetch_image`` takes) gives a
    list of PIL images, padded to an even count with the last one.
    With ``return_video_sample_fps`` the frames per second actually sampled comes back too.
    """
    video = _source(ele, VIDEO_SOURCE_KEYS, "video")
    if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4):
        if len(video) == 0:
            raise ValueError("video item holds an empty list of frames")
        options = {k: v for k, v in ele.items() if k not in ("type", "video", "url", "path")}
        images = [fetch_image({"image": frame, **options}, size_factor=image_factor) for frame in video]
        images += [images[-1]] * (ceil_by_factor(len(images), FRAME_FACTOR) - len(images))
        return (images, ele.get("fps", FPS)) if return_video_sample_fps else images
    if not isinstance(video, str):
        raise ValueError(
            f"unrecognized video input {describe(video)}: expected a path, file:// path, URL or list of frames"
        )

    if is_url(video):
        # The decoders want a file; keep the URL's extension so that the container is recognised.
        suffix = os.path.splitext(video.split("?")[0])[1] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(read_url(video, "video"))
            tmp.flush()
            frames, sample_fps = _read_video(ele, tmp.name, repr(video))
    else:
        path = local_path(video, "video")
        frames, sample_fps = _read_video(ele, path, repr(path))

    nframes, height, width = frames.shape[:3]
    min_pixels = ele.get("min_pixels", VIDEO_MIN_PIXELS)
    total_pixels = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = ele.get("max_pixels", max_pixels)
    try:
        resized_height, resized_width = _target_size(ele, height, width, image_factor, min_pixels, max_pixels)
    except ValueError as err:
        raise ValueError(f"video {video!r}: {err}") from err
    frames = _resize_frames(frames, resized_height, resized_width).transpose(0, 3, 1, 2)
    frames = np.ascontiguousarray(frames)
    return (frames, sample_fps) if return_video_sample_fps else frames


def extract_vision_info(conversations: list[dict] | list[list[dict]]) -> list[dict]:
    """The image and video items of one conversation or a batch of them, in order of appearance.

    The items the chat template writes a placeholder for (content_items.py). Upstream also lists items
    whose only mark is ``"type": "image_url"``, and then ``process_vision_info`` refuses them.
    """
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    return [ele for conversation in conversations for ele in vision_items(conversation)]


def process_vision_info(conversations: list[dict] | list[list[dict]], return_video_kwargs: bool = False):
    """(images, videos) of a conversation (or batch), each a list or None when empty; with
    ``return_video_kwargs`` also ``{"fps": [sampled fps of each video]}``."""
    images, videos, video_fps = [], [], []
    for ele in extract_vision_info(conversations):
        if is_image_item(ele):
            images.append(fetch_image(ele))
        else:
            frames, fps = fetch_video(ele, return_video_sample_fps=True)
            videos.append(frames)
            video_fps.append(fps)
    images = images or None
    videos = videos or None
    if return_video_kwargs:
        return images, videos, {"fps": video_fps}
    return images, videos
