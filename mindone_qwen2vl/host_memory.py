"""The host memory a CPU-backend process keeps between requests: the one place that bounds it.

A stream of requests of new sizes made the process's memory grow with every request (issue 16). Two causes were
found (docs/benchmarks.md, fifteenth session), neither MindSpore's memory pool:

- oneDNN's primitive cache. MindSpore's CPU matmuls are oneDNN primitives, one per distinct shape, each holding
  its generated code and buffers, kept in a cache of 1024 primitives per process by default. With dynamic shapes
  every new prompt length or image size adds a few: 14 KB for a small matmul, up to ~280 KB for a large one
  (measured through glibc's counters). `bound_primitive_cache` caps it at PRIMITIVE_CACHE primitives, which
  holds the shapes of several requests (a request uses about a dozen).
- glibc's heap keeps the pages of freed blocks; `release_freed` hands them back after a request (malloc_trim).

Both only on the CPU backend (Ascend runs no oneDNN matmuls), both skipped where the library is not there, and
an explicit ONEDNN_PRIMITIVE_CACHE_CAPACITY (or DNNL_...) in the environment wins over the cap.
"""
import ctypes
import ctypes.util
import os
import threading

PRIMITIVE_CACHE = 128

_lock = threading.Lock()
_libs = {}


def _load(key, find):
    with _lock:
        if key not in _libs:
            try:
                path = find()
                _libs[key] = ctypes.CDLL(path) if path else None
            except OSError:
                _libs[key] = None
        return _libs[key]


def _dnnl():
    def find():
        import mindspore
        path = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libdnnl.so.3")
        return path if os.path.isfile(path) else None
    return _load("dnnl", find)


def _libc():
    return _load("libc", lambda: ctypes.util.find_library("c"))


def primitive_cache_capacity():
    """oneDNN's primitive cache capacity in this process, or None without MindSpore's oneDNN."""
    lib = _dnnl()
    if lib is None or not hasattr(lib, "dnnl_get_primitive_cache_capacity"):
        return None
    value = ctypes.c_int()
    return value.value if lib.dnnl_get_primitive_cache_capacity(ctypes.byref(value)) == 0 else None


def bound_primitive_cache(capacity=PRIMITIVE_CACHE):
    """Cap oneDNN's primitive cache (see the module docstring), unless the environment sets it. Returns the
    capacity in effect, or None without MindSpore's oneDNN."""
    if os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") or os.environ.get("DNNL_PRIMITIVE_CACHE_CAPACITY"):
        return primitive_cache_capacity()
    lib = _dnnl()
    if lib is None or not hasattr(lib, "dnnl_set_primitive_cache_capacity"):
        return None
    if lib.dnnl_set_primitive_cache_capacity(ctypes.c_int(int(capacity))) != 0:
        return None
    return primitive_cache_capacity()


def release_freed():
    """Give the heap's free pages back to the system (glibc's malloc_trim); True if it gave any back."""
    lib = _libc()
    trim = getattr(lib, "malloc_trim", None) if lib is not None else None
    return bool(trim(0)) if trim is not None else False
