"""Qwen2-VL's rules for turning the images and videos of a conversation into model-ready pixels.

Follows the published ``qwen-vl-utils`` 0.0.14 (the current release) without torch: frame counts, frame
indices, resize targets, pixel budgets and defaults are the same, and so are the signatures
(``image_patch_size``, ``return_video_sample_fps``, ``return_video_metadata``, ``return_video_kwargs``).
The tests run the real package's functions over many inputs and compare.

Where this port differs:
- videos are uint8 numpy arrays ``(T, 3, H, W)`` instead of float torch tensors; frames are resized with
  PIL's bicubic filter where upstream uses torchvision's antialiased bicubic on tensors: the sizes are the same,
  the values differ by more than 2 of 255 on under 0.05% of them (mean difference under 0.3; tested);
- decord, else PyAV, decodes (upstream: torchcodec, decord, torchvision); ``video_start``/``video_end``
  select frames the same way with both;
- where upstream fails, this port gives a result: ``smart_resize`` never returns a side of 0 (a very thin
  image keeps one ``factor``, as in HF's rule), and an item's ``max_pixels`` below the default
  ``min_pixels`` lowers the minimum with it (upstream stops on an assertion). Its errors name the item.
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

MAX_RATIO = 200
SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# A video's default pixel budget is 90% of this many tokens; the MODEL_SEQ_LEN environment variable replaces it
# (read at each call here, at import upstream).
MODEL_SEQ_LEN = 128000

# The same limits in pixels for Qwen2-VL's 14-pixel patches (one token per 28 x 28 pixels), under the names of
# the earlier releases.
IMAGE_FACTOR = 14 * SPATIAL_MERGE_SIZE
MIN_PIXELS = IMAGE_MIN_TOKEN_NUM * IMAGE_FACTOR**2
MAX_PIXELS = IMAGE_MAX_TOKEN_NUM * IMAGE_FACTOR**2
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKEN_NUM * IMAGE_FACTOR**2
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKEN_NUM * IMAGE_FACTOR**2
VIDEO_TOTAL_PIXELS = int(MODEL_SEQ_LEN * IMAGE_FACTOR * IMAGE_FACTOR * 0.9)  # with MODEL_SEQ_LEN unset


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor``, scaled into [min_pixels, max_pixels] keeping the
    aspect ratio; the limits default to 4 and 16384 tokens of ``factor`` x ``factor`` pixels. A ValueError when
    the long side is more than ``MAX_RATIO`` times the short side or ``max_pixels < min_pixels``."""
    max_pixels = IMAGE_MAX_TOKEN_NUM * factor**2 if max_pixels is None else max_pixels
    min_pixels = IMAGE_MIN_TOKEN_NUM * factor**2 if min_pixels is None else min_pixels
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} is smaller than min_pixels={min_pixels}")
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
        # Upstream has no lower bound here and returns 0 for a thin image under a small budget (its resize then fails).
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


def _target_size(ele: dict, height: int, width: int, factor: int, min_pixels, max_pixels):
    if "resized_height" in ele and "resized_width" in ele:
        return smart_resize(ele["resized_height"], ele["resized_width"], factor=factor)
    if "min_pixels" not in ele and max_pixels < min_pixels:
        # Upstream stops on an assertion; an explicit maximum below the default minimum is the size asked for.
        min_pixels = max_pixels
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def fetch_image(ele: dict, image_patch_size: int = 14) -> Image.Image:
    """The RGB image of a content item, resized to multiples of ``image_patch_size * 2``.

    Item keys: the source (``image``, ``url``, ``path`` or ``image_url``), then ``resized_height`` and
    ``resized_width``, or ``min_pixels``/``max_pixels`` (defaults 4 and 16384 tokens: MIN_PIXELS, MAX_PIXELS
    for 14-pixel patches).
    """
    factor = image_patch_size * SPATIAL_MERGE_SIZE
    source = _source(ele, IMAGE_SOURCE_KEYS, "image")
    image = load_image(source)
    width, height = image.size
    min_pixels = ele.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2)
    max_pixels = ele.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2)
    try:
        resized_height, resized_width = _target_size(ele, height, width, factor, min_pixels, max_pixels)
    except ValueError as err:
        raise ValueError(f"image {describe(source)}: {err}") from err
    return image.resize((resized_width, resized_height), resample=Image.BICUBIC)


def smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
    """How many frames to sample: ``nframes`` rounded to an even count, or ``fps`` (default FPS) times the
    duration, kept within [min_frames, max_frames] (defaults 4 and min(768, total_frames)) and the video's
    length, then rounded down to an even count. A ValueError when the count falls outside [2, total_frames]
    or both keys are given."""
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
        nframes = min(max(nframes, min_frames), max_frames, total_frames)
        nframes = floor_by_factor(nframes, FRAME_FACTOR)
    if total_frames < FRAME_FACTOR:
        raise ValueError(f"the video has {total_frames} frame(s); sampling it takes at least {FRAME_FACTOR}")
    if not FRAME_FACTOR <= nframes <= total_frames:
        asked = f"nframes {ele['nframes']}" + (f" (rounded to {nframes})" if nframes != ele["nframes"] else "")
        raise ValueError(f"{asked} is outside [{FRAME_FACTOR}, {total_frames}], the video's frame count")
    return nframes


def calculate_video_frame_range(ele: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(first frame, last frame, frame count) of the ``video_start``..``video_end`` seconds of a video."""
    if not video_fps > 0:
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    if total_frames <= 0:
        raise ValueError(f"total_frames must be a positive integer, got {total_frames}")
    video_start, video_end = ele.get("video_start"), ele.get("video_end")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    if video_start is not None and video_end is not None and video_start >= video_end:
        raise ValueError(f"video_start={video_start} s is not before video_end={video_end} s")
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
    """(uint8 frames (T, H, W, 3), metadata, sampled fps) of a video file, chosen by Qwen2-VL's rules."""
    reader = _open_video(path)
    try:
        start, end, total = calculate_video_frame_range(ele, reader.num_frames, reader.fps)
        nframes = smart_nframes(ele, total_frames=total, video_fps=reader.fps)
    except ValueError as err:
        raise ValueError(f"video {name}: {err}") from err
    indices = sample_frame_indices(start, end, nframes)
    frames = reader.get_frames(indices)
    metadata = {
        "fps": reader.fps,
        "frames_indices": indices.tolist(),
        "total_num_frames": total,
        "video_backend": reader.backend,
    }
    return frames, metadata, nframes / max(total, 1e-6) * reader.fps


def _frames_from_list(ele: dict, frames, image_patch_size: int):
    """(uint8 frames (T, H, W, 3), metadata, sample fps) of a video given as a list of frames.

    As upstream: every frame goes through ``fetch_image`` with the item's own keys, which upstream calls with
    its 28-pixel factor where ``fetch_image`` expects a patch size, so frames are first fitted to multiples of
    56 pixels (kept: the video's size, hence its token count, depends on it). The count is padded to an even
    number with the last frame; the caller then resizes the whole video by the video rules.
    """
    options = {k: v for k, v in ele.items() if k not in ("type", "video", "url", "path")}
    images = [fetch_image({"image": frame, **options}, image_patch_size * SPATIAL_MERGE_SIZE) for frame in frames]
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:
        raise ValueError(f"frames of unequal sizes after resizing ({', '.join(f'{w}x{h}' for w, h in sizes)}): "
                         "give frames of one size")
    nframes = ceil_by_factor(len(images), FRAME_FACTOR)
    images += [images[-1]] * (nframes - len(images))
    sample_fps = ele.get("sample_fps", 2.0)
    raw_fps = ele.get("raw_fps", sample_fps)
    metadata = {
        "fps": raw_fps,
        "frames_indices": list(range(nframes)),
        "total_num_frames": nframes / sample_fps * raw_fps,
    }
    return np.stack([np.asarray(image) for image in images]), metadata, sample_fps


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def _model_seq_len() -> int:
    return int(float(os.environ.get("MODEL_SEQ_LEN", MODEL_SEQ_LEN)))


def fetch_video(
    ele: dict, image_patch_size: int = 14, return_video_sample_fps: bool = False, return_video_metadata: bool = False
):
    """The frames of a video content item as a uint8 array ``(T, 3, H, W)``.

    The video is a path, ``file://`` path or http(s) URL, whose frames are chosen by ``smart_nframes`` (keys
    ``fps``/``nframes``, ``min_frames``/``max_frames``, ``video_start``/``video_end`` in seconds), or a list of
    frames (anything ``fetch_image`` takes; padded to an even count with the last one). All frames get one
    size, a multiple of ``image_patch_size * 2``: ``resized_height``/``resized_width``, or within
    ``min_pixels`` (default 128 tokens) and ``max_pixels``, which can only lower the per-frame cap: the
    smaller of 768 tokens and the frame's share of ``total_pixels`` (default 90% of MODEL_SEQ_LEN tokens
    for the whole video, a pair of frames per temporal patch), but at least 1.05 x min_pixels.

    ``return_video_metadata`` returns ``(frames, metadata)`` (fps, frames_indices, total_num_frames and, for
    files, video_backend); ``return_video_sample_fps`` adds the frames per second sampled (for a list of
    frames, the item's ``sample_fps``, default 2).
    """
    factor = image_patch_size * SPATIAL_MERGE_SIZE
    video = _source(ele, VIDEO_SOURCE_KEYS, "video")
    if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4):
        name = f"of {len(video)} frames"
        if len(video) == 0:
            raise ValueError("video item holds an empty list of frames")
        try:
            frames, metadata, sample_fps = _frames_from_list(ele, video, image_patch_size)
        except ValueError as err:
            raise ValueError(f"video {name}: {err}") from err
    elif not isinstance(video, str):
        raise ValueError(
            f"unrecognized video input {describe(video)}: expected a path, file:// path, URL or list of frames"
        )
    elif is_url(video):
        name = repr(video)
        # The decoders want a file; keep the URL's extension so that the container is recognised.
        suffix = os.path.splitext(video.split("?")[0])[1] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(read_url(video, "video"))
            tmp.flush()
            frames, metadata, sample_fps = _read_video(ele, tmp.name, name)
    else:
        path = local_path(video, "video")
        name = repr(path)
        frames, metadata, sample_fps = _read_video(ele, path, name)

    nframes, height, width = frames.shape[:3]
    min_pixels = ele.get("min_pixels", VIDEO_MIN_TOKEN_NUM * factor**2)
    total_pixels = ele.get("total_pixels", _model_seq_len() * factor * factor * 0.9)
    max_pixels = max(min(VIDEO_MAX_TOKEN_NUM * factor**2, total_pixels / nframes * FRAME_FACTOR),
                     int(min_pixels * 1.05))
    if ele.get("max_pixels", 0) > max_pixels:
        logger.warning("video %s: max_pixels=%s exceeds the per-frame cap %s; the cap applies",
                       name, ele["max_pixels"], max_pixels)
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    try:
        resized_height, resized_width = _target_size(ele, height, width, factor, min_pixels, max_pixels)
    except ValueError as err:
        raise ValueError(f"video {name}: {err}") from err
    frames = np.ascontiguousarray(_resize_frames(frames, resized_height, resized_width).transpose(0, 3, 1, 2))
    out = (frames, metadata) if return_video_metadata else frames
    return (out, sample_fps) if return_video_sample_fps else out


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


def process_vision_info(
    conversations: list[dict] | list[list[dict]],
    return_video_kwargs: bool = False,
    return_video_metadata: bool = False,
    image_patch_size: int = 14,
):
    """(images, videos) of a conversation (or batch), each a list or None when empty.

    With ``return_video_kwargs`` also the keywords for the processor: ``{"do_sample_frames": False,
    "fps": [sampled fps of each video]}`` (without "fps" when ``return_video_metadata``, which makes each
    video a ``(frames, metadata)`` pair, as upstream). Qwen2.5-VL's processor turns these fps into
    ``second_per_grid_ts`` (``temporal_patch_size / fps``); Qwen2-VL's inputs do not depend on them.
    """
    images, videos, video_fps = [], [], []
    for ele in extract_vision_info(conversations):
        if is_image_item(ele):
            images.append(fetch_image(ele, image_patch_size=image_patch_size))
        else:
            video, fps = fetch_video(ele, image_patch_size=image_patch_size, return_video_sample_fps=True,
                                     return_video_metadata=return_video_metadata)
            videos.append(video)
            video_fps.append(fps)
    video_kwargs = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = video_fps
    if return_video_kwargs:
        return images or None, videos or None, video_kwargs
    return images or None, videos or None
