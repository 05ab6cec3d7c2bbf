"""Count the ops of one compiled decode step (GRAPH_MODE) from MindSpore's IR dumps.

    python benchmarks/count_decode_ops.py CHECKPOINT_DIR            # the CPU configuration, compiled and run
    python benchmarks/count_decode_ops.py CHECKPOINT_DIR --ascend   # the Ascend configuration, front end only

CPU: the primitive calls of `DecodeOneToken.construct` as parsed (the validate-stage IR: what pynative mode
launches one by one) and the kernels of the built graph (graph_build IR), by primitive.
--ascend: the same decode step built with the Ascend precision policy (bf16, flash attention, the fused kernels of
kernels.py). This CPU cannot build Ascend kernels, so only the validate-stage IR exists: the primitives the
Ascend backend receives, before its own fusion passes (which can only lower the count). Weights are not needed
for counting: the model is built from config.json alone.
"""
import collections
import glob
import os
import shutil
import sys
import tempfile

import mindspore as ms
import numpy as np
from mindspore import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from check_ascend_ops import NOT_OPS, ascend_policies, ir_calls, validate_ir  # noqa: E402


def count(calls):
    return collections.Counter(prim for prim, _ in calls if prim not in NOT_OPS)


def report(name, counter, layers):
    total = sum(counter.values())
    print(f"{name}: {total} ops, {total / layers:.1f} per decoder layer ({layers} layers)")
    print("  " + ", ".join(f"{k} {v}" for k, v in counter.most_common(14)))


def decode_args():
    return tuple(Tensor(np.array([5], np.int32)) for _ in range(3))  # token, cache position, rope position


def cpu(folder):
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.generation import DecodeOneToken

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False)
    model.generate(np.array([[151644, 872, 198] + [100] * 20]), max_new_tokens=2)
    runner = next(iter(model.runners.by_shape.values()))
    irdir = tempfile.mkdtemp(prefix="decode_ir_")
    try:
        validate = validate_ir(DecodeOneToken(model, runner.cache), decode_args(), irdir)  # a fresh cell: compiled now
        built = max((f for f in glob.glob(os.path.join(irdir, "**", "*.ir"), recursive=True)
                     if os.path.basename(f).startswith("graph_build_")), key=os.path.getmtime)
        layers = model.config.text_config.num_hidden_layers
        report("CPU, construct (validate IR)", count(validate), layers)
        report("CPU, compiled kernels (graph_build IR)", count(ir_calls(built)), layers)
    finally:
        shutil.rmtree(irdir, ignore_errors=True)


def ascend(folder):
    from mindone_qwen2vl.cache import StaticCache
    from mindone_qwen2vl.generation import DecodeOneToken
    from mindone_qwen2vl.models import classes_of

    cls = classes_of(folder)[0]
    config = cls.config_class.from_pretrained(folder)
    layers = config.text_config.num_hidden_layers
    for name, policy in ascend_policies().items():
        model = cls(config, policy)
        cache = StaticCache(config.text_config, 1, 64, policy.cache_dtype, input_dtype=policy.compute_dtype)
        irdir = tempfile.mkdtemp(prefix="decode_ir_")
        try:
            report(f"Ascend bf16 + {name} attention, construct (validate IR)",
                   count(validate_ir(DecodeOneToken(model, cache), decode_args(), irdir)), layers)
        finally:
            shutil.rmtree(irdir, ignore_errors=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--ascend"]
    if len(args) != 1:
        sys.exit(__doc__)
    ms.set_context(mode=ms.GRAPH_MODE)
    (ascend if "--ascend" in sys.argv else cpu)(args[0])
