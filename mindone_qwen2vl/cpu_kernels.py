"""The CPU backend's own kernels (csrc/*.cc), built for this machine on first use.

- csrc/sdpa.cc, the "sdpa" attention: MindSpore's CPU backend has no fused attention; eager attention there
  computes, holds and reads back every score. It computes softmax(q k^T) v tile by tile with a running maximum
  and sum (the scores never leave the CPU's cache), for the vision tower and the prompt.
- csrc/decode.cc, a decode step's decoder layer and head: a layer is about 47 kernels on the CPU backend, each
  a few microseconds for a few hundred multiply-adds at small widths, and oneDNN's product of one row with the
  embedding table (the head) runs well below the memory's bandwidth. Here each is one operator (see
  generation.DecodeOneToken).

They run as MindSpore "aot" custom operators, in graph mode (dynamic shapes included) and in pynative mode. The
library is built with the machine's C++ compiler (`$CXX`, else g++) for the CPU it runs on (-march=native) into a
cache directory: $MINDONE_QWEN2VL_KERNEL_CACHE, else ~/.cache/mindone_qwen2vl/kernels. Its name holds a hash of
the sources, the compiler's flags and the CPU's flags, so a cache shared by several machines keeps one build per
CPU kind. Float32 only; the attention kernels take other dtypes as float32.

Nothing is built at import: `kernels()` builds (or finds) the library the first time a model asks for it, and
checks it against numpy before handing it out.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

CXX_FLAGS = ["-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-pthread"]
LIBS = ["-ldl"]  # dlopen, in libc itself since glibc 2.34
_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(_CSRC / name for name in ("sdpa.cc", "decode.cc", "prompt.cc", "vision.cc"))
HEADERS = (_CSRC / "kernels.h",)

_lock = threading.Lock()
_state = {}


class KernelsUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


def cache_dir():
    env = os.environ.get("MINDONE_QWEN2VL_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mindone_qwen2vl" / "kernels"


def _cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def library_path(compiler):
    sources = b"".join(s.read_bytes() for s in SOURCES + HEADERS)
    flags = " ".join([compiler] + CXX_FLAGS + LIBS).encode()
    key = hashlib.sha256(sources + flags + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{key}.so"


def build():
    """The path of the built library: found in the cache or compiled into it (atomically, so that processes
    starting together never load half a file)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelsUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    target = library_path(compiler)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise KernelsUnavailable(f"cannot write the kernel cache {target.parent}: {e.strerror or e}") from None
    try:
        command = [compiler, *CXX_FLAGS, "-I", str(HEADERS[0].parent), *map(str, SOURCES), *LIBS, "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            names = " ".join(s.name for s in SOURCES)
            raise KernelsUnavailable(f"{compiler} failed on {names}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Kernels:
    """The library's operators, as MindSpore Custom primitives:
    frame(q [G, Lq, D] or [H, F, Lq, D], k, v [same leading dims, L, D]) -> like q, every key visible;
    causal(q [H, Sq, D], k, v [KVH, S, D], positions [Sq] int32) -> like q, query i sees keys 0..positions[i].
    Query group g reads key group g // (query groups / key groups) (grouped-query attention).
    decode_layer(x, cos, sin, mask, rows, key_cache, value_cache, *weights, eps) -> x after the layer, the token's
    key and value written into the caches (csrc/decode.cc; weights in DecoderLayerWeights' order);
    decode_head(x [R, E], norm [E], weight [V, E], eps [1]) -> logits [R, V];
    prompt_project(x [T, E], cos, sin, input_norm, q_w, q_b, k_w, k_b, v_w, v_b, eps) -> qkv [N, T, D] heads first,
    prompt_attend(x, qkv, rows [Sq] int32, o_w, post_norm, gate_w, up_w, down_w, eps) -> [Sq, E]: a prompt's
    layer (csrc/prompt.cc);
    vision_block(x [N, E], cos, sin [N, 3, 1, D], bounds [S + 1] int32, kind [1] int32, *weights) -> [N, E]: a
    vision block whose rows attend within the segments `bounds` gives (csrc/vision.cc).
    `layers_ready` says whether the prompt and vision operators can be used: their products run on oneDNN's sgemm
    (without it they fail) and they are checked once against numpy."""

    def __init__(self, path):
        from mindspore import ops
        from mindspore.ops import CustomRegOp, DataType

        f32, i32 = DataType.F32_Default, DataType.I32_Default

        def op(name, inputs, dtypes):
            reg = CustomRegOp(name)
            for i, input_name in enumerate(inputs):
                reg = reg.input(i, input_name)
            info = reg.output(0, "out").dtype_format(*dtypes, f32).target("CPU").get_op_info()
            # out_shape=None: the library's <name>InferShape gives it (MindSpore needs that for dynamic shapes).
            return ops.Custom(f"{path}:{name}", out_shape=None, out_dtype=lambda *types: types[0],
                              func_type="aot", reg_info=info)

        self.path = path
        self.frame = op("FrameAttention", ("q", "k", "v"), (f32, f32, f32))
        self.causal = op("CausalAttention", ("q", "k", "v", "positions"), (f32, f32, f32, i32))
        layer_inputs = ("x", "cos", "sin", "mask", "rows", "key_cache", "value_cache", "input_norm", "q_weight",
                        "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "post_norm",
                        "gate_weight", "up_weight", "down_weight", "eps")
        self.decode_layer = op("DecodeLayer", layer_inputs, (f32,) * 4 + (i32,) + (f32,) * 15)
        self.decode_head = op("DecodeHead", ("x", "norm", "weight", "eps"), (f32,) * 4)
        self.prompt_project = op("PromptProject", ("x", "cos", "sin") + layer_inputs[7:14] + ("eps",), (f32,) * 11)
        self.prompt_attend = op("PromptAttend", ("x", "qkv", "rows") + layer_inputs[14:],
                                (f32, f32, i32) + (f32,) * 6)
        self.vision_block = op("VisionBlock", ("x", "cos", "sin", "bounds", "kind") + tuple(f"w{i}" for i in range(12)),
                               (f32, f32, f32, i32, i32) + (f32,) * 12)

    @property
    def layers_ready(self):
        """Whether the prompt and vision operators can be used: they found oneDNN's sgemm (asked again until they
        have: MindSpore may load oneDNN after this library), and they compute right (check_layers, once)."""
        ready = self.__dict__.get("_layers_ready")
        if ready is None:
            if not ctypes.CDLL(self.path).LayerKernelsReady():
                return False
            problem = check_layers(self)
            if problem is not None:
                warnings.warn(f"the CPU kernels at {self.path}: {problem}; prompts and vision blocks run MindSpore's "
                              "kernels instead", RuntimeWarning, stacklevel=2)
            ready = self._layers_ready = problem is None
        return ready


def check(kernels):
    """The attention operators and the head on small inputs against numpy (float64): a library that does not load,
    or computes wrong, is found here, once per process, rather than in the middle of a request. (The prompt and
    vision layers are checked by check_layers when they are first asked for; the decode layer against the model's
    own layer by the tests.)"""
    import numpy as np
    from mindspore import Tensor

    def agree(got, want, tolerance):
        err = float(np.abs(got.asnumpy().reshape(want.shape) - want).max())
        if not err < tolerance:
            raise KernelsUnavailable(f"the kernels built at {kernels.path} compute wrong results (error {err:.1e})")

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 1, 5, 16)).astype(np.float32) for _ in range(3))
    scores = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2)
    for causal in (False, True):
        s = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf) if causal else scores
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v
        if causal:
            positions = Tensor(np.arange(5, dtype=np.int32))
            agree(kernels.causal(Tensor(q[:, 0]), Tensor(k[:, 0]), Tensor(v[:, 0]), positions), want, 1e-5)
        else:
            agree(kernels.frame(Tensor(q), Tensor(k), Tensor(v)), want, 1e-5)
    x, norm, weight = rng.standard_normal((3, 16)), rng.standard_normal(16), rng.standard_normal((40, 16))
    want = (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * norm) @ weight.T
    head = kernels.decode_head(*(Tensor(a.astype(np.float32)) for a in (x, norm, weight, np.array([1e-6]))))
    agree(head, want, 1e-4)


def check_layers(kernels):
    """A prompt's layer and a vision block of small random weights against numpy (float64): None, or what is
    wrong. Two query heads share one KV head; the block's rows attend in segments of 3 and 2."""
    import numpy as np
    from mindspore import Tensor

    rng = np.random.default_rng(1)
    t, e, h, kvh, d, inter = 5, 16, 2, 1, 8, 24
    n = h + 2 * kvh

    def r(*shape):
        return rng.standard_normal(shape) * 0.5

    def rms(a, w):
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6) * w

    def rotate(a, c, s):  # a cos + rotate_half(a) sin
        half = a.shape[-1] // 2
        return a * c + np.concatenate([-a[..., half:], a[..., :half]], -1) * s

    def attend(q, k, v, visible):  # one query row over the keys it sees
        scores = k[visible] @ q
        p = np.exp(scores - scores.max())
        return (p / p.sum()) @ v[visible]

    def run(op, *arrays):
        return op(*(Tensor(a.astype(np.int32 if a.dtype.kind == "i" else np.float32)) for a in arrays)).asnumpy()

    eps = np.array([1e-6])
    x, cos, sin = r(t, e), r(t, n, d), r(t, n, d)
    w = [r(e) + 1, r(h * d, e), r(h * d), r(kvh * d, e), r(kvh * d), r(kvh * d, e), r(kvh * d), r(e, h * d),
         r(e) + 1, r(inter, e), r(inter, e), r(e, inter)]
    normed = rms(x, w[0])
    qkv = np.concatenate([normed @ w[1].T + w[2], normed @ w[3].T + w[4], normed @ w[5].T + w[6]], 1)
    rotated = rotate(qkv.reshape(t, n, d), cos, sin).transpose(1, 0, 2)
    rows = np.array([1, 4])
    heads = [[attend(rotated[j, i], rotated[h + j * kvh // h], rotated[h + kvh + j * kvh // h], slice(0, i + 1))
              for j in range(h)] for i in rows]
    y = x[rows] + np.asarray(heads).reshape(len(rows), h * d) @ w[7].T
    normed = rms(y, w[8])
    gate = normed @ w[9].T
    layer = y + (gate / (1 + np.exp(-gate)) * (normed @ w[10].T)) @ w[11].T

    bounds = np.array([0, 3, 5])
    table = (r(t, 3, 1, d), r(t, 3, 1, d))
    b = [r(e) + 1, r(e), r(3 * e, e), r(3 * e), r(e, e), r(e), r(e) + 1, r(e), r(inter, e), r(inter), r(e, inter),
         r(e)]

    def layer_norm(a, weight, bias):
        centred = a - a.mean(-1, keepdims=True)
        return centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + 1e-6) * weight + bias

    qkv = (layer_norm(x, b[0], b[1]) @ b[2].T + b[3]).reshape(t, 3, e // d, d)
    q, k, v = rotate(qkv, *table).transpose(1, 0, 2, 3)
    segment = {i: slice(a, z) for a, z in zip(bounds[:-1], bounds[1:]) for i in range(a, z)}
    attn = np.asarray([[attend(q[i, j], k[:, j], v[:, j], segment[i]) for j in range(e // d)] for i in range(t)])
    y = x + attn.reshape(t, e) @ b[4].T + b[5]
    hidden = layer_norm(y, b[6], b[7]) @ b[8].T + b[9]
    block = y + (hidden / (1 + np.exp(-1.702 * hidden))) @ b[10].T + b[11]

    try:
        got_qkv = run(kernels.prompt_project, x, cos, sin, *w[:7], eps)
        found = [(got_qkv, rotated),
                 (run(kernels.prompt_attend, x, rotated, rows, *w[7:], eps), layer),
                 (run(kernels.vision_block, x, *table, bounds, np.array([0]), *b), block)]
    except RuntimeError as err:
        return f"the layer operators failed ({(str(err).strip().splitlines() or ['?'])[0]})"
    for got, want in found:
        err = float(np.abs(got - want).max() / np.abs(want).max())
        if not err < 1e-5:
            return f"the layer operators compute wrong results (error {err:.1e})"
    return None


def kernels():
    """The kernels, built, loaded and checked once per process; KernelsUnavailable says why they cannot be."""
    with _lock:
        if "kernels" not in _state:
            try:
                found = Kernels(str(build()))
                check(found)
                _state["kernels"] = found
            except KernelsUnavailable as e:
                _state["kernels"] = e
            except (OSError, TypeError, RuntimeError) as e:  # MindSpore refusing or failing to load the library
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                _state["kernels"] = KernelsUnavailable(f"MindSpore did not run the kernel: {first}")
        found = _state["kernels"]
    if isinstance(found, KernelsUnavailable):
        raise found
    return found


def available():
    """(True, None) when the kernels can be used here, else (False, the reason)."""
    try:
        kernels()
        return True, None
    except KernelsUnavailable as e:
        return False, str(e)
