"""The computations that have a portable form and a fused Ascend kernel: the one place that chooses.

`PortableKernels` runs everywhere (the CPU backend included) and is the numerical reference; `AscendKernels`
swaps in MindSpore's fused Ascend operators where one exists (`ops.rms_norm`, `ops.swiglu`). Cells hold the
class the precision policy picked (`kernels_for(policy)`) and call it in `construct`; graph mode resolves the
choice when it compiles. Attention backends live in attention.py.
"""
import mindspore as ms
import numpy as np
from mindspore import ops

_slice = ops.Slice()


def split(x, sizes, axis, ndim):
    """x (of rank `ndim`) cut into consecutive pieces of `sizes` along `axis` (>= 0), with the Slice primitive:
    on the CPU backend `ops.split` and `x[a:b]` lower to StridedSlice, measured at ~45 us a kernel against ~4 us
    for Slice. The other dimensions are taken whole (-1), so they may be dynamic."""
    parts, start = [], 0
    for size in sizes:
        begin = [0] * ndim
        extent = [-1] * ndim
        begin[axis] = start
        extent[axis] = size
        parts.append(_slice(x, tuple(begin), tuple(extent)))
        start += size
    return parts


def rotate_half_matrix(dim):
    """[dim, dim] R with x @ R == concat(-x2, x1) for x = concat(x1, x2), rotary's "rotate half" as one
    matmul instead of two slices, a negation and a concat. Exact: each output is one input times +-1."""
    half = dim // 2
    r = np.zeros((dim, dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def broadcast(y, like):
    """y broadcast to the shape of `like` for an elementwise op with it: explicitly in a dynamic-shape graph,
    where on the CPU backend an implicitly broadcasting op is several times slower than broadcast_to and then
    the op (a [279, 1536] x [1536] multiply: 4.2 ms against 0.7; static: 0.8); implicitly in a static graph
    and in pynative mode, where the explicit broadcast would be one more kernel for nothing."""
    if ops.isconstant(like.shape):
        return y
    return ops.broadcast_to(y, like.shape)


def _float32_if_bf16(fn, x):
    """fn(x), computed in float32 when x is bfloat16: MindSpore documents ops.silu, ops.sigmoid and ops.gelu
    for float16/float32 only (on Ascend too), and the Ascend policy computes in bfloat16. float32 and float16
    inputs go straight through (the dtype test is a constant when a graph compiles)."""
    if x.dtype == ms.bfloat16:
        return fn(x.astype(ms.float32)).astype(ms.bfloat16)
    return fn(x)


def _quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def _gelu(x):
    return ops.gelu(x, approximate="none")


class PortableKernels:
    name = "portable"

    # Activations, each in a dtype its op documents (see _float32_if_bf16).
    @staticmethod
    def silu(x):
        return _float32_if_bf16(ops.silu, x)

    @staticmethod
    def quick_gelu(x):
        """x * sigmoid(1.702 x), the Qwen2-VL vision MLP's activation."""
        return _float32_if_bf16(_quick_gelu, x)

    @staticmethod
    def gelu(x):
        """The exact (erf) GELU of the PatchMerger."""
        return _float32_if_bf16(_gelu, x)

    @staticmethod
    def rms_norm(x, weight, eps):
        """Qwen2's RMSNorm in float32: x / sqrt(mean(x^2) + eps) * weight, x [T, dim]."""
        h = x.astype(ms.float32)
        scale = ops.rsqrt((h * h).mean(-1, keep_dims=True) + eps)
        return (h * broadcast(scale, h) * broadcast(weight, h)).astype(x.dtype)

    @staticmethod
    def swiglu(gate, up):
        """silu(gate) * up."""
        return PortableKernels.silu(gate) * up


class AscendKernels(PortableKernels):
    name = "ascend"

    @staticmethod
    def rms_norm(x, weight, eps):
        return ops.rms_norm(x.astype(ms.float32), weight, eps)[0].astype(x.dtype)

    @staticmethod
    def swiglu(gate, up):
        return ops.swiglu(ops.cat((gate, up), 1), 1)  # documents bfloat16 on Ascend; takes [gate, up] as one


def kernels_for(policy):
    return AscendKernels if policy.device == "Ascend" else PortableKernels
