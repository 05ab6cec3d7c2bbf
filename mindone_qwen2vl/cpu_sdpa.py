"""The fused attention kernel of the CPU backend ("sdpa"): csrc/sdpa.cc, built for this machine on first use.

MindSpore's CPU backend has no fused attention; eager attention there computes, holds and reads back every
score. csrc/sdpa.cc computes softmax(q k^T) v tile by tile with a running maximum and sum (the scores never
leave the CPU's cache) and runs as a MindSpore "aot" custom operator, in graph mode (dynamic shapes included)
and in pynative mode. It is built with the machine's C++ compiler (`$CXX`, else g++) for the CPU it runs on
(-march=native) into a cache directory: $MINDONE_QWEN2VL_KERNEL_CACHE, else ~/.cache/mindone_qwen2vl/kernels.
The library's name holds a hash of the source, the compiler's flags and the CPU's flags, so a cache shared by
several machines keeps one build per CPU kind. Float32 only; other dtypes go through it as float32.

Nothing is built at import: `kernels()` builds (or finds) the library the first time a model asks for it, and
checks it against numpy before handing it out.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CXX_FLAGS = ["-std=c++17", "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-pthread"]
SOURCE = Path(__file__).resolve().parent / "csrc" / "sdpa.cc"

_lock = threading.Lock()
_state = {}


class SdpaUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


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
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler] + CXX_FLAGS).encode() +
                         _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / f"sdpa-{key}.so"


def build():
    """The path of the built library: found in the cache or compiled into it (atomically, so that processes
    starting together never load half a file)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise SdpaUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    target = library_path(compiler)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise SdpaUnavailable(f"cannot write the kernel cache {target.parent}: {e.strerror or e}") from None
    try:
        done = subprocess.run([compiler, *CXX_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise SdpaUnavailable(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Kernels:
    """The two operators of the library, as MindSpore Custom primitives:
    frame(q [G, Lq, D] or [H, F, Lq, D], k, v [same leading dims, L, D]) -> like q, every key visible;
    causal(q [H, Sq, D], k, v [KVH, S, D], positions [Sq] int32) -> like q, query i sees keys 0..positions[i].
    Query group g reads key group g // (query groups / key groups) (grouped-query attention)."""

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


def check(kernels):
    """Both operators on a small input against numpy (float64): a library that does not load, or computes wrong,
    is found here, once per process, rather than in the middle of a request."""
    import numpy as np
    from mindspore import Tensor

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 1, 5, 16)).astype(np.float32) for _ in range(3))
    scores = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2)
    for causal in (False, True):
        s = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf) if causal else scores
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v
        if causal:
            positions = Tensor(np.arange(5, dtype=np.int32))
            got = kernels.causal(Tensor(q[:, 0]), Tensor(k[:, 0]), Tensor(v[:, 0]), positions)
        else:
            got = kernels.frame(Tensor(q), Tensor(k), Tensor(v))
        err = float(np.abs(got.asnumpy().reshape(want.shape) - want).max())
        if not err < 1e-5:
            raise SdpaUnavailable(f"the kernel built at {kernels.path} computes wrong results (error {err:.1e})")


def kernels():
    """The kernels, built, loaded and checked once per process; SdpaUnavailable says why they cannot be."""
    with _lock:
        if "kernels" not in _state:
            try:
                found = Kernels(str(build()))
                check(found)
                _state["kernels"] = found
            except SdpaUnavailable as e:
                _state["kernels"] = e
            except (OSError, TypeError, RuntimeError) as e:  # MindSpore refusing or failing to load the library
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                _state["kernels"] = SdpaUnavailable(f"MindSpore did not run the kernel: {first}")
        found = _state["kernels"]
    if isinstance(found, SdpaUnavailable):
        raise found
    return found


def available():
    """(True, None) when the kernels can be used here, else (False, the reason)."""
    try:
        kernels()
        return True, None
    except SdpaUnavailable as e:
        return False, str(e)
