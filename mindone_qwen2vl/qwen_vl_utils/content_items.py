"""Which content items of a chat are images and which are videos, and which keys name their source.

The one definition for the whole package (the processor, ``process_vision_info``, the scripts' batch files).
It is the chat template's own test for where ``<|image_pad|>`` and ``<|video_pad|>`` go, so the media loaded
always match the placeholders. An ``image_url`` key makes an image, as in qwen-vl-utils and the template;
a ``"type": "image_url"`` without that key does not: the template writes no placeholder for it.
"""
from __future__ import annotations

# "image" and "image_url" are qwen-vl-utils' names (in its order), "url" and "path" Hugging Face's.
# An item with both "image_url" and "url"/"path" contradicts itself; the Hugging Face key is read then.
IMAGE_SOURCE_KEYS = ("image", "url", "path", "image_url")
VIDEO_SOURCE_KEYS = ("video", "url", "path")
# The other keys an item may carry: what fetch_image / fetch_video read (sample_fps and raw_fps: a video given
# as a list of frames). The scripts refuse any other key in a batch file, so a typo is an error, not ignored.
IMAGE_OPTION_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTION_KEYS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end", "min_pixels",
                     "max_pixels", "total_pixels", "resized_height", "resized_width", "sample_fps", "raw_fps")


def is_image_item(item: dict) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def is_video_item(item: dict) -> bool:
    # The template asks about images first: an item that passes both tests is an image.
    return not is_image_item(item) and (item.get("type") == "video" or "video" in item)


def vision_items(conversation):
    """The image and video items of one conversation (a list of messages), in order."""
    for message in conversation:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            for item in content:
                if isinstance(item, dict) and (is_image_item(item) or is_video_item(item)):
                    yield item
