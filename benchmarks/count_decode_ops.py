"""Count the ops of one compiled decode step (GRAPH_MODE) from MindSpore's IR dumps.

    python benchmarks/count_decode_ops.py CHECKPOINT_DIR

Prints the primitive calls of `DecodeOneToken.construct` as parsed (the validate-stage IR: what pynative
mode launches one by one) and the kernels of the built graph (graph_build IR), by primitive.
"""
import collections
import glob
import os
import re
import shutil
import sys
import tempfile

import mindspore as ms
import numpy as np
from mindspore import Tensor

PRIM = re.compile(r"= (?:PrimFunc|Prim)_([A-Za-z0-9]+)\(")


def count(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return collections.Counter(PRIM.findall(f.read()))


def main(folder):
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.generation import DecodeOneToken

    ms.set_context(mode=ms.GRAPH_MODE)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False)
    model.generate(np.array([[151644, 872, 198] + [100] * 20]), max_new_tokens=2)
    runner = next(iter(model.runners.by_shape.values()))
    args = (Tensor(np.array([5], np.int32)), Tensor(np.array([40], np.int32)), Tensor(np.array([40], np.int32)))
    irdir = tempfile.mkdtemp(prefix="decode_ir_")
    try:
        ms.set_context(save_graphs=1, save_graphs_path=irdir)
        DecodeOneToken(model, runner.cache)(*args).asnumpy()  # a fresh cell: compiled (and dumped) now
        ms.set_context(save_graphs=0)
        files = glob.glob(os.path.join(irdir, "**", "*.ir"), recursive=True)
        validate = max((f for f in files if "_validate_" in os.path.basename(f)), key=os.path.getmtime)
        built = max((f for f in files if os.path.basename(f).startswith("graph_build_")), key=os.path.getmtime)
        layers = model.config.text_config.num_hidden_layers
        for name, path in (("construct (validate IR)", validate), ("compiled kernels (graph_build IR)", built)):
            c = count(path)
            total = sum(c.values())
            print(f"{name}: {total} ops, {total / layers:.0f} per decoder layer ({layers} layers)")
            print("  " + ", ".join(f"{k} {v}" for k, v in c.most_common(12)))
    finally:
        shutil.rmtree(irdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
