"""Decoding one image from any supported source into an RGB PIL image (no resizing here)."""
from __future__ import annotations

import base64
import binascii
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .sources import SOURCE_KEY, describe, is_url, local_path, read_url


# Modes whose samples exceed 8 bits: PIL's convert("RGB") clips them at 255 (a 16-bit greyscale PNG turns
# almost white), so they are scaled to 8 bits first.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image ("I;16*", or "I" as older Pillow opens 16-bit PNGs) as 8-bit "L": each value
    v in 0..65535 becomes round(v / 257), so 0 -> 0 and 65535 -> 255 (values outside 0..65535 are clipped)."""
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are laid over white, 16-bit greyscale is scaled (not clipped) to 8 bits.

    A plain ``convert("RGB")`` would drop the alpha channel and expose whatever colour the transparent
    pixels happen to hold (often black), which the model then sees as content.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return _to_8_bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _open(fp, name: str) -> Image.Image:
    try:
        image = Image.open(fp)
        # PIL decodes lazily: force it now so that a truncated or corrupt file fails here, with its name.
        image.load()
    except Image.DecompressionBombError as err:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS); its message gives the sizes but not the file.
        raise ValueError(f"image {name} is too large to decode safely: {err}") from err
    except UnidentifiedImageError as err:  # PIL's message names the file object (<_io.BytesIO object at 0x...>)
        raise ValueError(f"cannot decode image {name}: not an image format PIL reads") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image {name}: {err}") from err
    return image


def _from_data_url(source: str) -> Image.Image:
    header, sep, payload = source.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"image data URL {describe(source)} is not base64 encoded ('data:image/...;base64,...')")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image data URL {describe(source)} holds invalid base64: {err}") from err
    return _open(BytesIO(data), describe(source))


def _from_array(array: np.ndarray) -> Image.Image:
    name = describe(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # channels first
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array {name}: expected HxW, HxWx3 or HxWx4 (or channels first)")
    if array.dtype != np.uint8:
        # Integer-valued floats (e.g. a frame after `.float()`) are fine; 0..1 floats would be ambiguous.
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"image array {name}: expected uint8 values 0..255 (or integer-valued numbers)")
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"image array {name}: values must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(source, exif_transpose: bool = False) -> Image.Image:
    """An RGB PIL image from a path, ``file://`` path, http(s) URL, ``data:image/...;base64,`` URL,
    PIL image or numpy array.

    ``exif_transpose`` turns the pixels upright by the EXIF orientation tag, as Hugging Face's
    ``load_image`` does; qwen-vl-utils does not, so ``fetch_image`` leaves it off.
    """
    if isinstance(source, dict):  # OpenAI style {"url": ...}
        source = source.get("url", source)
    name = None
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, str):
        if is_url(source):
            name = repr(source)
            image = _open(BytesIO(read_url(source, "image")), name)
        elif source.startswith("data:"):
            name = describe(source)
            image = _from_data_url(source)
        else:
            path = local_path(source, "image")
            name = repr(path)
            image = _open(path, name)
    else:
        raise ValueError(
            f"unrecognized image input {describe(source)}: expected a local path, file:// path, http(s) URL, "
            "data:image base64 URL, PIL image or numpy array"
        )
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if name is not None:  # decoded here (a new image): later errors about it can name its file or URL
        image.info[SOURCE_KEY] = name
    return image
