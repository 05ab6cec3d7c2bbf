"""Small cells shared by the vision tower and the decoder, with Hugging Face parameter names and shapes.

MindSpore's own `nn.LayerNorm` / `nn.Embedding` name their parameters `gamma`/`beta` and `embedding_table`,
and `mint.nn.LayerNorm` / `mint.nn.Embedding` have no CPU kernels. These cells keep HF's `weight`/`bias` so
checkpoints load by name, and use only primitives that exist on CPU and Ascend.

Cells that hold weights take them as optional arguments: called plainly they use their own Parameters; a
step compiled once for every layer (the prompt steps of modeling_text, the block steps of modeling_vision)
passes each layer's tensors instead. The math is the same code either way.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .kernels import PortableKernels
from .precision import NORM_DTYPE


def new_param(shape, dtype, init="zeros"):
    # Zeros are placeholders: from_pretrained overwrites every parameter with set_data.
    return Parameter(initializer(init, shape, dtype))


def as_arguments(params):
    """Parameters as graph arguments for a step shared by several layers.

    `Tensor(p)` shares the parameter's memory. A Parameter passed as it is compiles one graph per parameter,
    and `Parameter.value()` copies it on every call (87 ms for the 2B model's 933 MB embedding table).
    """
    return tuple(None if p is None else Tensor(p) for p in params)


class LayerArguments:
    """A layer's weights() as step arguments (as_arguments), made again only when a parameter's memory has
    changed (Parameter.set_data gives it new memory; the arguments share the old one). Checking costs about
    0.2 us a parameter against 5.5 us for making an argument: 28 layers x 12 weights at every prompt and every
    layer-wise decode token."""

    def __init__(self, layer):
        self.params = tuple(layer.weights())
        self.memory, self.args = None, None

    def __call__(self):
        memory = tuple(None if p is None else p.data_ptr() for p in self.params)
        if memory != self.memory:
            self.memory, self.args = memory, as_arguments(self.params)
        return self.args


def layer_arguments(owner, layers):
    """[LayerArguments] of `layers`, kept on the cell `owner` from its first call on: by then any tensor-parallel
    sharding (which replaces the layers' cells and their parameters) has happened."""
    found = owner.__dict__.get("_layer_arguments")
    if found is None:
        found = [LayerArguments(layer) for layer in layers]
        object.__setattr__(owner, "_layer_arguments", found)  # a plain attribute: no cell or parameter of its own
    return found


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
        # BiasAdd, not `+`: in a dynamic-shape graph on the CPU backend a broadcasting add of [279, 1536] and
        # [1536] took 3.0 ms against 0.6 ms for BiasAdd.
        self.bias_add = ops.BiasAdd()

    def construct(self, x, weight=None, bias=None):
        """x [T, in] -> [T, out]. With `weight` given, `bias` is the given one too (None: no bias).

        Inputs are 2-D by design: in a dynamic-shape graph, a reshape that depends on an input's dimensions
        costs host-side shape arithmetic at every call."""
        if weight is None:
            weight, bias = self.weight, self.bias
        y = self.product(x.astype(weight.dtype), weight)
        if bias is not None:
            y = self.bias_add(y, bias)
        return y

    def product(self, x, weight):
        return self.matmul(x, weight)


class LayerNorm(nn.Cell):
    """LayerNorm computed in float32 (fp16 LayerNorm has no CPU kernel and loses precision on Ascend)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = new_param((dim,), NORM_DTYPE, "ones")
        self.bias = new_param((dim,), NORM_DTYPE, "zeros")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x, weight=None, bias=None):
        if weight is None:
            weight, bias = self.weight, self.bias
        return self.norm(x.astype(NORM_DTYPE), weight, bias)[0].astype(x.dtype)


class RMSNorm(nn.Cell):
    """Qwen2's RMSNorm, x / sqrt(mean(x^2) + eps) * weight, in float32 (kernels.rms_norm)."""

    def __init__(self, dim, eps=1e-6, kernels=PortableKernels):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = new_param((dim,), NORM_DTYPE, "ones")

    def construct(self, x, weight=None):
        return self.kernels.rms_norm(x, self.weight if weight is None else weight, self.eps)


class Embedding(nn.Cell):
    def __init__(self, num_embeddings, dim, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((num_embeddings, dim), dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)
