"""Where image and video bytes come from: local paths, ``file://`` paths and ``http(s)://`` URLs.

A download is bounded three ways, each set by an environment variable read when a download starts (so a
process can change them between downloads; importing reads nothing):

    QWENVL_URL_TIMEOUT    seconds to wait for the connection or for any next bytes   (default 30)
    QWENVL_URL_DEADLINE   seconds for the whole download, however the bytes trickle  (default 300)
    QWENVL_URL_MAX_BYTES  largest body accepted, in bytes                            (default 1 GiB)
"""
from __future__ import annotations

import http.client
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

CHUNK = 1 << 16

# name: (default, integer?)
_LIMITS = {
    "QWENVL_URL_TIMEOUT": (30.0, False),
    "QWENVL_URL_DEADLINE": (300.0, False),
    "QWENVL_URL_MAX_BYTES": (1 << 30, True),
}


@dataclass(frozen=True)
class DownloadLimits:
    timeout: float  # per connection attempt and per read
    deadline: float  # the whole download
    max_bytes: int


def download_limits() -> DownloadLimits:
    """The limits in force now (environment variables over the defaults); a ValueError names a bad variable."""
    values = []
    for name, (default, integer) in _LIMITS.items():
        text = os.environ.get(name, "").strip()
        if not text:
            values.append(default)
            continue
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            what = "a positive whole number of bytes" if integer else "a positive number of seconds"
            raise ValueError(f"environment variable {name}={text!r}: expected {what}")
        values.append(value)
    return DownloadLimits(*values)


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


def _socket(response):
    # urlopen's response reads through a buffered SocketIO; its socket takes a new timeout between reads,
    # which is how the deadline also bounds a server that sends one byte just before each read times out.
    return getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)


class DownloadError(ValueError):
    """A download that failed or broke a limit; the message names the URL."""


class _Deadline:
    """Ends a download at its deadline whatever it waits for: a timer shuts the connection's socket down, which
    wakes a read blocked anywhere (a server trickling its status line or headers, which the per-read timeout
    alone lets run on, byte by byte, or the body). Its handlers make urllib's connections (redirects included)
    through `connection`, which registers each."""

    def __init__(self, seconds: float):
        self.lock = threading.Lock()
        self.connections = []
        self.expired = False
        self.stop_at = time.monotonic() + seconds
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def connection(self, http_class):
        def make(*args, **kwargs):
            conn = http_class(*args, **kwargs)
            conn._create_connection = self._open_socket  # http.client's hook for making the socket
            connect = conn.connect

            def connect_then_check():
                connect()
                with self.lock:
                    self.connections.append(conn)
                    if self.expired:  # the deadline passed while connecting
                        self._shut(conn)

            conn.connect = connect_then_check
            return conn

        return make

    def _open_socket(self, address, timeout=None, source_address=None, **kwargs):
        """The connection's socket, with the host name looked up within the deadline: getaddrinfo takes no
        timeout (a resolver that does not answer holds it for the system's retries), so it runs on a thread of
        its own and is abandoned at the deadline."""
        host, port = address
        found = {}

        def lookup():
            try:
                found["addresses"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            except OSError as error:
                found["error"] = error

        thread = threading.Thread(target=lookup, name="url-lookup", daemon=True)
        thread.start()
        thread.join(max(0.0, self.stop_at - time.monotonic()))
        if thread.is_alive():
            self.expired = True
            raise TimeoutError(f"looking up {host!r} took longer than the deadline")
        if "error" in found:
            raise found["error"]
        error = OSError(f"no address for {host!r}")
        for family, kind, proto, _, sockaddr in found["addresses"]:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                sock.close()
                error = err
        raise error

    def _expire(self):
        with self.lock:
            self.expired = True
            for conn in self.connections:
                self._shut(conn)

    @staticmethod
    def _shut(conn):
        sock = conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's (for TLS too): EOF to readers
            except OSError:  # already closed
                pass

    def opener(self):
        deadline = self

        class HTTP(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(deadline.connection(http_class), req, **kwargs)

        class HTTPS(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(deadline.connection(http_class), req, **kwargs)

        return urllib.request.build_opener(HTTP, HTTPS)


def read_url(url: str, kind: str) -> bytes:
    """The body of ``url`` within the download limits; any failure (HTTP status, refused connection, timeout,
    deadline, size) is a DownloadError (a ValueError) naming the URL and, for a limit, its variable."""
    limits = download_limits()

    def fail(reason):
        return DownloadError(f"could not download {kind} from {url}: {reason}")

    def late(size):
        return fail(f"not finished within the deadline of {limits.deadline:g} s (QWENVL_URL_DEADLINE), "
                    f"after {size} bytes")

    request = urllib.request.Request(url, headers={"User-Agent": "mindone-qwen2vl"})
    size = 0
    deadline_wait = limits.deadline <= limits.timeout  # the wait in progress ends at the deadline
    deadline = _Deadline(limits.deadline)
    deadline.timer.start()
    try:
        with deadline.opener().open(request, timeout=min(limits.timeout, limits.deadline)) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise fail(f"its {int(declared)} bytes exceed the limit of {limits.max_bytes} (QWENVL_URL_MAX_BYTES)")
            sock = _socket(response)
            chunks = []
            while True:
                left = deadline.stop_at - time.monotonic()
                if left <= 0:
                    raise late(size)
                deadline_wait = left <= limits.timeout
                if sock is not None:
                    sock.settimeout(min(limits.timeout, left))
                chunk = response.read1(CHUNK)
                if not chunk:
                    if deadline.expired:  # the end the deadline made, not the body's
                        raise late(size)
                    return b"".join(chunks)
                size += len(chunk)
                if size > limits.max_bytes:
                    raise fail(f"more than the limit of {limits.max_bytes} bytes (QWENVL_URL_MAX_BYTES)")
                chunks.append(chunk)
    except DownloadError:
        raise
    except urllib.error.HTTPError as err:
        raise fail(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        if deadline.expired:  # whatever the shut socket made the reader raise
            raise late(size) from err
        reason = getattr(err, "reason", err)
        if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
            if deadline_wait:
                raise late(size) from err
            reason = f"no data for {limits.timeout:g} s (QWENVL_URL_TIMEOUT)"
        raise fail(reason) from err
    finally:
        deadline.timer.cancel()


SOURCE_KEY = "mindone_qwen2vl.source"  # in a decoded image's ``info``: where it was read from, for messages


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
        origin = (getattr(source, "info", None) or {}).get(SOURCE_KEY)
        if origin:  # an image load_image decoded: name its file or URL
            return f"{origin} ({size[0]}x{size[1]})"
        return f"<PIL image {mode} {size[0]}x{size[1]}>"
    return f"<{type(source).__name__}>"
