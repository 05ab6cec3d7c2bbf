"""Qwen2-VL processor without torch or torchvision: text, images and videos to model inputs.

The tokenizer, chat template and numpy image processor are Hugging Face's own. Videos go through
``Qwen2VLVideoProcessor`` below, a numpy processor whose patches equal those of Hugging Face's numpy
``Qwen2VLImageProcessor`` video path and whose options, frame sampling and saved settings are those of HF
4.57's ``Qwen2VLVideoProcessor`` (which needs torchvision).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os

import numpy as np
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
from transformers.utils import cached_file

from .qwen_vl_utils import fetch_image, fetch_video, load_image
from .qwen_vl_utils.content_items import IMAGE_SOURCE_KEYS, VIDEO_SOURCE_KEYS, is_image_item, vision_items
from .qwen_vl_utils.sources import describe

__all__ = ["Qwen2VLProcessor", "Qwen2VLVideoProcessor"]

logger = logging.getLogger(__name__)

VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "chat_templates"
# from_pretrained keywords that say where the files are, passed to every part.
HUB_KEYS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
BICUBIC = 3  # PIL's (and HF's PILImageResampling) number for bicubic


def _host(value):
    """numpy for mindspore and torch tensors; anything else unchanged."""
    if hasattr(value, "asnumpy"):
        return value.asnumpy()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        return value.numpy()
    return value


def _is_frame(item) -> bool:
    item = _host(item)
    return isinstance(item, (Image.Image, str)) or (isinstance(item, np.ndarray) and item.ndim in (2, 3))


def _is_video(item) -> bool:
    """A 4-D array, or a non-empty list of frames (HF's test, plus frame paths and grayscale frames)."""
    item = _host(item)
    if isinstance(item, np.ndarray):
        return item.ndim == 4
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(_is_frame(f) for f in item)


def _flatten_videos(videos) -> list:
    """Videos in placeholder order, read as HF's ``make_batched_videos`` reads them: one video, one frame (a
    one-frame video), a list of videos, or a list per sample (whose empty lists hold no video)."""
    if isinstance(videos, str):
        raise ValueError(
            f"videos: {describe(videos)} is a path or URL; the processor takes decoded frames: read the video "
            "with qwen_vl_utils.fetch_video / process_vision_info, or use apply_chat_template(tokenize=True)"
        )
    if _is_video(videos):
        return [videos]
    if _is_frame(videos):
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise ValueError(f"videos: expected a video, a list of videos or a list per sample, got {describe(videos)}")
    flat = []
    for item in videos:
        if isinstance(item, (list, tuple)) and not _is_video(item):
            flat.extend(_flatten_videos(item) if item else [])
        elif _is_video(item):
            flat.append(item)
        else:
            raise ValueError(
                f"videos: {describe(item)} is neither a video (a 4-D array or a list of frames) nor a list of videos"
            )
    return flat


def _flatten_metadata(metadata) -> list:
    if isinstance(metadata, (list, tuple)):
        return [m for item in metadata for m in _flatten_metadata(item)]
    return [metadata]


def _metadata_value(metadata, key):
    if metadata is None:
        return None
    return metadata.get(key) if isinstance(metadata, dict) else getattr(metadata, key, None)


def _video_frames(video, name: str, input_data_format=None):
    """One video as uint8 ``(T, H, W, 3)`` frames: from a ``(T, C, H, W)`` or ``(T, H, W, C)`` array (as HF,
    channels first wins when both readings fit, unless ``input_data_format`` says), a list of PIL images,
    image paths or ``(H, W, C)``/``(C, H, W)`` arrays. Frames of unequal sizes stay a list; grayscale becomes RGB."""
    video = _host(video)
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D array (frames, ...), got shape {video.shape}")
        if input_data_format is None:
            channels_first = video.shape[1] in (1, 3)
        elif input_data_format in ("channels_first", "channels_last"):
            channels_first = input_data_format == "channels_first"
        else:
            raise ValueError(f"input_data_format={input_data_format!r}: expected 'channels_first' or 'channels_last'")
        channels = video.shape[1] if channels_first else video.shape[-1]
        if channels not in (1, 3):
            raise ValueError(f"{name}: shape {video.shape} has no RGB channel axis")
        frames = video.transpose(0, 2, 3, 1) if channels_first else video
        if frames.shape[-1] == 1:
            frames = np.repeat(frames, 3, axis=-1)
        if frames.dtype != np.uint8:
            if not np.all(np.mod(frames, 1) == 0) or frames.min() < 0 or frames.max() > 255:
                raise ValueError(
                    f"{name}: expected pixel values 0..255 (uint8 or integer-valued), "
                    f"got {frames.dtype} in {frames.min()}..{frames.max()}"
                )
            frames = frames.astype(np.uint8)
        return frames
    if isinstance(video, (list, tuple)) and len(video) > 0:
        try:
            frames = [np.asarray(load_image(_host(frame))) for frame in video]
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        size = frames[0].shape
        # Only the first frame sets the output size (as in HF); stack after resizing to it.
        return frames if any(f.shape != size for f in frames) else np.stack(frames)
    raise ValueError(f"{name}: expected a 4-D array or a non-empty list of frames, got {describe(video)}")


def hf_frame_count(total: int, video_fps, fps, num_frames, temporal_patch_size: int, min_frames: int, max_frames: int):
    """How many frames HF 4.57's ``Qwen2VLVideoProcessor.sample_frames`` keeps: ``num_frames`` rounded to a
    multiple of the temporal patch, or ``fps`` times the duration, kept within [min_frames, max_frames] and the
    video's length, then rounded down to that multiple."""
    if num_frames is not None:
        count = round(num_frames / temporal_patch_size) * temporal_patch_size
    else:
        if video_fps is None:
            raise ValueError(
                f"sampling at fps={fps} needs the video's own frame rate: pass video_metadata (with 'fps') "
                "or num_frames"
            )
        max_frames = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
        count = min(max(total / video_fps * fps, min_frames), max_frames, total)
        count = math.floor(count / temporal_patch_size) * temporal_patch_size
    if count > total:
        raise ValueError(f"cannot sample {count} frames from a video of {total}: lower num_frames or fps")
    if count <= 0:
        raise ValueError(f"sampling keeps no frame of a video of {total} (num_frames={num_frames}, fps={fps})")
    return count


def hf_frame_indices(total: int, count: int) -> np.ndarray:
    """HF's uniform indices ``torch.arange(0, total, total / count).int()``, computed as torch does on the CPU:
    float32 values from vectors of 8 (base in float32, offsets in float64), in pairs, the rest one by one.
    Its length is ``ceil(total / step)``, which can be ``count + 1``. Tested equal to torch over 100,000 cases;
    a torch build with other vector widths may differ by one frame where a value falls on an integer."""
    step = total / count
    length = math.ceil(total / step)
    values = np.empty(length, np.float32)
    vectorized = length - length % 16
    for begin in range(0, vectorized, 8):
        base = np.float32(step * begin)
        values[begin:begin + 8] = (np.float64(base) + np.arange(8) * step).astype(np.float32)
    for i in range(vectorized, length):
        values[i] = np.float32(step * i)
    return values.astype(np.int64)


class Qwen2VLVideoProcessor:
    """Videos to ``pixel_values_videos`` ``(sum of T*H*W patches, 3*2*14*14)`` and ``video_grid_thw``.

    Same steps and float arithmetic as HF's numpy processor: every frame resized (PIL bicubic) to
    ``smart_resize`` of the first frame, scaled by 1/255 in float64 then float32, normalized in
    float32, the frame count padded to a multiple of ``temporal_patch_size`` with the last frame, and
    cut into patches in the order the vision tower's patch merger expects.

    Settings, call options and ``video_preprocessor_config.json`` are those of HF 4.57's
    ``Qwen2VLVideoProcessor``. ``do_sample_frames=True`` picks frames as HF does (``num_frames``, or ``fps`` with
    the video's rate from ``video_metadata``); with ``do_sample_frames=False`` (the default) the frames are kept
    as given and ``fps`` only describes them (qwen-vl-utils passes the rate it sampled at; Qwen2-VL's inputs do
    not depend on it), while ``num_frames``, ``min_frames`` and ``max_frames`` are refused. Per-call
    ``min_pixels``/``max_pixels`` apply (HF 4.57 ignores them for videos and resizes by ``size`` alone).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    SAVED = ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
             "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "do_sample_frames", "fps",
             "num_frames", "min_frames", "max_frames")

    def __init__(
        self,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean=None,
        image_std=None,
        rescale_factor: float = 1 / 255,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        do_sample_frames: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
        min_frames: int = 4,
        max_frames: int = 768,
        size: dict | None = None,
        processor_class: str = "Qwen2VLProcessor",
        **unused,  # the rest of HF's file: video_processor_type, resample, ...
    ):
        size = size or {}
        # As HF: min_pixels/max_pixels, when given, win over `size`.
        self.min_pixels = min_pixels if min_pixels is not None else size.get("shortest_edge", 128 * 28 * 28)
        self.max_pixels = max_pixels if max_pixels is not None else size.get("longest_edge", 768 * 28 * 28)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.rescale_factor = rescale_factor
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.do_convert_rgb = do_convert_rgb
        self.do_sample_frames = do_sample_frames
        self.fps = fps
        self.num_frames = num_frames
        self.min_frames = min_frames
        self.max_frames = max_frames
        # Written into the saved file; the processor that saves this one sets its own name, as HF does.
        self.processor_class = processor_class

    @property
    def size(self) -> dict:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def to_dict(self) -> dict:
        """HF's ``video_preprocessor_config.json`` layout, readable by HF's ``Qwen2VLVideoProcessor`` too."""
        config = {key: getattr(self, key) for key in self.SAVED}
        config.update(size=self.size, resample=BICUBIC, video_processor_type="Qwen2VLVideoProcessor",
                      processor_class=self.processor_class)
        return config

    def save_pretrained(self, save_directory) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VIDEO_PROCESSOR_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """From ``video_preprocessor_config.json``, else ``preprocessor_config.json`` (where Qwen2-VL's checkpoints
        keep both), else ``processor_config.json``, as HF looks for them; other keyword arguments override the file."""
        hub = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
        config = None
        for filename in (VIDEO_PROCESSOR_FILE, IMAGE_PROCESSOR_FILE, PROCESSOR_FILE):
            path = cached_file(pretrained_model_name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                               **hub)
            if path is not None:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                config = config.get("video_processor", config)
                break
        if config is None:
            raise OSError(f"{pretrained_model_name_or_path} has none of {VIDEO_PROCESSOR_FILE}, "
                          f"{IMAGE_PROCESSOR_FILE}, {PROCESSOR_FILE}")
        config.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**config)

    def _options(self, options: dict) -> dict:
        """This call's settings: the processor's, replaced by the options given."""
        unsupported = {
            "do_center_crop": lambda v: not v, "crop_size": lambda v: v is None,
            "resample": lambda v: v is None or int(v) == BICUBIC,
            "data_format": lambda v: v is None or str(getattr(v, "value", v)) == "channels_first",
            "return_metadata": lambda v: not v, "device": lambda v: v is None or str(v) == "cpu",
        }
        for key, fine in unsupported.items():
            value = options.pop(key, None)
            if not fine(value):
                raise ValueError(f"video processor option {key}={value!r} is not supported (numpy, on the host, "
                                 "bicubic, channels first, no cropping)")
        options.pop("default_to_square", None)  # shapes a `size` of other forms; Qwen2-VL's is min/max pixels
        known = set(self.SAVED) | {"size", "video_metadata", "input_data_format"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown video processor option(s) {', '.join(unknown)}")
        size = options.pop("size", None) or {}
        settings = {key: getattr(self, key) for key in self.SAVED}
        settings["min_pixels"] = size.get("shortest_edge", self.min_pixels)
        settings["max_pixels"] = size.get("longest_edge", self.max_pixels)
        settings.update({k: v for k, v in options.items() if v is not None})
        return settings

    def _sample(self, frames, index, fps, num_frames, settings, metadata):
        """The frames HF 4.57's sampler keeps (``do_sample_frames=True``)."""
        if isinstance(fps, (list, tuple)):
            fps = fps[index]
        total = _metadata_value(metadata, "total_num_frames") or len(frames)
        count = hf_frame_count(int(total), _metadata_value(metadata, "fps"), fps, num_frames,
                               settings["temporal_patch_size"], settings["min_frames"], settings["max_frames"])
        indices = hf_frame_indices(int(total), count)
        if indices.max() >= len(frames):
            raise ValueError(f"video_metadata says {total} frames but the video has {len(frames)}")
        return [frames[i] for i in indices] if isinstance(frames, list) else frames[indices]

    def _sampling(self, options, count_videos):
        """(do_sample_frames, fps, num_frames) of a call, checked: fps/num_frames of the call, else of the
        processor's settings (num_frames first, as HF); refused when no sampling would use them."""
        fps, num_frames = options.get("fps"), options.get("num_frames")
        if fps is not None and num_frames is not None:
            raise ValueError(f"give either num_frames={num_frames} or fps={fps}, not both")
        for value in fps if isinstance(fps, (list, tuple)) else [fps]:
            if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"fps must be positive numbers, got {fps!r}")
        if isinstance(fps, (list, tuple)) and len(fps) != count_videos:
            raise ValueError(f"fps gives {len(fps)} value(s) for {count_videos} video(s)")
        do_sample = options.get("do_sample_frames")
        do_sample = self.do_sample_frames if do_sample is None else do_sample
        if not do_sample:
            given = [f"{k}={options[k]}" for k in ("num_frames", "min_frames", "max_frames")
                     if options.get(k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} select frames only with do_sample_frames=True; without it the "
                                 "frames given are all kept")
            return False, fps, None
        if fps is None and num_frames is None:
            fps, num_frames = (None, self.num_frames) if self.num_frames is not None else (self.fps, None)
        if fps is None and num_frames is None:
            raise ValueError("do_sample_frames=True needs fps (with video_metadata) or num_frames")
        return True, fps, num_frames

    def _patches(self, frames, settings):
        first = frames[0]
        height, width = first.shape[:2]
        p, m, tp = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
        new_h, new_w = height, width
        if settings["do_resize"]:
            new_h, new_w = hf_smart_resize(height, width, factor=p * m, min_pixels=settings["min_pixels"],
                                           max_pixels=settings["max_pixels"])
        elif height % (p * m) or width % (p * m):
            raise ValueError(f"do_resize=False needs frames whose sides are multiples of {p * m}, got {height}x{width}")
        resized = [
            f if f.shape[:2] == (new_h, new_w)
            else np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=Image.BICUBIC))
            for f in frames
        ]
        video = np.stack(resized).astype(np.float64)
        if settings["do_rescale"]:
            video = video * settings["rescale_factor"]
        video = video.astype(np.float32)
        if settings["do_normalize"]:
            mean = np.asarray(settings["image_mean"], dtype=np.float32)
            std = np.asarray(settings["image_std"], dtype=np.float32)
            video = (video - mean) / std
        video = video.transpose(0, 3, 1, 2)  # (T, C, H, W)

        if video.shape[0] % tp:
            pad = np.repeat(video[-1:], tp - video.shape[0] % tp, axis=0)
            video = np.concatenate([video, pad], axis=0)
        channels = video.shape[1]
        grid_t, grid_h, grid_w = video.shape[0] // tp, new_h // p, new_w // p
        # Patches of one merge window (m x m neighbours) must be consecutive for the patch merger.
        video = video.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        video = video.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = video.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        return patches, (grid_t, grid_h, grid_w)

    def __call__(self, videos, return_tensors=None, **options):
        """``videos``: one video (a ``(T, C, H, W)``/``(T, H, W, C)`` array or a list of frames), a list of them,
        or a list per sample. ``options``: HF's video processor options (``min_pixels``, ``max_pixels``,
        ``size``, ``do_sample_frames``, ``fps`` (one number or one per video), ``num_frames``, ``video_metadata``
        (one per video), ``patch_size``, ``do_normalize``, ...)."""
        data, _ = self.process(videos, **options)
        return _batch(data, return_tensors)

    preprocess = __call__

    def process(self, videos, **options):
        """(``pixel_values_videos``/``video_grid_thw`` as numpy, frames per second of each video's frames as they
        were patched, None where nothing says). Qwen2.5-VL's processor turns the rates into
        ``second_per_grid_ts``; see ``_frame_rate``."""
        videos = _flatten_videos(videos)
        if not videos:
            raise ValueError("videos holds no video: give None when there are no videos")
        do_sample, fps, num_frames = self._sampling(options, len(videos))
        given_fps = options.get("fps")
        settings = self._options(dict(options))
        metadata = settings.pop("video_metadata", None)
        metadata = _flatten_metadata(metadata) if metadata is not None else [None] * len(videos)
        if len(metadata) != len(videos):
            raise ValueError(f"video_metadata gives {len(metadata)} entries for {len(videos)} video(s)")
        all_patches, grids, rates = [], [], []
        for index, (video, meta) in enumerate(zip(videos, metadata)):
            name = f"video {index + 1} of {len(videos)}"
            try:
                frames = _video_frames(video, name, settings.get("input_data_format"))
                total = len(frames)
                if do_sample:
                    frames = self._sample(frames, index, fps, num_frames, settings, meta)
                patches, grid = self._patches(frames, settings)
            except ValueError as err:
                raise ValueError(str(err) if str(err).startswith(name) else f"{name}: {err}") from err
            all_patches.append(patches)
            grids.append(grid)
            rates.append(_frame_rate(_per_video(given_fps, index), _per_video(fps, index) if do_sample else None,
                                     len(frames) if do_sample and num_frames is not None else None, total, meta))
        data = {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        return data, rates


def _per_video(value, index):
    return value[index] if isinstance(value, (list, tuple)) else value


def _frame_rate(given_fps, sampled_fps, sampled_count, frames, metadata):
    """Frames per second of one video's frames, for Qwen2.5-VL's ``second_per_grid_ts``, or None.

    In order: the ``fps`` given with the call (HF's only source); the rate this processor sampled at
    (``do_sample_frames``: its ``fps``, or ``num_frames`` over the video's duration from ``video_metadata``); the
    rate ``video_metadata`` describes (``len(frames_indices) / total_num_frames * fps``, which is the sampled fps
    qwen-vl-utils reports, for its ``return_video_metadata=True`` route). HF 4.57 takes 2 fps in the last two
    cases whatever the frames are; the model would then place the frames at wrong times.
    """
    if given_fps is not None:
        return float(given_fps)
    if sampled_fps is not None:
        return float(sampled_fps)
    video_fps = _metadata_value(metadata, "fps")
    if sampled_count is not None:
        total = _metadata_value(metadata, "total_num_frames") or frames
        return sampled_count / total * video_fps if video_fps else None
    indices = _metadata_value(metadata, "frames_indices")
    total = _metadata_value(metadata, "total_num_frames")
    if video_fps and total and indices is not None and len(indices):
        return len(indices) / total * video_fps
    return None


def _batch(data: dict, return_tensors) -> BatchFeature:
    """A BatchFeature; ``return_tensors="ms"`` gives mindspore Tensors (HF knows np, pt, tf, jax, mlx)."""
    if return_tensors in ("ms", "mindspore"):
        import mindspore

        batch = BatchFeature(data=data, tensor_type="np")
        for key, value in batch.items():
            batch[key] = mindspore.Tensor(value)
        return batch
    return BatchFeature(data=data, tensor_type=return_tensors)


def _flatten_images(images) -> list:
    """Images in placeholder order from one image, a list, or a list per sample (empty lists allowed)."""
    images = _host(images)
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def _expand(texts: list[str], token: str, counts: list[int], kind: str) -> list[str]:
    """Each ``token`` in ``texts`` repeated counts[i] times, placeholders matched to items in order."""
    found = sum(t.count(token) for t in texts)
    if found != len(counts):
        if found < len(counts):
            unmatched = f"{kind} {found + 1} has no placeholder"
        else:
            unmatched = f"placeholder {len(counts) + 1} has no {kind}"
        raise ValueError(
            f"{len(counts)} {kind}(s) were given but the text holds {found} {token} placeholder(s): {unmatched} "
            f"(each {kind} needs one {token} in the text, as the chat template writes it)"
        )
    out, index = [], 0
    for text in texts:
        pieces = text.split(token)
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            expanded.append(token * counts[index])
            expanded.append(piece)
            index += 1
        out.append("".join(expanded))
    return out


# Which keyword goes where: the option names of HF 4.57's Qwen2VLProcessorKwargs (a test pins them to HF's).
TEXT_KWARGS = frozenset({
    "add_special_tokens", "is_split_into_words", "max_length", "pad_to_multiple_of", "padding", "padding_side",
    "return_attention_mask", "return_length", "return_mm_token_type_ids", "return_offsets_mapping",
    "return_overflowing_tokens", "return_special_tokens_mask", "return_token_type_ids", "stride", "text_pair",
    "text_pair_target", "text_target", "truncation", "verbose",
})
IMAGES_KWARGS = frozenset({
    "crop_size", "data_format", "device", "do_center_crop", "do_normalize", "do_pad", "do_rescale", "do_resize",
    "image_mean", "image_std", "input_data_format", "max_pixels", "merge_size", "min_pixels", "pad_size",
    "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size",
})
VIDEOS_KWARGS = frozenset({
    "crop_size", "data_format", "default_to_square", "device", "do_center_crop", "do_convert_rgb", "do_normalize",
    "do_rescale", "do_resize", "do_sample_frames", "fps", "image_mean", "image_std", "input_data_format",
    "num_frames", "resample", "rescale_factor", "return_metadata", "size", "video_metadata",
})
COMMON_KWARGS = frozenset({"return_tensors"})
MODALITIES = {"text": TEXT_KWARGS, "images": IMAGES_KWARGS, "videos": VIDEOS_KWARGS}


def route_kwargs(kwargs: dict) -> dict:
    """{"text": ..., "images": ..., "videos": ...} options, by HF's rule (``ProcessorMixin._merge_kwargs``): a
    flat keyword goes to every part that has an option of that name (``size`` to images and videos,
    ``min_pixels`` to images only, ``fps`` to videos), ``text_kwargs``/``images_kwargs``/``videos_kwargs``
    dicts to their part whatever they hold, ``return_tensors`` (or ``common_kwargs``) to all. A keyword no part
    knows is ignored with a warning, as in HF; one given both flat and in a dict is an error."""
    kwargs = dict(kwargs)
    given = {m: dict(kwargs.pop(f"{m}_kwargs", None) or {}) for m in MODALITIES}
    common = dict(kwargs.pop("common_kwargs", None) or {})
    kwargs.pop("audio_kwargs", None)
    routed = {m: {} for m in MODALITIES}
    for key, value in kwargs.items():
        if key in COMMON_KWARGS:
            common[key] = value
            continue
        targets = [m for m, keys in MODALITIES.items() if key in keys]
        if not targets:
            logger.warning("Qwen2VLProcessor: keyword argument %r is not an option of the tokenizer, the image "
                           "processor or the video processor; it is ignored", key)
        for m in targets:
            if key in given[m]:
                raise ValueError(f"keyword argument {key} was given twice: in {m}_kwargs and as a keyword argument")
            routed[m][key] = value
    for m in MODALITIES:
        routed[m].update(given[m])
        routed[m].update(common)
    return routed


def _read_chat_template(path, hub: dict):
    """The processor's chat template as HF reads it: ``chat_template.json`` first, else ``chat_template.jinja``
    (with ``chat_templates/*.jinja`` of a local folder, making a dict of named templates); None if neither."""
    found = cached_file(path, CHAT_TEMPLATE_JSON, _raise_exceptions_for_missing_entries=False, **hub)
    if found is not None:
        with open(found, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    templates = {}
    folder = os.path.join(str(path), CHAT_TEMPLATE_DIR)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".jinja"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    templates[name[: -len(".jinja")]] = f.read()
    found = cached_file(path, CHAT_TEMPLATE_JINJA, _raise_exceptions_for_missing_entries=False, **hub)
    if found is not None:
        with open(found, encoding="utf-8") as f:
            templates["default"] = f.read()
    if list(templates) == ["default"]:
        return templates["default"]
    return templates or None


def _write_chat_template(save_directory, template):
    """``chat_template.jinja`` (HF's format), over the tokenizer's copy of its own template; a
    ``chat_template.json`` already in the folder is rewritten too, since loading reads it first."""
    templates = template if isinstance(template, dict) else {"default": template}
    for name, text in templates.items():
        if name == "default":
            path = os.path.join(save_directory, CHAT_TEMPLATE_JINJA)
        else:
            os.makedirs(os.path.join(save_directory, CHAT_TEMPLATE_DIR), exist_ok=True)
            path = os.path.join(save_directory, CHAT_TEMPLATE_DIR, f"{name}.jinja")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    legacy = os.path.join(save_directory, CHAT_TEMPLATE_JSON)
    if os.path.isfile(legacy) and "default" in templates:
        with open(legacy, "w", encoding="utf-8") as f:
            f.write(json.dumps({"chat_template": templates["default"]}, indent=2, sort_keys=True) + "\n")


class Qwen2VLProcessor:
    """Hugging Face compatible ``Qwen2VLProcessor`` (``from_pretrained``, ``save_pretrained``, ``__call__``,
    ``apply_chat_template``, ``batch_decode``/``decode``) that needs neither torch nor torchvision.

    Each ``<|image_pad|>`` (``<|video_pad|>``) of the text becomes ``grid_t*grid_h*grid_w/merge_size**2``
    copies, one per vision token the model will put there. Batches are padded on the left (the
    tokenizer's ``padding_side``) so that generation continues every prompt at the same position.
    """

    attributes = ["image_processor", "tokenizer", "video_processor"]

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **unused):
        if tokenizer is None:
            raise ValueError("Qwen2VLProcessor needs a tokenizer")
        self.image_processor = image_processor if image_processor is not None else Qwen2VLImageProcessor()
        self.video_processor = video_processor if video_processor is not None else Qwen2VLVideoProcessor()
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, min_pixels=None, max_pixels=None, **kwargs):
        """Tokenizer, chat template and image and video processor settings of a model folder (or Hub id).

        ``min_pixels``/``max_pixels`` replace the files' limits for images and videos alike (HF 4.57 sets them on
        its video processor too, but resizes videos by its unchanged ``size``).
        """
        path = pretrained_model_name_or_path
        hub = {k: kwargs[k] for k in HUB_KEYS if k in kwargs}
        limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = Qwen2VLImageProcessor.from_pretrained(path, **hub, **limits)
        # HF updates min_pixels/max_pixels but not `size` here; keep both views of the limits in step.
        image_processor.size = {"shortest_edge": image_processor.min_pixels, "longest_edge": image_processor.max_pixels}
        video_processor = Qwen2VLVideoProcessor.from_pretrained(path, **hub, **limits)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        chat_template = _read_chat_template(path, hub)
        return cls(image_processor, tokenizer, video_processor, chat_template=chat_template)

    def save_pretrained(self, save_directory):
        """Tokenizer files, ``preprocessor_config.json``, ``video_preprocessor_config.json`` and
        ``chat_template.jinja``, as HF writes them: ``from_pretrained`` here and in HF reads back the same."""
        os.makedirs(save_directory, exist_ok=True)
        # As HF: the saved files name the processor that wrote them (AutoProcessor reads it back).
        self.image_processor._set_processor_class(type(self).__name__)
        self.video_processor.processor_class = type(self).__name__
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        self.video_processor.save_pretrained(save_directory)
        if self.chat_template is not None:
            _write_chat_template(save_directory, self.chat_template)
        return save_directory

    @property
    def model_input_names(self):
        names = list(self.tokenizer.model_input_names)
        for name in self.image_processor.model_input_names + self.video_processor.model_input_names:
            if name not in names:
                names.append(name)
        return names

    def _images(self, images, options: dict):
        accepted = inspect.signature(self.image_processor.preprocess).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(options) - set(accepted) - {"images", "videos"})
            if unknown:
                raise TypeError(f"{type(self.image_processor).__name__} has no option(s) {', '.join(unknown)}")
        flat = _flatten_images(images)
        if not flat:
            raise ValueError("images holds no image: give None when there are no images")
        patches, grids = [], []
        for index, image in enumerate(flat):
            if isinstance(image, str):
                image = load_image(image, exif_transpose=True)
            settings = dict(options)
            if isinstance(image, Image.Image) and "input_data_format" not in settings:
                # A PIL image is height x width x channels. Left to guess, HF reads an image 1 or 3 pixels high
                # as channels first: a 3 x 40 image came out as a 16 x 2 grid, a 1 x 1 image failed.
                settings["input_data_format"] = "channels_last"
            elif (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] == 1 and image.shape[-1] == 3
                  and "input_data_format" not in settings):
                # An array one pixel high with 3 channels last: HF's guess, channels first, makes it a one-channel
                # image, which it then cannot normalise ("mean must have 1 elements"); only one reading works.
                settings["input_data_format"] = "channels_last"
            try:
                out = self.image_processor(images=image, return_tensors=None, **settings)
            except ValueError as err:
                raise ValueError(f"image {index + 1} of {len(flat)} ({describe(image)}): {err}") from err
            patches.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.concatenate(grids).astype(np.int64)}

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Token ids (with placeholders expanded), ``pixel_values``/``image_grid_thw`` and
        ``pixel_values_videos``/``video_grid_thw``.

        ``images``: one image or a list of PIL images, arrays or image paths/URLs, or a list per sample, in
        placeholder order across the batch. ``videos``: one video, a list of videos or a list per sample, each a
        ``(T, C, H, W)`` or ``(T, H, W, C)`` array or a list of frames. Keywords go where HF sends them
        (``route_kwargs``): tokenizer options (``padding``, ``truncation``, ``max_length``, ...), image options
        (``min_pixels``, ``max_pixels``, ...), video options (``fps``, ``num_frames``, ``do_sample_frames``,
        ``video_metadata``, ...), or dicts ``text_kwargs``/``images_kwargs``/``videos_kwargs``; so the
        ``video_kwargs`` of ``process_vision_info(..., return_video_kwargs=True)`` can be passed as they are.
        ``return_tensors``: "np" (the default; HF's default is None), "ms" for mindspore Tensors, or None for
        token id lists as in HF.
        """
        if images is None and text is None and videos is None:
            raise ValueError(f"{type(self).__name__} needs text, images or videos: all three are None")
        options = route_kwargs(kwargs)
        text_options = options["text"]
        return_tensors = text_options.pop("return_tensors", "np")
        for part in ("images", "videos"):
            options[part].pop("return_tensors", None)
        data = {}
        if images is not None:
            data.update(self._images(images, options["images"]))
        if videos is not None:
            data.update(self._videos(videos, options["videos"]))
        if text is None:
            return _batch(data, return_tensors)

        texts = [text] if isinstance(text, str) else list(text)
        merge = (options["images"].get("merge_size") or self.image_processor.merge_size) ** 2
        image_counts = [int(g.prod()) // merge for g in data.get("image_grid_thw", [])]
        texts = _expand(texts, self.image_token, image_counts, "image")
        merge = (options["videos"].get("merge_size") or self.video_processor.merge_size) ** 2
        video_counts = [int(g.prod()) // merge for g in data.get("video_grid_thw", [])]
        texts = _expand(texts, self.video_token, video_counts, "video")

        mm_token_types = text_options.pop("return_mm_token_type_ids", False)
        encoded = self.tokenizer(texts, **text_options)
        self._check_truncation(texts, encoded["input_ids"])
        if mm_token_types:  # as HF 4.57: 1 marks image tokens (video tokens stay 0)
            image_id = self.image_token_id
            encoded["mm_token_type_ids"] = [[int(t == image_id) for t in row] for row in encoded["input_ids"]]
        return _batch({**encoded, **data}, return_tensors)

    def _videos(self, videos, options: dict) -> dict:
        return dict(self.video_processor(videos, return_tensors=None, **options))

    def _chat_video_options(self, sampled_fps: list, call_options: dict) -> dict:
        """Options ``apply_chat_template`` adds for the videos it sampled; Qwen2-VL's inputs need none."""
        return {}

    def _check_truncation(self, texts, input_ids):
        # Cutting a prompt inside its vision tokens would leave the model more features than slots.
        for text, ids in zip(texts, input_ids):
            for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
                if text.count(token) != list(ids).count(token_id):
                    raise ValueError(
                        f"truncation cut {token} tokens ({text.count(token)} in the text, {list(ids).count(token_id)} "
                        "kept): raise max_length or lower the images' max_pixels"
                    )

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        tokenize=False,
        return_dict=False,
        return_tensors="np",
        fps=None,
        num_frames=None,
        **kwargs,
    ):
        """Render one conversation (or a batch) with the chat template; with ``tokenize=True`` also load
        its images and videos and run ``__call__``.

        ``add_vision_id=True`` writes "Picture N: "/"Video N: ", counting through the whole conversation.
        Content items name their media with ``image``, ``url``, ``path`` or ``image_url`` (images) and
        ``video``, ``url`` or ``path`` (videos). Images are decoded as they are (resizing is the image
        processor's, as in HF) unless the item carries ``min_pixels``, ``max_pixels`` or
        ``resized_height``/``resized_width``, which go through ``fetch_image``. Videos always go through
        ``fetch_video`` (Qwen2-VL's frame sampling); ``fps`` / ``num_frames`` apply to items with neither
        ``fps`` nor ``nframes`` of their own. Keywords that are processor options (``padding``,
        ``truncation``, ``max_length``, ``max_pixels``, ``images_kwargs``, ...) go to ``__call__``, the others
        to the template.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("no chat template: pass chat_template= or load one with from_pretrained")
        call_keys = TEXT_KWARGS | IMAGES_KWARGS | VIDEOS_KWARGS | {f"{m}_kwargs" for m in MODALITIES}
        call_options = {k: kwargs.pop(k) for k in list(kwargs) if k in call_keys}
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(
            conversation[0], (list, tuple)
        )
        conversations = list(conversation) if batched else [conversation]
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs,
            )
            for conv in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos, sampled_fps = [], [], []
        for conv in conversations:
            # The chat template's own item tests: the media loaded match its placeholders one to one.
            for item in vision_items(conv):
                if is_image_item(item):
                    images.append(_load_chat_image(item))
                else:
                    frames, rate = _load_chat_video(item, fps, num_frames)
                    videos.append(frames)
                    sampled_fps.append(rate)
        if videos:
            call_options.update(self._chat_video_options(sampled_fps, call_options))
        out = self(text=prompts, images=images or None, videos=videos or None, return_tensors=return_tensors,
                   **call_options)
        return out if return_dict else out["input_ids"]

    def batch_decode(self, sequences, **kwargs):
        """The tokenizer's ``batch_decode`` with its defaults, as HF (special tokens are kept unless
        ``skip_special_tokens=True``); mindspore Tensors are accepted."""
        return self.tokenizer.batch_decode(_host(sequences), **kwargs)

    def decode(self, token_ids, **kwargs):
        """The tokenizer's ``decode`` with its defaults, as HF; mindspore Tensors are accepted."""
        return self.tokenizer.decode(_host(token_ids), **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs
    ):
        """Generated ids to text without special tokens, as HF's method of this name."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens,
                                 clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)


_RESIZE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def _media_source(item: dict, keys, kind: str):
    for key in keys:
        if key in item:
            return item[key]
    raise ValueError(f"{kind} item {item!r} names no {kind}: give one of {', '.join(map(repr, keys))}")


def _load_chat_image(item: dict):
    source = _media_source(item, IMAGE_SOURCE_KEYS, "image")
    if any(key in item for key in _RESIZE_KEYS):
        return fetch_image({**item, "image": source})
    return load_image(source, exif_transpose=True)


def _load_chat_video(item: dict, fps, num_frames):
    source = _media_source(item, VIDEO_SOURCE_KEYS, "video")
    ele = {k: v for k, v in item.items() if k not in ("type", "url", "path")}
    ele["video"] = source
    if "fps" not in ele and "nframes" not in ele:
        if fps is not None and num_frames is not None:
            raise ValueError(f"give either fps={fps} or num_frames={num_frames}, not both")
        if num_frames is not None:
            ele["nframes"] = num_frames
        elif fps is not None:
            ele["fps"] = fps
    return fetch_video(ele, return_video_sample_fps=True)
