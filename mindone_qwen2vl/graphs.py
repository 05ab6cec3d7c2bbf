"""Graphs compiled once for inputs of any shape.

In GRAPH_MODE MindSpore compiles a cell again for every new combination of input shapes, and a compilation
costs seconds (a 28-layer decode step 6-7 s, a shared layer step about 1 s, on the 2-core CPU of the
development machine). Cells whose inputs change shape from request to request (the vision tower's steps, the
decoder's prompt steps, the cache writes) declare their inputs with dynamic dimensions (`Cell.set_inputs`
with None), so that one compilation serves every image size, prompt length and batch.

A dynamic-shape graph re-infers its kernels' shapes at every call: about 30 us a kernel more than a static one
on that CPU. That is nothing next to a prompt's or an image's matmuls, and too much for the decode step (a
few thousand small kernels per token), which stays static and is compiled per (batch, cache length) bucket
(generation.py).
"""
import functools
import glob
import hashlib
import os
import shutil

import mindspore as ms
from mindspore import Tensor, nn


def dynamic(shape, dtype=ms.float32):
    """An input spec; None in `shape` marks a dimension that changes from call to call."""
    return Tensor(shape=list(shape), dtype=dtype)


def like(tensors):
    """Static specs of the given tensors (weights: their shapes never change)."""
    if any(t is None for t in tensors):
        raise ValueError("every weight of a shared step must be a tensor")
    return [Tensor(shape=list(t.shape), dtype=t.dtype) for t in tensors]


class Step(nn.Cell):
    """A cell run as one graph. Its input specs (`specs()`, see `dynamic`; None: static shapes) are declared at
    its first call, when the weights it is given have their final shapes (after loading and tensor-parallel
    sharding). `fingerprint` (a callable the model sets) names what its graph depends on beyond its inputs, for
    the persistent compile cache."""

    def __init__(self):
        super().__init__(auto_prefix=False)  # a step holds cells of the model: it must not rename parameters
        self.declared = False
        self.fingerprint = str

    def specs(self):
        return None

    def __call__(self, *args):
        if not self.declared:
            specs = self.specs()
            if specs is not None:
                self.set_inputs(*specs)
            self.declared = True
        if _CACHE.root and self.compiled() == 0 and ms.get_context("mode") == ms.GRAPH_MODE:
            with _CACHE.compiling(self, args):
                return super().__call__(*args)
        return super().__call__(*args)

    def compiled(self):
        """Graphs compiled for this step so far (0 in PYNATIVE_MODE)."""
        return len(self.compile_cache)


# ---------------------------------------------------------------------------------------------- compile cache
class CompileCache:
    """MindSpore's persistent compile cache (MS_COMPILER_CACHE_ENABLE / MS_COMPILER_CACHE_PATH), made safe.

    MindSpore stores the N-th graph a process compiles as `compile_cache_N.mindir` and loads that file for the
    N-th compilation of the next process, whatever graph it is: with graphs compiled in another order it ran
    the wrong graph and returned wrong numbers (seen with MindSpore 2.10 on the CPU backend). So each of our
    graphs gets a folder of its own, named by a hash of everything the graph depends on (this package's source,
    MindSpore's version, the step, the model's fingerprint, the input shapes), and before a compilation the
    folder's file is offered under the number MindSpore will look for. The cache is switched on only around
    our own compilations. Folders whose graph's source changed are never found again (the hash moved on).
    """

    def __init__(self):
        self.root = None
        self.count = 0  # compilations done with MindSpore's cache on, in this process: its file number

    def compiling(self, step, args):
        key = self.key(step, args)
        folder = os.path.join(self.root, key)
        graph_cache = os.path.join(folder, f"rank_{_rank()}", "graph_cache")
        os.makedirs(graph_cache, exist_ok=True)
        wanted = os.path.join(graph_cache, f"compile_cache_{self.count}.mindir")
        have = sorted(glob.glob(os.path.join(graph_cache, "compile_cache_*.mindir")))
        if have and not os.path.exists(wanted):
            shutil.copyfile(have[0], wanted)
        # MindSpore checks its own hash of the script's dependencies in the folder of the process's first
        # cached compilation; any folder's copy will do for that.
        hash_file = os.path.join(graph_cache, "compile_dependency.hash")
        if not os.path.exists(hash_file):
            others = glob.glob(os.path.join(self.root, "*", f"rank_{_rank()}", "graph_cache", "compile_dependency.hash"))
            if others:
                shutil.copyfile(others[0], hash_file)
        return _CacheSwitch(self, folder)

    def key(self, step, args):
        shapes = [(tuple(a.shape), str(a.dtype)) if isinstance(a, Tensor) else repr(a) for a in args]
        text = repr((_source_hash(), ms.__version__, type(step).__qualname__, step.fingerprint(), shapes))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class _CacheSwitch:
    def __init__(self, cache, folder):
        self.cache, self.folder = cache, folder

    def __enter__(self):
        os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
        os.environ["MS_COMPILER_CACHE_PATH"] = self.folder

    def __exit__(self, *exc):
        os.environ.pop("MS_COMPILER_CACHE_ENABLE", None)
        os.environ.pop("MS_COMPILER_CACHE_PATH", None)
        self.cache.count += 1
        return False


_CACHE = CompileCache()


CACHE_VARIABLE = "MINDONE_QWEN2VL_COMPILE_CACHE"


def enable_compile_cache(path):
    """Keep compiled graphs in `path` and load them in later processes instead of compiling again (GRAPH_MODE).
    None turns it off. It is process-wide, like MindSpore's own switch it drives. A model built while
    MINDONE_QWEN2VL_COMPILE_CACHE names a folder turns it on with that folder."""
    _CACHE.root = None if path is None else os.path.abspath(os.path.expanduser(str(path)))
    if _CACHE.root:
        os.makedirs(_CACHE.root, exist_ok=True)
    return _CACHE.root


def compile_cache_from_environment():
    path = os.environ.get(CACHE_VARIABLE)
    if path and _CACHE.root is None:
        enable_compile_cache(path)
    return _CACHE.root


def _rank():
    from .parallel import get_rank

    return get_rank()


@functools.lru_cache(maxsize=1)
def _source_hash():
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()
