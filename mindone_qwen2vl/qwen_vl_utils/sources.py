"""Where image and video bytes come from: local paths, ``file://`` paths and ``http(s)://`` URLs."""
from __future__ import annotations

import os
import urllib.error
import urllib.request

URL_TIMEOUT = float(os.environ.get("QWENVL_URL_TIMEOUT", 30))


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def local_path(source: str, kind: str) -> str:
    """The file system path of a local source; a clear error when there is no such file.

    ``kind`` ("image" or "video") only serves the error message.
    """
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{kind} file {path!r} {what}")
    return path


def read_url(url: str, kind: str) -> bytes:
    """The body of ``url``; any failure (HTTP status, refused connection, timeout) names the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "mindone-qwen2vl"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise ValueError(f"could not download {kind} from {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"could not download {kind} from {url}: {reason}") from err


def describe(source) -> str:
    """A short name of an image/video source for error messages (data URLs and arrays can be huge)."""
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"{source[:30]}... ({len(source)} characters)"
        return repr(source)
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} shape={tuple(shape)} dtype={getattr(source, 'dtype', '?')}>"
    size = getattr(source, "size", None)
    mode = getattr(source, "mode", None)
    if mode is not None and size is not None:
        return f"<PIL image {mode} {size[0]}x{size[1]}>"
    return f"<{type(source).__name__}>"
