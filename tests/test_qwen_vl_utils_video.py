"""qwen_vl_utils, videos: frame counts, frame indices and sizes by Qwen2-VL's rules; decord and PyAV."""
import functools
import http.server
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mindone_qwen2vl.qwen_vl_utils import (
    VIDEO_MIN_PIXELS,
    VideoReader,
    calculate_video_frame_range,
    fetch_video,
    sample_frame_indices,
    smart_nframes,
)
from mindone_qwen2vl.qwen_vl_utils import video_reader

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
V4 = os.path.join(ASSETS, "4.mp4")  # 224x224, 30 fps, 150 frames
V3 = os.path.join(ASSETS, "3.mp4")  # 640x360, 23.976 fps, 146 frames


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep request lines out of the test output
        pass



def decode_all(path):
    """Every frame, decoded independently of the package (PyAV, sequential)."""
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def frames4():
    return decode_all(V4)


def resized(frames, height, width):
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


# ---- frame counts ----

@pytest.mark.parametrize(
    "ele, total, fps, expected",
    [
        ({}, 150, 30.0, 10),  # 5 s at the default 2 fps
        ({"fps": 1.0}, 150, 30.0, 4),  # 5 frames, rounded half to even: 4
        ({"fps": 0.2}, 150, 30.0, 4),  # 1 frame, raised to FPS_MIN_FRAMES
        ({"fps": 30.0}, 150, 30.0, 150),  # every frame
        ({"fps": 60.0}, 150, 30.0, 150),  # capped by the video's length
        ({"fps": 2.0}, 146, 23.976023976023978, 12),  # 12.18
        ({"fps": 2.0}, 243, 25.0, 20),  # 19.44 rounds to 20 (Qwen2-VL rounds; later releases floor)
        ({"fps": 2.0}, 100000, 30.0, 768),  # FPS_MAX_FRAMES
        ({"fps": 2.0, "max_frames": 7}, 150, 30.0, 6),  # max_frames floored to even
        ({"fps": 0.2, "min_frames": 5}, 150, 30.0, 6),  # min_frames ceiled to even
        ({"fps": 2.0}, 3, 30.0, 2),  # a 3-frame video: the even count below its length
        ({"nframes": 7}, 150, 30.0, 8),
        ({"nframes": 5}, 150, 30.0, 4),  # round half to even, as Python's round
        ({"nframes": 150}, 150, 30.0, 150),
    ],
)
def test_smart_nframes(ele, total, fps, expected):
    n = smart_nframes(ele, total_frames=total, video_fps=fps)
    assert n == expected and n % 2 == 0


def test_smart_nframes_errors():
    with pytest.raises(ValueError, match=r"either 'fps' or 'nframes'.*not both"):
        smart_nframes({"fps": 2.0, "nframes": 4}, total_frames=150, video_fps=30.0)
    with pytest.raises(ValueError, match=r"nframes should in interval \[2, 150\], but got 152"):
        smart_nframes({"nframes": 152}, total_frames=150, video_fps=30.0)
    with pytest.raises(ValueError, match=r"nframes should in interval \[2, 150\], but got 0"):
        smart_nframes({"nframes": 1}, total_frames=150, video_fps=30.0)


# ---- frame indices: torch.linspace(start, end, n).round(), the published rule ----

def test_frame_indices_equal_torch_linspace_rounding():
    rng = np.random.default_rng(0)
    cases = [(0, 149, 10), (30, 90, 4), (0, 145, 12), (0, 9999, 768)]
    cases += [(int(s), int(s + t - 1), int(n)) for s, t, n in zip(
        rng.integers(0, 500, 3000), rng.integers(2, 10000, 3000), rng.integers(1, 385, 3000) * 2
    ) if n <= t]
    for start, end, n in cases:
        expected = torch.linspace(start, end, n).round().long().numpy()
        np.testing.assert_array_equal(sample_frame_indices(start, end, n), expected, err_msg=str((start, end, n)))


def test_video_frame_range():
    assert calculate_video_frame_range({}, 150, 30.0) == (0, 149, 150)
    assert calculate_video_frame_range({"video_start": 1.0, "video_end": 3.0}, 150, 30.0) == (30, 90, 61)
    assert calculate_video_frame_range({"video_start": 4.5}, 150, 30.0) == (135, 149, 15)
    assert calculate_video_frame_range({"video_end": 99.0}, 150, 30.0) == (0, 149, 150)  # clamped
    with pytest.raises(ValueError, match=r"video_start=4, video_end=2 select no frames .*5.00 s video"):
        calculate_video_frame_range({"video_start": 4, "video_end": 2}, 150, 30.0)


# ---- fetch_video: frames, sizes and budget ----

def test_fetch_video_default(frames4):
    video = fetch_video({"type": "video", "video": V4})
    # 224x224 has fewer pixels than VIDEO_MIN_PIXELS (128*28*28): scaled up to 336x336.
    assert video.shape == (10, 3, 336, 336) and video.dtype == np.uint8
    idx = np.round(np.linspace(0, 149, 10)).astype(int)
    np.testing.assert_array_equal(video.transpose(0, 2, 3, 1), resized(frames4[idx], 336, 336))


def test_fetch_video_by_nframes_with_pixel_limits(frames4):
    video = fetch_video({"video": "file://" + V4, "nframes": 6, "max_pixels": 32 * 28 * 28, "min_pixels": 16 * 28 * 28})
    assert video.shape == (6, 3, 140, 140)  # 224 * sqrt(1/2) = 158.4, floored to 140
    idx = np.round(np.linspace(0, 149, 6)).astype(int)
    np.testing.assert_array_equal(video.transpose(0, 2, 3, 1), resized(frames4[idx], 140, 140))
    video = fetch_video({"video": V4, "nframes": 4, "min_pixels": 16 * 28 * 28})
    np.testing.assert_array_equal(video.transpose(0, 2, 3, 1), frames4[[0, 50, 99, 149]])  # no resize needed
    video = fetch_video({"video": V4, "nframes": 4, "resized_height": 100, "resized_width": 200})
    assert video.shape == (4, 3, 112, 196)


def test_fetch_video_total_pixels_budget():
    video = fetch_video({"video": V3})
    assert video.shape == (12, 3, 364, 644)  # 360x640 rounded; within 768*28*28
    total = 960 * 28 * 28
    video = fetch_video({"video": V3, "total_pixels": total})
    nframes, _, height, width = video.shape
    assert (nframes, height, width) == (12, 252, 448)
    assert height * width <= total / nframes * 2 and height * width >= VIDEO_MIN_PIXELS


def test_fetch_video_time_range_and_sample_fps(frames4):
    video, fps = fetch_video({"video": V4, "video_start": 1.0, "video_end": 3.0, "min_pixels": 784},
                             return_video_sample_fps=True)
    np.testing.assert_array_equal(video.transpose(0, 2, 3, 1), frames4[[30, 50, 70, 90]])
    assert fps == pytest.approx(4 / 61 * 30)


def test_fetch_video_from_array_of_frames(frames4):
    frames = fetch_video({"video": frames4[:3], "max_pixels": 64 * 28 * 28})
    assert len(frames) == 4 and all(f.size == (224, 224) for f in frames)
    np.testing.assert_array_equal(np.asarray(frames[3]), frames4[2])


def test_resize_close_to_upstream_torchvision_antialias(frames4):
    """Upstream resizes with torchvision's antialiased bicubic; ours (PIL) is within 2/255 on <1% of values."""
    video = fetch_video({"video": V4, "nframes": 4})
    idx = np.round(np.linspace(0, 149, 4)).astype(int)
    raw = torch.from_numpy(frames4[idx]).permute(0, 3, 1, 2).contiguous()
    upstream = torch.nn.functional.interpolate(raw, size=(336, 336), mode="bicubic", antialias=True).numpy()
    diff = np.abs(upstream.astype(int) - video.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01


# ---- decord and PyAV ----

@pytest.mark.parametrize("path", [V4, V3])
def test_decord_and_pyav_give_identical_frames(path):
    decord_reader, av_reader = VideoReader(path, "decord"), VideoReader(path, "av")
    assert (decord_reader.num_frames, decord_reader.fps) == (av_reader.num_frames, av_reader.fps)
    idx = sample_frame_indices(3, decord_reader.num_frames - 1, 12)
    np.testing.assert_array_equal(decord_reader.get_frames(idx), av_reader.get_frames(idx))
    np.testing.assert_array_equal(av_reader.get_frames(idx), decode_all(path)[idx])


def test_pyav_fallback_without_decord(monkeypatch):
    expected = fetch_video({"video": V3, "nframes": 8})
    monkeypatch.setattr(video_reader, "is_available", lambda name: name != "decord")
    assert video_reader.get_video_reader_backend() == "av"
    np.testing.assert_array_equal(fetch_video({"video": V3, "nframes": 8}), expected)
    monkeypatch.undo()
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "torchvision")  # upstream's name for its PyAV reader
    assert video_reader.get_video_reader_backend() == "av"
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "opencv")
    with pytest.raises(ValueError, match="FORCE_QWENVL_VIDEO_READER='opencv'"):
        fetch_video({"video": V4})


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_progress_bar(backend, capsys, monkeypatch):
    reader = VideoReader(V4, backend)
    reader.get_frames(range(0, 150, 10))
    assert "decoding 4.mp4" not in capsys.readouterr().err  # short: no bar
    reader.get_frames(range(0, 150, 10), progress=True)
    assert "decoding 4.mp4" in capsys.readouterr().err
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", backend)
    monkeypatch.setattr(video_reader, "PROGRESS_MIN_FRAMES", 100)  # make 4.mp4 count as long
    fetch_video({"video": V4, "nframes": 4})
    assert "decoding 4.mp4" in capsys.readouterr().err


# ---- bad input names the item ----

@pytest.mark.parametrize("backend", ["decord", "av"])
def test_missing_and_undecodable_video(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", backend)
    with pytest.raises(FileNotFoundError, match="video file .*nope.mp4' does not exist"):
        fetch_video({"video": str(tmp_path / "nope.mp4")})
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 10)
    with pytest.raises(ValueError, match=f"cannot decode video .*bad.mp4' \\({backend}\\)"):
        fetch_video({"video": str(bad)})


def test_nframes_outside_video_and_both_fps_and_nframes():
    with pytest.raises(ValueError, match=r"video .*4.mp4': nframes should in interval \[2, 150\], but got 200"):
        fetch_video({"video": V4, "nframes": 200})
    with pytest.raises(ValueError, match=r"4.mp4': give either 'fps' or 'nframes'"):
        fetch_video({"video": V4, "nframes": 4, "fps": 1.0})
    with pytest.raises(ValueError, match="unrecognized video input <int>"):
        fetch_video({"video": 3})
    with pytest.raises(ValueError, match="empty list of frames"):
        fetch_video({"video": []})


def test_video_over_http(frames4):
    handler = functools.partial(QuietHandler, directory=ASSETS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        video = fetch_video({"video": f"{base}/4.mp4", "nframes": 4, "min_pixels": 784})
        np.testing.assert_array_equal(video.transpose(0, 2, 3, 1), frames4[[0, 50, 99, 149]])
        with pytest.raises(ValueError, match=f"could not download video from {base}/5.mp4: HTTP 404"):
            fetch_video({"video": f"{base}/5.mp4"})
    finally:
        server.shutdown()
        server.server_close()


def test_truncated_video(tmp_path):
    """A file whose header promises 150 frames but whose data stops early: an error, never short output."""
    import av

    faststart = tmp_path / "faststart.mp4"  # index first, so that the header survives truncation
    with av.open(V4) as src, av.open(str(faststart), "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.6)])
    with pytest.raises(ValueError, match=r"video .*truncated.mp4' ended before frame \d+ \(it claims 150 frames\)"):
        VideoReader(str(truncated), "av").get_frames(range(0, 150, 10))
    with pytest.raises(ValueError, match=r"cannot decode video .*truncated.mp4' \(decord\)"):
        VideoReader(str(truncated), "decord")
    with pytest.raises(ValueError, match="truncated.mp4"):  # decord fails, PyAV takes over, then stops short
        fetch_video({"video": str(truncated)})
