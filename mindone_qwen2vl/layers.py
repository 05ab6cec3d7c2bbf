"""Small cells shared by the vision tower and the decoder, with Hugging Face parameter names.

MindSpore's own `nn.LayerNorm` / `nn.Embedding` name their parameters `gamma`/`beta` and
`embedding_table`, and `mint.nn.LayerNorm` / `mint.nn.Embedding` have no CPU kernels. These cells keep
HF's `weight`/`bias` so checkpoints load by name, and use only primitives that exist on CPU and Ascend.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .precision import NORM_DTYPE


def new_param(shape, dtype, init="zeros"):
    # Zeros are placeholders: from_pretrained overwrites every parameter with set_data.
    return Parameter(initializer(init, shape, dtype))


def as_arguments(params):
    """Parameters as graph arguments for a step shared by several layers (DecoderLayerStep, VisionBlockStep).

    `Tensor(p)` shares the parameter's memory. A Parameter passed as it is compiles one graph per parameter,
    and `Parameter.value()` copies it on every call (87 ms for the 2B model's 933 MB embedding table).
    """
    return tuple(Tensor(p) for p in params)


class Linear(nn.Cell):
    """y = x @ W^T + b with W stored [out, in] as in torch."""

    def __init__(self, in_features, out_features, bias=True, dtype=ms.float32, weight=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # A shared Parameter (tied lm_head) is passed in as `weight`.
        self.weight = weight if weight is not None else new_param((out_features, in_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None
        # transpose_b keeps the weight in place: an explicit W.T is materialised on every call on CPU.
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.compute(x, self.weight, self.bias)

    def compute(self, x, weight, bias=None):
        """The product with the given weight and bias: `construct` passes its own, a shared layer step
        (modeling_text.DecoderLayerStep) passes each layer's in turn."""
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(weight.dtype), weight)
        if bias is not None:
            y = y + bias
        return y.reshape(shape[:-1] + (self.out_features,))


class PackedLinear(Linear):
    """Several Linears of the checkpoint (q/k/v, gate/up) held as one [sum of rows, in] weight: one matmul
    and one bias add instead of one each per projection. A decode step is bound by the number of kernels it
    launches (about 10 us each on the CPU backend, whatever their size), and a single wider matmul reads the
    same bytes.

    parts: [(checkpoint Linear name, (start, stop) of its output rows held here, its whole out_features)];
    (0, whole) unless a tensor-parallel rank holds a slice. Loading fills the rows from the checkpoint's own
    tensors (loading.parameter_pieces), which keep their names.
    """

    def __init__(self, in_features, parts, bias=True, dtype=ms.float32):
        self.parts = [(name, tuple(span), whole) for name, span, whole in parts]
        self.sizes = tuple(stop - start for _, (start, stop), _ in self.parts)
        super().__init__(in_features, sum(self.sizes), bias=bias, dtype=dtype)

    def checkpoint_pieces(self):
        prefix = self.weight.name.rsplit(".", 2)[0]  # "model.layers.0.self_attn" of "...qkv_proj.weight"
        pieces = {self.weight.name: [(f"{prefix}.{name}.weight", 0, start, stop, (whole, self.in_features))
                                     for name, (start, stop), whole in self.parts]}
        if self.bias is not None:
            pieces[self.bias.name] = [(f"{prefix}.{name}.bias", 0, start, stop, (whole,))
                                      for name, (start, stop), whole in self.parts]
        return pieces


class LayerNorm(nn.Cell):
    """LayerNorm computed in float32 (fp16 LayerNorm has no CPU kernel and loses precision on Ascend)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = new_param((dim,), NORM_DTYPE, "ones")
        self.bias = new_param((dim,), NORM_DTYPE, "zeros")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y = self.norm(x.astype(NORM_DTYPE), self.weight, self.bias)[0]
        return y.astype(x.dtype)


class RMSNorm(nn.Cell):
    """Qwen2's RMSNorm, x / sqrt(mean(x^2) + eps) * weight, in float32.

    Computed as LayerNorm over the row [x, -x]: its mean is 0 and its variance mean(x^2), so the first half of
    LayerNorm's (v - mean) / sqrt(var + eps) * gamma is RMSNorm. That is four kernels (negation, concat, layer
    norm, slice) where the formula takes six, and a decode step on the CPU backend pays ~10 us per kernel;
    on Ascend the same single LayerNorm kernel replaces the chain too. gamma is [weight, weight]: the
    parameter holds the checkpoint's weight twice (loading.parameter_pieces reads it into both halves).
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.weight = new_param((2 * dim,), NORM_DTYPE, "ones")
        self.beta = Tensor(np.zeros(2 * dim, np.float32), NORM_DTYPE)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def checkpoint_pieces(self):
        name, whole = self.weight.name, (self.dim,)
        return {name: [(name, 0, 0, self.dim, whole), (name, 0, 0, self.dim, whole)]}

    def construct(self, x):
        return self.compute(x, self.weight)

    def compute(self, x, weight):
        h = x.astype(NORM_DTYPE)
        y = self.norm(ops.cat((h, -h), -1), weight, self.beta)[0]
        return split(y, (self.dim, self.dim), -1)[0].astype(x.dtype)


class Embedding(nn.Cell):
    def __init__(self, num_embeddings, dim, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((num_embeddings, dim), dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


_slice = ops.Slice()


def split(x, sizes, axis):
    """x cut into consecutive pieces of `sizes` along `axis`, with the Slice primitive: on the CPU backend
    `ops.split` and `x[a:b]` lower to StridedSlice, measured at ~45 us a kernel against ~4 us for Slice."""
    axis = axis % x.ndim
    parts, start = [], 0
    for size in sizes:
        begin = tuple(start if i == axis else 0 for i in range(x.ndim))
        extent = tuple(size if i == axis else x.shape[i] for i in range(x.ndim))
        parts.append(_slice(x, begin, extent))
        start += size
    return parts


def rotate_half_matrix(dim):
    """[dim, dim] R with x @ R == concat(-x2, x1) for x = concat(x1, x2), rotary's "rotate half": one matmul
    instead of two slices, a negation and a concat. Exact: every output is one input times +-1 plus zeros."""
    half = dim // 2
    r = np.zeros((dim, dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r
