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
    """A cell run as one graph whose input specs (`specs()`, see `dynamic`) are declared at its first call,
    when the weights it is given have their final shapes (after loading and tensor-parallel sharding)."""

    def __init__(self):
        super().__init__(auto_prefix=False)  # a step holds cells of the model: it must not rename parameters
        self.declared = False

    def specs(self):
        raise NotImplementedError

    def __call__(self, *args):
        if not self.declared:
            self.set_inputs(*self.specs())
            self.declared = True
        return super().__call__(*args)

    def compiled(self):
        """Graphs compiled for this step so far (0 in PYNATIVE_MODE)."""
        return len(self.compile_cache)
