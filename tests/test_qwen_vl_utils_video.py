"""qwen_vl_utils, videos: frame counts, frame indices and sizes by qwen-vl-utils 0.0.14's rules (checked against
the real package, tests/upstream.py); decord and PyAV."""
import functools
import http.server
import os
import threading

import numpy as np
import pytest
import torch
import upstream
from PIL import Image

from mindone_qwen2vl.qwen_vl_utils import (
    QWEN_VL_UTILS_VERSION,
    VIDEO_MIN_PIXELS,
    VideoReader,
    calculate_video_frame_range,
    fetch_image,
    fetch_video,
    process_vision_info,
    sample_frame_indices,
    smart_nframes,
    smart_resize,
)
from mindone_qwen2vl.qwen_vl_utils import video_reader

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
V4 = os.path.join(ASSETS, "4.mp4")  # 224x224, 30 fps, 150 frames
V3 = os.path.join(ASSETS, "3.mp4")  # 640x360, 23.976 fps, 146 frames
JPG1, JPG2, BIG = (os.path.join(ASSETS, n) for n in ("1.jpg", "2.jpg", "test.jpg"))  # 300x168, 300x199, 1000x747


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
        ({"fps": 1.0}, 150, 30.0, 4),  # 5 frames, rounded down to even: 4
        ({"fps": 0.2}, 150, 30.0, 4),  # 1 frame, raised to FPS_MIN_FRAMES
        ({"fps": 30.0}, 150, 30.0, 150),  # every frame
        ({"fps": 60.0}, 150, 30.0, 150),  # capped by the video's length
        ({"fps": 2.0}, 146, 23.976023976023978, 12),  # 12.18
        ({"fps": 2.0}, 243, 25.0, 18),  # 19.44 rounded down to 18 (qwen-vl-utils 0.0.8 rounded it to 20)
        ({"fps": 2.0}, 299, 29.97, 18),  # 19.95 -> 18, where 0.0.8 gave 20 (the 1.mp4 at fps 2)
        ({"fps": 2.0, "max_frames": 10}, 3, 30.0, 2),  # a max_frames above the length: the length caps it
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
    with pytest.raises(ValueError, match=r"^nframes 152 is outside \[2, 150\], the video's frame count$"):
        smart_nframes({"nframes": 152}, total_frames=150, video_fps=30.0)
    with pytest.raises(ValueError, match=r"^nframes 1 \(rounded to 0\) is outside \[2, 150\]"):
        smart_nframes({"nframes": 1}, total_frames=150, video_fps=30.0)
    for ele in ({}, {"nframes": 2}):  # a one-frame video, whatever is asked
        with pytest.raises(ValueError, match=r"^the video has 1 frame\(s\); sampling it takes at least 2$"):
            smart_nframes(ele, total_frames=1, video_fps=30.0)


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
    with pytest.raises(ValueError, match=r"video_start=4 s is not before video_end=2 s"):
        calculate_video_frame_range({"video_start": 4, "video_end": 2}, 150, 30.0)
    with pytest.raises(ValueError, match=r"video_start=9, video_end=None select no frames .*5.00 s video"):
        calculate_video_frame_range({"video_start": 9}, 150, 30.0)


def test_video_start_after_end_names_the_video():
    """Issue 19: the error names the video and the problem."""
    with pytest.raises(ValueError, match=r"video '.*4.mp4': video_start=4 s is not before video_end=2 s"):
        fetch_video({"video": V4, "video_start": 4, "video_end": 2})
    with pytest.raises(ValueError, match=r"video '.*4.mp4': video_start=7.5, video_end=None select no frames"):
        fetch_video({"video": V4, "video_start": 7.5})


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
    # 224x224 frames fit 64*28*28. Upstream stops on an assertion here (max_pixels below the default
    # min_pixels of 128*28*28); this port takes the maximum as the size asked for.
    frames = fetch_video({"video": frames4[:3], "max_pixels": 64 * 28 * 28})
    assert frames.shape == (4, 3, 224, 224) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:3].transpose(0, 2, 3, 1), frames4[:3])
    np.testing.assert_array_equal(frames[3], frames[2])  # padded to an even count with the last frame
    # By default a list of frames gets the video rules after the image rules (multiples of 56 first, as upstream).
    frames, fps = fetch_video({"video": [JPG1] * 3}, return_video_sample_fps=True)
    assert frames.shape == (4, 3, 252, 420) and fps == 2.0  # 300x168 -> 280x168 -> 420x252
    with pytest.raises(ValueError, match=r"video of 2 frames: frames of unequal sizes after resizing"):
        fetch_video({"video": [JPG1, BIG]})


def test_resize_close_to_torch_antialias(frames4):
    """Upstream resizes tensors with torchvision, which interpolates in float (antialiased bicubic) and rounds
    back to uint8; ours (PIL) differs on rare values by a few levels (the tests against the real package below
    bound it on every video). Torch's own uint8 kernel is PIL's: within 2 on under 1% of the values."""
    video = fetch_video({"video": V4, "nframes": 4})
    idx = np.round(np.linspace(0, 149, 4)).astype(int)
    raw = torch.from_numpy(frames4[idx]).permute(0, 3, 1, 2).contiguous()
    as_float = torch.nn.functional.interpolate(raw.float(), size=(336, 336), mode="bicubic", antialias=True)
    diff = np.abs(as_float.clamp(0, 255).round().numpy() - video)
    assert diff.max() <= 10 and (diff > 2).mean() < 1e-4 and diff.mean() < 0.3
    as_uint8 = torch.nn.functional.interpolate(raw, size=(336, 336), mode="bicubic", antialias=True).numpy()
    diff = np.abs(as_uint8.astype(int) - video.astype(int))
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
    with pytest.raises(ValueError, match=r"video .*4.mp4': nframes 200 is outside \[2, 150\], the video's frame count"):
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


# ---- against the real qwen-vl-utils package (its functions that run without torchvision) ----

@pytest.fixture(scope="module")
def real():
    return upstream.qwen_vl_utils()


def outcome(function, *args, **kwargs):
    """The result, or "error" when the call raises (upstream raises AssertionError or ValueError)."""
    try:
        return function(*args, **kwargs)
    except (AssertionError, ValueError):
        return "error"


def test_following_the_installed_release(real):
    assert upstream.qwen_vl_utils_version() == QWEN_VL_UTILS_VERSION == "0.0.14"
    import mindone_qwen2vl.qwen_vl_utils as ours

    assert "qwen-vl-utils`` 0.0.14" in ours.__doc__
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        assert "follows **qwen-vl-utils 0.0.14**" in " ".join(f.read().split())  # the README states it too


def test_smart_resize_equals_upstream(real):
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(20000):
        height, width = (int(x) for x in rng.integers(1, 6000, size=2))
        limits = {}
        if rng.random() < 0.8:
            limits = dict(zip(("min_pixels", "max_pixels"), sorted(int(x) for x in rng.integers(1, 20000, 2) * 784)))
            if rng.random() < 0.1:  # out of order: both refuse
                limits = {"min_pixels": limits["max_pixels"], "max_pixels": limits["min_pixels"] - 1}
        cases.append((height, width, int(rng.choice([28, 32, 56])), limits))
    # Thin images under small budgets, where upstream's short side reaches 0.
    cases += [(30, 5000, 28, {"min_pixels": 784, "max_pixels": 100352}),
              (6000, 31, 28, {"min_pixels": 784, "max_pixels": 100352}),
              (20, 3999, 56, {"min_pixels": 3136, "max_pixels": 3136 * 20})]
    compared = zero_sides = 0
    for height, width, factor, limits in cases:
        theirs = outcome(real.smart_resize, height, width, factor, **limits)
        ours = outcome(smart_resize, height, width, factor, **limits)
        if theirs != "error" and 0 in theirs:
            # Upstream floors a thin image's short side to 0 under a small budget; ours keeps one factor (HF's rule).
            assert ours == tuple(factor if side == 0 else side for side in theirs), (height, width, factor, limits)
            zero_sides += 1
        else:
            assert ours == theirs, (height, width, factor, limits)
        compared += 1
    assert compared == len(cases) and zero_sides >= 3


def test_smart_nframes_equals_upstream(real):
    rng = np.random.default_rng(2)
    for _ in range(20000):
        total = int(rng.integers(1, 5000))
        video_fps = float(rng.choice([23.976023976023978, 25.0, 29.97, 30.0, 60.0, rng.uniform(0.5, 120)]))
        ele = {}
        if rng.random() < 0.3:
            ele["nframes"] = int(rng.integers(1, 800))
        else:
            if rng.random() < 0.8:
                ele["fps"] = float(rng.choice([0.5, 1.0, 2.0, 4.0, rng.uniform(0.1, 10)]))
            if rng.random() < 0.3:
                ele["min_frames"] = int(rng.integers(1, 40))
            if rng.random() < 0.3:
                ele["max_frames"] = int(rng.integers(2, 900))
        assert outcome(smart_nframes, ele, total, video_fps) == outcome(real.smart_nframes, ele, total, video_fps), (
            ele, total, video_fps)


def test_calculate_video_frame_range_equals_upstream(real):
    rng = np.random.default_rng(3)
    for _ in range(20000):
        total, video_fps = int(rng.integers(1, 3000)), float(rng.uniform(1, 60))
        ele = {}
        for key in ("video_start", "video_end"):
            if rng.random() < 0.6:
                ele[key] = float(rng.uniform(-5, total / video_fps + 5))
        assert outcome(calculate_video_frame_range, ele, total, video_fps) == outcome(
            real.calculate_video_frame_range, ele, total, video_fps), (ele, total, video_fps)


@pytest.mark.parametrize("ele", [
    {"image": JPG1}, {"image": BIG}, {"image": BIG, "max_pixels": 256 * 28 * 28},
    {"image": JPG2, "min_pixels": 512 * 28 * 28}, {"image": BIG, "resized_height": 300, "resized_width": 400},
    {"image_url": JPG2}, {"image": JPG1, "max_pixels": 16 * 32 * 32, "patch": 16},
])
def test_fetch_image_equals_upstream(real, ele):
    patch = ele.pop("patch", 14)
    theirs = real.fetch_image(dict(ele), image_patch_size=patch)
    ours = fetch_image(dict(ele), image_patch_size=patch)
    assert ours.size == theirs.size and ours.mode == theirs.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


VIDEO_ITEMS = [
    {"video": V4},
    {"video": V3},
    {"video": V3, "fps": 1.0, "max_pixels": 200000},  # an item max_pixels below the cap
    {"video": V3, "max_pixels": 4096 * 28 * 28},  # above the 768-token cap: the cap applies
    {"video": V3, "total_pixels": 960 * 28 * 28},  # the whole-video budget
    {"video": V4, "nframes": 6, "max_pixels": 32 * 28 * 28, "min_pixels": 16 * 28 * 28},
    {"video": V4, "video_start": 1.0, "video_end": 3.0},
    {"video": V4, "fps": 4.0, "min_frames": 6, "max_frames": 12},
    {"video": V3, "nframes": 4, "resized_height": 100, "resized_width": 200},
    {"video": [JPG1] * 3},  # frames: fitted to multiples of 56, then the video rules
    {"video": [BIG] * 3, "max_pixels": 300000},
    {"video": [JPG2] * 2, "resized_height": 280, "resized_width": 420, "sample_fps": 1.0, "raw_fps": 25.0},
]


@pytest.mark.parametrize("ele", VIDEO_ITEMS, ids=lambda e: ",".join(k for k in e if k != "video"))
def test_fetch_video_equals_upstream(real, ele):
    """Same frames chosen, same size, same sampled fps and metadata; pixels as close as PIL is to torch."""
    (theirs, their_meta), their_fps = real.fetch_video(dict(ele), return_video_sample_fps=True,
                                                       return_video_metadata=True)
    (ours, our_meta), our_fps = fetch_video(dict(ele), return_video_sample_fps=True, return_video_metadata=True)
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert our_fps == their_fps
    assert our_meta == {k: list(v) if isinstance(v, torch.Tensor) else v for k, v in their_meta.items()}
    diff = np.abs(theirs - ours)
    assert diff.max() <= 10 and (diff > 2).mean() < 5e-4 and diff.mean() < 0.3


def test_process_vision_info_equals_upstream(real):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "image", "image": JPG1},
            {"type": "video", "video": V4, "fps": 1.0},
            {"type": "image", "image": BIG, "max_pixels": 64 * 28 * 28},
            {"type": "video", "video": [JPG2, JPG2, JPG2]},
            {"type": "text", "text": "?"},
        ]},
    ]
    for options in ({"return_video_kwargs": True}, {"return_video_kwargs": True, "return_video_metadata": True}):
        their_images, their_videos, their_kwargs = real.process_vision_info(messages, **options)
        images, videos, kwargs = process_vision_info(messages, **options)
        assert kwargs == their_kwargs
        assert [im.size for im in images] == [im.size for im in their_images]
        for image, theirs in zip(images, their_images):
            np.testing.assert_array_equal(np.asarray(image), np.asarray(theirs))
        if options.get("return_video_metadata"):
            assert [m for _, m in videos][0]["frames_indices"] == list(their_videos[0][1]["frames_indices"])
            videos, their_videos = [v for v, _ in videos], [v for v, _ in their_videos]
        assert [v.shape for v in videos] == [tuple(v.shape) for v in their_videos]
    assert kwargs == {"do_sample_frames": False}
    # V4 at fps=1: 5 s give 4 frames of 150, sampled at 0.8 fps; frames given as a list report 2 fps.
    assert process_vision_info(messages, return_video_kwargs=True)[2] == {"do_sample_frames": False, "fps": [0.8, 2.0]}


def test_model_seq_len_sets_the_default_budget(monkeypatch):
    assert fetch_video({"video": V3}).shape == (12, 3, 364, 644)
    monkeypatch.setenv("MODEL_SEQ_LEN", "1000")  # 90% of 1000 tokens for 12 frames, a pair per temporal patch
    assert fetch_video({"video": V3}).shape[2:] == smart_resize(360, 640, 28, 128 * 784, 900 * 784 / 12 * 2)
    assert fetch_video({"video": V3}).shape[2:] == (252, 448)
