"""Graphs compiled once for inputs of any shape.

In GRAPH_MODE MindSpore compiles a cell again for every new combination of input shapes, and a compilation
costs seconds (a 28-layer decode step 6-7 s, a shared layer step about 1 s, on the 2-core CPU of the
development machine). Cells whose inputs change shape from request to request (the vision tower's steps, the
decoder's prompt steps, the cache writes) declare their inputs with dynamic dimensions (`Cell.set_inputs`
with None), so that one compilation serves every image size, prompt length and batch.

A dynamic-shape graph re-infers its kernels' shapes at every call, and on the CPU backend some kernels are
slower in it: implicitly broadcasting elementwise ops (several times slower than broadcast_to and then the op,
see kernels.broadcast), transposes (about 4x), reshapes computed from a dynamic dimension (host-side shape
arithmetic at every call). The dynamic steps are written without them; then they run as fast as static ones.
The decode step, a thousand small kernels per token, stays static all the same (1.5-2x slower dynamic) and is
compiled per (batch rows, cache length) bucket (generation.py).
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
    """A cell run as one graph. Its input specs (`specs()`, see `dynamic`; None: static shapes) are declared at
    its first call, when the weights it is given have their final shapes (after loading and tensor-parallel
    sharding)."""

    def __init__(self):
        super().__init__(auto_prefix=False)  # a step holds cells of the model: it must not rename parameters
        self.declared = False

    def specs(self):
        return None

    def __call__(self, *args):
        if not self.declared:
            specs = self.specs()
            if specs is not None:
                self.set_inputs(*specs)
            self.declared = True
        return super().__call__(*args)

    def compiled(self):
        """Graphs compiled for this step so far (0 in PYNATIVE_MODE)."""
        return len(self.compile_cache)


# MindSpore's persistent compile cache (MS_COMPILER_CACHE_ENABLE) is not used. It stores the N-th graph a process
# compiles as compile_cache_N.mindir and gives that file to the N-th compilation of the next process, whatever
# graph it is; on the MindSpore 2.10 CPU backend a process that compiled the same graphs in another order ran the
# wrong ones (wrong numbers, or a Reshape size error), and giving each graph a cache folder of its own did not
# help: within a process every graph went to the folder of the first. Request shapes decide the compile order
# here, so it cannot be kept the same from one process to the next.
