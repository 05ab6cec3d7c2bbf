"""Qwen2.5-VL processor: Qwen2-VL's, plus each video's ``second_per_grid_ts``.

Qwen2.5-VL places video frames at their absolute time: a temporal patch of ``temporal_patch_size`` frames
spans ``temporal_patch_size / fps`` seconds, which its ``get_rope_index`` multiplies by ``tokens_per_second``.
The images, the video patches and the token ids are Qwen2-VL's (the image processor, tokenizer and chat
template are the same files).
"""
from __future__ import annotations

from .processing import Qwen2VLProcessor

__all__ = ["Qwen2_5_VLProcessor"]

# HF's Qwen2_5_VLProcessor assumes this rate when no fps is given.
DEFAULT_FPS = 2.0


class Qwen2_5_VLProcessor(Qwen2VLProcessor):
    """Hugging Face compatible ``Qwen2_5_VLProcessor`` without torch or torchvision.

    Outputs are ``Qwen2VLProcessor``'s, plus ``second_per_grid_ts`` (one float per video, in placeholder order)
    whenever videos are given: ``temporal_patch_size / fps`` with each video's ``fps`` (one number or one per
    video, as HF). Where no ``fps`` is given, the rate of the frames themselves is used when known (the rate
    ``do_sample_frames`` sampled at, or the one ``video_metadata`` describes), else 2 fps as HF;
    ``apply_chat_template(tokenize=True)`` passes the rate at which it sampled each video. HF 4.57 uses
    2 fps in every case without an ``fps``.
    """

    def _videos(self, videos, options: dict) -> dict:
        if hasattr(self.video_processor, "process"):
            data, rates = self.video_processor.process(videos, **options)
        else:  # another video processor (HF's): only the fps given says anything of the frames' rate, as in HF
            data = dict(self.video_processor(videos, return_tensors=None, **options))
            fps, count = options.get("fps"), len(data["video_grid_thw"])
            if isinstance(fps, (list, tuple)) and len(fps) != count:
                raise ValueError(f"fps gives {len(fps)} value(s) for {count} video(s)")
            rates = list(fps) if isinstance(fps, (list, tuple)) else [fps] * count
        step = self.video_processor.temporal_patch_size
        data["second_per_grid_ts"] = [step / (rate if rate is not None else DEFAULT_FPS) for rate in rates]
        return data

    def _chat_video_options(self, sampled_fps: list, call_options: dict) -> dict:
        # The frames were sampled by qwen-vl-utils' rules at these rates; without them every video would be
        # read as 2 fps. An fps the caller gives the processor, or frames it asks to sample again, win.
        videos_kwargs = call_options.get("videos_kwargs") or {}
        if any(key in call_options or key in videos_kwargs for key in ("fps", "do_sample_frames")):
            return {}
        return {"fps": sampled_fps}

    @property
    def model_input_names(self):
        return super().model_input_names + ["second_per_grid_ts"]
