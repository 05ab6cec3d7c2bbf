"""Qwen2-VL processor without torch or torchvision: text, images and videos to model inputs.

The tokenizer, chat template and numpy image processor are Hugging Face's own. Videos go through
``Qwen2VLVideoProcessor`` below, a numpy processor whose patches equal those of Hugging Face's numpy
``Qwen2VLImageProcessor`` video path (HF's own video processor needs torchvision).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from .qwen_vl_utils import fetch_image, fetch_video, load_image
from .qwen_vl_utils.content_items import IMAGE_SOURCE_KEYS, VIDEO_SOURCE_KEYS, is_image_item, vision_items
from .qwen_vl_utils.sources import describe

__all__ = ["Qwen2VLProcessor", "Qwen2VLVideoProcessor"]


def _video_frames(video, name: str):
    """One video as uint8 ``(T, H, W, 3)`` frames: from a ``(T, C, H, W)`` or ``(T, H, W, C)`` array (as HF,
    channels first wins when both readings fit), a list of PIL images or of ``(H, W, C)``/``(C, H, W)``
    arrays. Frames of unequal sizes stay a list; grayscale becomes RGB."""
    if hasattr(video, "asnumpy"):  # mindspore.Tensor
        video = video.asnumpy()
    elif hasattr(video, "numpy") and not isinstance(video, np.ndarray):  # torch.Tensor from upstream code
        video = video.numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D array (frames, ...), got shape {video.shape}")
        channels_first = video.shape[1] in (1, 3)
        if not channels_first and video.shape[-1] not in (1, 3):
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
            frames = [np.asarray(load_image(frame)) for frame in video]
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        size = frames[0].shape
        # Only the first frame sets the output size (as in HF); stack after resizing to it.
        return frames if any(f.shape != size for f in frames) else np.stack(frames)
    raise ValueError(
        f"{name}: expected a 4-D array or a non-empty list of frames, got {describe(video)}"
    )


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim in (2, 3))


class Qwen2VLVideoProcessor:
    """Videos to ``pixel_values_videos`` ``(sum of T*H*W patches, 3*2*14*14)`` and ``video_grid_thw``.

    Same steps and float arithmetic as HF's numpy processor: every frame resized (PIL bicubic) to
    ``smart_resize`` of the first frame, scaled by 1/255 in float64 then float32, normalized in
    float32, the frame count padded to a multiple of ``temporal_patch_size`` with the last frame, and
    cut into patches in the order the vision tower's patch merger expects.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        min_pixels: int = 128 * 28 * 28,
        max_pixels: int = 768 * 28 * 28,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean=None,
        image_std=None,
        rescale_factor: float = 1 / 255,
        **unused,
    ):
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.rescale_factor = rescale_factor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """From ``video_preprocessor_config.json`` if the directory has one, else ``preprocessor_config.json``
        (where Qwen2-VL keeps both); keyword arguments override the file."""
        config = None
        local = os.path.join(str(pretrained_model_name_or_path), "video_preprocessor_config.json")
        if os.path.isfile(local):
            with open(local, encoding="utf-8") as f:
                config = json.load(f)
        if config is None:
            config, _ = ImageProcessingMixin.get_image_processor_dict(pretrained_model_name_or_path)
        size = config.get("size") or {}
        config.setdefault("min_pixels", size.get("shortest_edge", 128 * 28 * 28))
        config.setdefault("max_pixels", size.get("longest_edge", 768 * 28 * 28))
        config.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**config)

    def _patches(self, frames, min_pixels: int, max_pixels: int):
        first = frames[0]
        height, width = first.shape[:2]
        factor = self.patch_size * self.merge_size
        new_h, new_w = hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        resized = [
            f if f.shape[:2] == (new_h, new_w)
            else np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=Image.BICUBIC))
            for f in frames
        ]
        video = np.stack(resized).astype(np.float64) * self.rescale_factor
        video = video.astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        video = ((video - mean) / std).transpose(0, 3, 1, 2)  # (T, C, H, W)

        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
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

    def __call__(self, videos, min_pixels=None, max_pixels=None, return_tensors=None, **unused):
        if not isinstance(videos, (list, tuple)) or (videos and _is_frame(videos[0])):
            videos = [videos]  # one video: an array, or a list of frames
        if not videos:
            raise ValueError("videos is empty: give None when there are no videos")
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        all_patches, grids = [], []
        for index, video in enumerate(videos):
            name = f"video {index + 1} of {len(videos)}"
            frames = _video_frames(video, name)
            try:
                patches, grid = self._patches(frames, min_pixels, max_pixels)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            all_patches.append(patches)
            grids.append(grid)
        data = {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        return _batch(data, return_tensors)

    preprocess = __call__


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
    """Images in placeholder order from one image, a list, or a list per sample."""
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


class Qwen2VLProcessor:
    """Hugging Face compatible ``Qwen2VLProcessor`` (``from_pretrained``, ``__call__``,
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
        """Tokenizer, chat template and pre-processor settings of a model directory (or Hub id).

        ``min_pixels``/``max_pixels`` replace the file's limits for images and videos alike, as in HF.
        """
        path = pretrained_model_name_or_path
        limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = Qwen2VLImageProcessor.from_pretrained(path, **limits)
        # HF updates min_pixels/max_pixels but not `size` here; keep both views of the limits in step.
        image_processor.size = {"shortest_edge": image_processor.min_pixels, "longest_edge": image_processor.max_pixels}
        video_processor = Qwen2VLVideoProcessor.from_pretrained(path, **limits)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        chat_template = None
        template_file = os.path.join(str(path), "chat_template.json")
        jinja_file = os.path.join(str(path), "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                chat_template = f.read()
        elif os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                chat_template = json.load(f)["chat_template"]
        return cls(image_processor, tokenizer, video_processor, chat_template=chat_template)

    def save_pretrained(self, save_directory):
        """Tokenizer files, ``preprocessor_config.json`` and ``chat_template.json``, readable by
        ``from_pretrained`` here and in HF."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        if self.chat_template is not None:
            with open(os.path.join(save_directory, "chat_template.json"), "w", encoding="utf-8") as f:
                json.dump({"chat_template": self.chat_template}, f, indent=2, ensure_ascii=False)
        return save_directory

    @property
    def model_input_names(self):
        names = list(self.tokenizer.model_input_names)
        for name in self.image_processor.model_input_names + self.video_processor.model_input_names:
            if name not in names:
                names.append(name)
        return names

    def _images(self, images, limits):
        flat = _flatten_images(images)
        patches, grids = [], []
        for index, image in enumerate(flat):
            if isinstance(image, str):
                image = load_image(image, exif_transpose=True)
            try:
                out = self.image_processor(images=image, return_tensors=None, **limits)
            except ValueError as err:
                raise ValueError(f"image {index + 1} of {len(flat)} ({describe(image)}): {err}") from err
            patches.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        if not flat:
            raise ValueError("images is an empty list: give None when there are no images")
        return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.concatenate(grids).astype(np.int64)}

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        padding=False,
        truncation=None,
        max_length=None,
        return_tensors="np",
        min_pixels=None,
        max_pixels=None,
        **kwargs,
    ) -> BatchFeature:
        """Token ids (with placeholders expanded), ``pixel_values``/``image_grid_thw`` and
        ``pixel_values_videos``/``video_grid_thw``.

        ``images``: one image or a (nested) list of PIL images, arrays or image paths/URLs, in
        placeholder order across the batch. ``videos``: a list of videos, each a ``(T, C, H, W)`` or
        ``(T, H, W, C)`` array or a list of frames. ``return_tensors``: "np" (the default; HF's default
        is None), "ms" for mindspore Tensors, or None for token id lists as in HF.
        ``min_pixels``/``max_pixels`` override the processors' limits for this call.
        """
        limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        data = {}
        if images is not None:
            data.update(self._images(images, limits))
        if videos is not None:
            data.update(self.video_processor(videos, return_tensors=None, **limits))
        if text is None:
            return _batch(data, return_tensors)

        texts = [text] if isinstance(text, str) else list(text)
        merge = self.image_processor.merge_size**2
        image_counts = [int(g.prod()) // merge for g in data.get("image_grid_thw", [])]
        texts = _expand(texts, self.image_token, image_counts, "image")
        merge = self.video_processor.merge_size**2
        video_counts = [int(g.prod()) // merge for g in data.get("video_grid_thw", [])]
        texts = _expand(texts, self.video_token, video_counts, "video")

        encoded = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length, **kwargs)
        self._check_truncation(texts, encoded["input_ids"])
        return _batch({**encoded, **data}, return_tensors)

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
        padding=False,
        truncation=None,
        max_length=None,
        fps=None,
        num_frames=None,
        **template_kwargs,
    ):
        """Render one conversation (or a batch) with the chat template; with ``tokenize=True`` also load
        its images and videos and run ``__call__``.

        ``add_vision_id=True`` writes "Picture N: "/"Video N: ", counting through the whole conversation.
        Content items name their media with ``image``, ``url``, ``path`` or ``image_url`` (images) and
        ``video``, ``url`` or ``path`` (videos). Images are decoded as they are (resizing is the image
        processor's, as in HF) unless the item carries ``min_pixels``, ``max_pixels`` or
        ``resized_height``/``resized_width``, which go through ``fetch_image``. Videos always go through
        ``fetch_video`` (Qwen2-VL's frame sampling); ``fps`` / ``num_frames`` apply to items with neither
        ``fps`` nor ``nframes`` of their own.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("no chat template: pass chat_template= or load one with from_pretrained")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(
            conversation[0], (list, tuple)
        )
        conversations = list(conversation) if batched else [conversation]
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
            for conv in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos = [], []
        for conv in conversations:
            # The chat template's own item tests: the media loaded match its placeholders one to one.
            for item in vision_items(conv):
                if is_image_item(item):
                    images.append(_load_chat_image(item))
                else:
                    videos.append(_load_chat_video(item, fps, num_frames))
        out = self(
            text=prompts,
            images=images or None,
            videos=videos or None,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        return out if return_dict else out["input_ids"]

    def batch_decode(self, sequences, skip_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs):
        if hasattr(sequences, "asnumpy"):
            sequences = sequences.asnumpy()
        return self.tokenizer.batch_decode(
            sequences,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def decode(self, token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs):
        if hasattr(token_ids, "asnumpy"):
            token_ids = token_ids.asnumpy()
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    post_process_image_text_to_text = batch_decode


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
    return fetch_video(ele)
