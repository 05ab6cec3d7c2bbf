"""qwen_vl_utils, images: sources, RGB conversion, smart_resize and process_vision_info."""
import base64
import contextlib
import functools
import http.server
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from mindone_qwen2vl.qwen_vl_utils import (
    MAX_PIXELS,
    MIN_PIXELS,
    extract_vision_info,
    fetch_image,
    load_image,
    process_vision_info,
    smart_resize,
)
from mindone_qwen2vl.qwen_vl_utils.sources import describe

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
JPG = os.path.join(ASSETS, "1.jpg")  # 300x168
BIG = os.path.join(ASSETS, "test.jpg")  # 1000x747


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep request lines out of the test output
        pass


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    """/slow...: headers (1000 bytes announced), then one byte every 2 s; /big: 64 KiB chunks with no length;
    /headers...: the status line, then a header one byte every 0.5 s (urllib reads headers inside urlopen)."""

    def do_GET(self):
        if self.path.startswith("/headers"):
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(120):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:  # the client gave up
                pass
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if self.path.startswith("/slow"):
            self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(30):
                if self.path.startswith("/slow"):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(2)
                else:
                    self.wfile.write(bytes(1 << 16))
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def trickle_server():
    """Base URL of a loopback HTTP server that sends its bodies too slowly (/slow.jpg) or too long (/big)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrickleHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()



@pytest.fixture(scope="module")
def http_assets():
    """Base URL of a local HTTP server (a thread) serving tests/assets."""
    handler = functools.partial(QuietHandler, directory=ASSETS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# ---- smart_resize: the published rule ----

@pytest.mark.parametrize(
    "height, width, min_pixels, max_pixels, expected",
    [
        (168, 300, MIN_PIXELS, MAX_PIXELS, (168, 308)),  # nearest multiples of 28
        (747, 1000, MIN_PIXELS, MAX_PIXELS, (756, 1008)),
        (747, 1000, 256 * 28 * 28, 512 * 28 * 28, (532, 728)),  # scaled down into the budget
        (168, 300, 512 * 28 * 28, 1024 * 28 * 28, (476, 868)),  # scaled up to the minimum
        (10, 10, MIN_PIXELS, MAX_PIXELS, (56, 56)),
        (20, 3999, MIN_PIXELS, MAX_PIXELS, (28, 4004)),  # ratio just under 200
    ],
)
def test_smart_resize_values(height, width, min_pixels, max_pixels, expected):
    h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0


def test_smart_resize_stays_in_budget_over_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(28, 5000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = sorted(int(x) for x in rng.integers(4, 2000, size=2) * 784)
        rh, rw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        assert rh % 28 == 0 and rw % 28 == 0
        rounded = max(28, round(h / 28) * 28) * max(28, round(w / 28) * 28)
        if rounded > hi:  # scaled down: never above the budget unless a side is at its 28 minimum
            assert rh * rw <= hi or 28 in (rh, rw), (h, w, lo, hi)
        elif rounded < lo:  # scaled up: never below the minimum
            assert rh * rw >= lo, (h, w, lo, hi)
        else:
            assert rh * rw == rounded
        assert abs(np.log((rh / rw) / (h / w))) < 0.5 or 28 in (rh, rw)  # aspect ratio kept


def test_smart_resize_rejects_aspect_ratio_over_200():
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200, got 201"):
        smart_resize(10, 2010)


# ---- sources ----

def _reference_resize(path, size):
    return Image.open(path).convert("RGB").resize(size, Image.BICUBIC)


def test_fetch_image_from_path_file_url_pil_numpy_base64_and_http(http_assets):
    expected = np.asarray(_reference_resize(JPG, (308, 168)))
    with open(JPG, "rb") as f:
        b64 = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    sources = [
        JPG,
        "file://" + JPG,
        Image.open(JPG),
        np.asarray(Image.open(JPG).convert("RGB")),
        np.asarray(Image.open(JPG).convert("RGB")).transpose(2, 0, 1),  # channels first
        np.asarray(Image.open(JPG).convert("RGB")).astype(np.float32),  # integer-valued floats
        b64,
        f"{http_assets}/1.jpg",
    ]
    for source in sources:
        image = fetch_image({"type": "image", "image": source})
        assert image.mode == "RGB" and image.size == (308, 168)
        np.testing.assert_array_equal(np.asarray(image), expected)
    for key in ("image_url", "url", "path"):
        np.testing.assert_array_equal(np.asarray(fetch_image({key: JPG})), expected)
    # OpenAI style {"image_url": {"url": ...}}
    np.testing.assert_array_equal(np.asarray(fetch_image({"image_url": {"url": JPG}})), expected)


def test_fetch_image_per_item_pixel_limits_and_fixed_size():
    assert fetch_image({"image": BIG}).size == (1008, 756)
    assert fetch_image({"image": BIG, "max_pixels": 256 * 28 * 28}).size == (504, 364)
    assert fetch_image({"image": JPG, "min_pixels": 512 * 28 * 28}).size == (868, 476)
    image = fetch_image({"image": BIG, "resized_height": 280, "resized_width": 420})
    assert image.size == (420, 280)
    # resized_height/width are themselves rounded to multiples of 28
    assert fetch_image({"image": BIG, "resized_height": 300, "resized_width": 400}).size == (392, 308)


def test_alpha_is_composed_on_white():
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:, 28:, 3] = 255  # right half opaque, left half fully transparent
    for source in (Image.fromarray(rgba, "RGBA"), rgba):
        image = fetch_image({"image": source})
        pixels = np.asarray(image)
        assert image.mode == "RGB"
        assert (pixels[:, :20] == 255).all()  # transparent -> white, not black
        assert (pixels[:, 36:] == [200, 0, 0]).all()
    la = Image.fromarray(np.stack([np.full((56, 56), 10, np.uint8), np.zeros((56, 56), np.uint8)], -1), "LA")
    assert (np.asarray(load_image(la)) == 255).all()
    gray = Image.fromarray(np.full((56, 56), 77, np.uint8), "L")
    assert (np.asarray(load_image(gray)) == 77).all() and load_image(gray).mode == "RGB"


def test_png_with_alpha_from_disk(tmp_path):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 1] = 180
    rgba[10:, :, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(str(path)))
    assert (pixels[:10] == 255).all()
    assert (pixels[10:] == [0, 180, 0]).all()


# ---- bad input names the item ----

def test_missing_image_file(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        fetch_image({"image": missing})
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        fetch_image({"image": "file://" + missing})


def test_undecodable_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image.*bad.jpg"):
        fetch_image({"image": str(bad)})
    truncated = tmp_path / "truncated.jpg"
    with open(BIG, "rb") as f:
        truncated.write_bytes(f.read()[:3000])
    with pytest.raises(ValueError, match="cannot decode image.*truncated.jpg"):
        fetch_image({"image": str(truncated)})
    with pytest.raises(ValueError, match="cannot decode image data:image/png") as info:
        fetch_image({"image": "data:image/png;base64," + base64.b64encode(b"garbage").decode()})
    # PIL's own message names its file object ("<_io.BytesIO object at 0x...>"): not passed on.
    assert str(info.value).endswith(": not an image format PIL reads") and "BytesIO" not in str(info.value)
    with pytest.raises(ValueError, match="invalid base64"):
        fetch_image({"image": "data:image/png;base64,@@@"})
    with pytest.raises(ValueError, match="not base64 encoded"):
        fetch_image({"image": "data:image/png,rawbytes"})


def test_url_failures_name_the_url(http_assets):
    url = f"{http_assets}/missing.jpg"
    with pytest.raises(ValueError, match=f"could not download image from {url}: HTTP 404"):
        fetch_image({"image": url})
    url = f"http://127.0.0.1:{closed_port()}/1.jpg"
    with pytest.raises(ValueError, match=f"could not download image from {url}"):
        fetch_image({"image": url})


def test_url_downloads_have_a_deadline_a_size_limit_and_a_read_timeout(monkeypatch):
    """The limits are read when a download starts (set here after the import), and each failure names the URL
    and the variable that sets the limit."""
    with trickle_server() as base:
        url = f"{base}/slow.jpg"
        monkeypatch.setenv("QWENVL_URL_DEADLINE", "1.5")
        start = time.monotonic()
        with pytest.raises(ValueError, match=rf"could not download image from {url}: not finished within the "
                                             r"deadline of 1.5 s \(QWENVL_URL_DEADLINE\), after \d+ bytes"):
            fetch_image({"image": url})
        assert time.monotonic() - start < 4  # the server alone would take 2000 s
        monkeypatch.setenv("QWENVL_URL_DEADLINE", "60")
        monkeypatch.setenv("QWENVL_URL_TIMEOUT", "0.5")
        with pytest.raises(ValueError, match=rf"{url}: no data for 0.5 s \(QWENVL_URL_TIMEOUT\)"):
            fetch_image({"image": url})
        monkeypatch.setenv("QWENVL_URL_TIMEOUT", "5")
        monkeypatch.setenv("QWENVL_URL_MAX_BYTES", "999")  # announced by Content-Length: refused before reading
        with pytest.raises(ValueError, match=rf"{url}: its 1000 bytes exceed the limit of 999 \(QWENVL_URL_MAX"):
            fetch_image({"image": url})
        monkeypatch.setenv("QWENVL_URL_MAX_BYTES", "100000")  # no length announced: counted while reading
        with pytest.raises(ValueError, match=rf"{base}/big: more than the limit of 100000 bytes \(QWENVL_URL_MAX"):
            fetch_image({"image": f"{base}/big"})
        monkeypatch.setenv("QWENVL_URL_MAX_BYTES", "lots")
        with pytest.raises(ValueError, match="QWENVL_URL_MAX_BYTES='lots': expected a positive whole number"):
            fetch_image({"image": url})


def assert_ends_at_the_deadline(url, after=""):
    """fetch_image(url) under QWENVL_URL_DEADLINE=1.5 fails with the deadline's message within 4 s."""
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"could not download image from {re.escape(url)}: not finished within "
                                         rf"the deadline of 1.5 s \(QWENVL_URL_DEADLINE\){re.escape(after)}"):
        fetch_image({"image": url})
    assert time.monotonic() - start < 4


def test_url_deadline_also_bounds_a_server_trickling_its_headers(monkeypatch):
    """Headers arrive inside urlopen, where each byte within QWENVL_URL_TIMEOUT restarts the read's timeout: the
    deadline still ends the download on time (the server alone would take 60 s)."""
    monkeypatch.setenv("QWENVL_URL_DEADLINE", "1.5")
    monkeypatch.setenv("QWENVL_URL_TIMEOUT", "5")
    with trickle_server() as base:
        assert_ends_at_the_deadline(f"{base}/headers.jpg", ", after 0 bytes")


def test_url_deadline_also_bounds_the_name_lookup(monkeypatch):
    """getaddrinfo takes no timeout; a resolver that does not answer (here: one that sleeps 30 s, in place of
    the system's) still ends at the deadline, with the deadline's message. (Every other URL test connects through
    the same lookup, to 127.0.0.1.)"""
    import socket as socket_module

    real = socket_module.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow.invalid":
            time.sleep(30)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", slow)
    monkeypatch.setenv("QWENVL_URL_DEADLINE", "1.5")
    assert_ends_at_the_deadline("http://slow.invalid/a.jpg")


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # 4 rows, 0..65535
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I")  # a 16-bit greyscale PNG, as PIL opens it
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    pixels = np.asarray(load_image(str(path)))
    assert pixels.shape == (4, 256, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == 256  # clipping left 2 values
    as_int32 = Image.fromarray(ramp.astype(np.int32))  # mode "I", as older Pillow opens 16-bit PNGs
    np.testing.assert_array_equal(np.asarray(load_image(as_int32))[..., 0], expected)


def _png_header_only(path, width, height):
    """A PNG that declares width x height 8-bit greyscale pixels and holds none: the size alone is the bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return str(path)


def test_decompression_bomb_names_the_file(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"image '.*bomb.png' is too large to decode safely: Image size "
                                         r"\(400000000 pixels\) exceeds limit"):
        fetch_image({"image": path})


def test_decoded_images_remember_their_source_for_messages(tmp_path):
    path = tmp_path / "thin.png"
    Image.fromarray(np.zeros((10, 3000, 3), np.uint8)).save(path)
    image = load_image(str(path))
    assert describe(image) == f"{str(path)!r} (3000x10)"
    assert describe(Image.fromarray(np.zeros((10, 30, 3), np.uint8))) == "<PIL image RGB 30x10>"  # not ours: unnamed


def test_aspect_ratio_over_200_names_the_image(tmp_path):
    path = tmp_path / "strip.png"
    Image.fromarray(np.zeros((10, 2500, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"strip.png.*aspect ratio must be smaller than 200, got 250"):
        fetch_image({"image": str(path)})


def test_unrecognized_image_inputs():
    with pytest.raises(ValueError, match="unrecognized image input <int>"):
        fetch_image({"image": 42})
    with pytest.raises(ValueError, match="expected uint8 values"):
        fetch_image({"image": np.full((30, 30, 3), 0.5)})
    with pytest.raises(ValueError, match="expected HxW, HxWx3"):
        fetch_image({"image": np.zeros((30, 30, 5), np.uint8)})
    with pytest.raises(ValueError, match="has none of the keys"):
        fetch_image({"type": "image"})


# ---- conversations ----

def _messages():
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": JPG},
                {"type": "text", "text": "and"},
                {"type": "image", "image": BIG, "max_pixels": 64 * 28 * 28},
                {"type": "video", "video": [JPG, JPG, JPG]},
            ],
        },
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": JPG}}, {"text": "again"}]},
    ]


def test_extract_vision_info_in_order():
    infos = extract_vision_info(_messages())
    assert [i.get("type") for i in infos] == ["image", "image", "video", "image_url"]
    assert extract_vision_info([_messages(), _messages()]) == infos + infos  # a batch of conversations


def test_process_vision_info():
    images, videos, kwargs = process_vision_info(_messages(), return_video_kwargs=True)
    assert [im.size for im in images] == [(308, 168), (252, 168), (308, 168)]
    # qwen-vl-utils 0.0.14: a video of frames comes back as uint8 [T, 3, H, W], 3 frames padded to an even count
    # with the last.
    assert len(videos) == 1 and videos[0].shape == (4, 3, 252, 420) and videos[0].dtype == np.uint8
    np.testing.assert_array_equal(videos[0][3], videos[0][2])
    assert kwargs == {"do_sample_frames": False, "fps": [2.0]}
    assert process_vision_info([{"role": "user", "content": "text only"}]) == (None, None)


def test_image_from_copied_file_with_spaces(tmp_path):
    path = tmp_path / "a photo.jpg"
    shutil.copy(JPG, path)
    assert fetch_image({"image": "file://" + str(path)}).size == (308, 168)
