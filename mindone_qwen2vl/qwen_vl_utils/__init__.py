"""Torch-free port of Qwen's ``qwen-vl-utils``: load, sample and resize the images and videos of a chat.

    from mindone_qwen2vl.qwen_vl_utils import process_vision_info
    image_inputs, video_inputs = process_vision_info(messages)
"""
from .image_io import load_image, to_rgb
from .video_reader import VideoReader, get_video_reader_backend
from .vision_process import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    IMAGE_FACTOR,
    MAX_PIXELS,
    MAX_RATIO,
    MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
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
    "IMAGE_FACTOR",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "MAX_RATIO",
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_TOTAL_PIXELS",
    "FRAME_FACTOR",
    "FPS",
    "FPS_MIN_FRAMES",
    "FPS_MAX_FRAMES",
]
