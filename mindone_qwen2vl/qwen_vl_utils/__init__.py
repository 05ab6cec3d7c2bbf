"""Torch-free port of Qwen's ``qwen-vl-utils``: load, sample and resize the images and videos of a chat.

Follows ``qwen-vl-utils`` 0.0.14 (the current release on PyPI): the same frame counts, frame indices, sizes,
pixel budgets and signatures; videos come back as uint8 numpy arrays. vision_process.py lists the differences.

    from mindone_qwen2vl.qwen_vl_utils import process_vision_info
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
    inputs = processor(text=[text], images=images, videos=videos, **video_kwargs)
"""
from .image_io import load_image, to_rgb
from .video_reader import VideoReader, get_video_reader_backend
from .vision_process import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    IMAGE_FACTOR,
    IMAGE_MAX_TOKEN_NUM,
    IMAGE_MIN_TOKEN_NUM,
    MAX_PIXELS,
    MAX_RATIO,
    MIN_PIXELS,
    MODEL_SEQ_LEN,
    SPATIAL_MERGE_SIZE,
    VIDEO_MAX_PIXELS,
    VIDEO_MAX_TOKEN_NUM,
    VIDEO_MIN_PIXELS,
    VIDEO_MIN_TOKEN_NUM,
    VIDEO_TOTAL_PIXELS,
    calculate_video_frame_range,
    extract_vision_info,
    fetch_image,
    fetch_video,
    process_vision_info,
    sample_frame_indices,
    smart_nframes,
    smart_resize,
)

QWEN_VL_UTILS_VERSION = "0.0.14"  # the upstream release these rules follow

__all__ = [
    "process_vision_info",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "smart_resize",
    "smart_nframes",
    "calculate_video_frame_range",
    "sample_frame_indices",
    "load_image",
    "to_rgb",
    "VideoReader",
    "get_video_reader_backend",
    "QWEN_VL_UTILS_VERSION",
    "MAX_RATIO",
    "SPATIAL_MERGE_SIZE",
    "IMAGE_MIN_TOKEN_NUM",
    "IMAGE_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_MAX_TOKEN_NUM",
    "MODEL_SEQ_LEN",
    "IMAGE_FACTOR",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_TOTAL_PIXELS",
    "FRAME_FACTOR",
    "FPS",
    "FPS_MIN_FRAMES",
    "FPS_MAX_FRAMES",
]
