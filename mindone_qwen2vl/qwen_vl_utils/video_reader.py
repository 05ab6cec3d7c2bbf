"""Video decoding backends: decord where it installs (x86-64 wheels only), PyAV elsewhere.

Both give the same RGB frames for the same indices (the tests check this frame by frame), so the
choice of backend never changes what the model sees.

decord must be imported after mindspore (the other order aborts the process), so the decord reader
imports mindspore first; both are imported only inside the functions below.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Decoding this many source frames or more shows a progress bar (about half a minute of 30 fps video).
PROGRESS_MIN_FRAMES = 1000
# decord fetches frames in batches of this size so that the progress bar can move.
DECORD_BATCH = 32

BACKENDS = ("decord", "av")
# torchvision.io.read_video (the upstream fallback) decodes with PyAV, so that name maps to "av".
_ALIASES = {"decord": "decord", "av": "av", "pyav": "av", "torchvision": "av"}


@lru_cache(maxsize=None)
def is_available(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def get_video_reader_backend() -> str:
    """``FORCE_QWENVL_VIDEO_READER`` (decord, av/pyav/torchvision) if set, else decord if installed, else av."""
    forced = os.environ.get("FORCE_QWENVL_VIDEO_READER")
    if forced:
        if forced.lower() not in _ALIASES:
            raise ValueError(f"FORCE_QWENVL_VIDEO_READER={forced!r}: expected one of {sorted(_ALIASES)}")
        return _ALIASES[forced.lower()]
    for backend in BACKENDS:
        if is_available(backend):
            return backend
    raise ImportError("no video decoder: install decord (x86-64) or av (PyAV) to read video files")


class VideoReader:
    """Frame count, average fps and random access to RGB frames of one video file."""

    def __init__(self, path: str, backend: str | None = None):
        self.path = path
        self.backend = backend or get_video_reader_backend()
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown video backend {self.backend!r}: expected one of {BACKENDS}")
        try:
            if self.backend == "decord":
                self._open_decord()
            else:
                self._open_av()
        except (FileNotFoundError, ImportError):
            raise
        except Exception as err:  # each library has its own error types for a broken file
            raise ValueError(f"cannot decode video {path!r} ({self.backend}): {err}") from err
        if self.num_frames <= 0 or not self.fps > 0:
            raise ValueError(
                f"cannot decode video {path!r} ({self.backend}): "
                f"found {self.num_frames} frames at {self.fps} fps"
            )

    def _open_decord(self):
        import mindspore  # noqa: F401  (before decord: the other order aborts the process)
        import decord

        self._vr = decord.VideoReader(self.path, num_threads=0)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def _open_av(self):
        import av

        with av.open(self.path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.num_frames = stream.frames
            if not self.num_frames:
                # Some containers do not store a frame count: count packets, without decoding them.
                self.num_frames = sum(1 for p in container.demux(stream) if p.size)

    def get_frames(self, indices, progress: bool | None = None) -> np.ndarray:
        """uint8 frames ``(len(indices), H, W, 3)``; ``progress=None`` shows a bar only for long decodes."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError(f"no frame indices given for video {self.path!r}")
        if min(indices) < 0 or max(indices) >= self.num_frames:
            raise ValueError(
                f"frame indices {min(indices)}..{max(indices)} outside video {self.path!r} "
                f"with {self.num_frames} frames"
            )
        span = max(indices) - min(indices) + 1
        show = span >= PROGRESS_MIN_FRAMES if progress is None else progress
        desc = f"decoding {os.path.basename(self.path)}"
        try:
            if self.backend == "decord":
                frames = self._frames_decord(indices, show, desc)
            else:
                frames = self._frames_av(indices, show, desc)
        except Exception as err:  # PyAV's decode errors are ValueErrors too, but do not name the file
            raise ValueError(f"cannot decode frames of video {self.path!r} ({self.backend}): {err}") from err
        missing = [indices[pos] for pos, frame in enumerate(frames) if frame is None]
        if missing:
            raise ValueError(
                f"video {self.path!r} ended before frame {missing[0]} (it claims {self.num_frames} frames)"
            )
        return np.stack(frames)

    def _frames_decord(self, indices, show, desc):
        chunks = []
        with tqdm(total=len(indices), desc=desc, unit="frame", disable=not show) as bar:
            for i in range(0, len(indices), DECORD_BATCH):
                batch = indices[i : i + DECORD_BATCH]
                chunks.extend(self._vr.get_batch(batch).asnumpy())
                bar.update(len(batch))
        return chunks

    def _frames_av(self, indices, show, desc):
        import av

        # Frames not reached (a stream shorter than its header says) stay None.
        wanted = {}
        for pos, index in enumerate(indices):
            wanted.setdefault(index, []).append(pos)
        last = max(indices)
        out = [None] * len(indices)
        # Decoding in order from the start is slower than seeking but gives exactly the frame that
        # decord gives for each index, whatever the stream's key frames and timestamps.
        with av.open(self.path) as container, tqdm(total=last + 1, desc=desc, unit="frame", disable=not show) as bar:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    for pos in wanted[index]:
                        out[pos] = rgb
                bar.update(1)
                if index >= last:
                    break
        return out
