"""One rank of the tensor-parallel test job (tests/test_parallel.py starts it with msrun, 2 workers).

usage: msrun --worker_num=2 --local_worker_num=2 ... tests/tp_worker.py OUT_DIR INPUTS.npz TAG[:MODES]=FOLDER ...

For each checkpoint folder it loads the single-process model and the tensor-parallel one in this process,
runs both on the inputs (pynative, then the parallel one in graph mode) and writes what the test checks to
OUT_DIR/rank<r>.npz: logits, the bytes of decoder parameters, local shapes. MODES (e.g. "pynative,graph")
also compares greedy generation of the parallel model in those modes with the single process's (pynative);
generation errors are recorded rather than raised, so the logits checks stand on their own.
"""
# mindspore first: importing decord before it aborts the process.
import mindspore as ms
import os
import sys
import traceback

import numpy as np

from mindone_qwen2vl.models import model_class, model_type_of
from mindone_qwen2vl.parallel import init_tensor_parallel, is_main_rank

NEW_TOKENS = 5
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


def decoder_bytes(model):
    return sum(p.nbytes for p in model.get_parameters() if p.name.startswith(("model.", "lm_head.")))


def as_numpy(x):
    return x.asnumpy() if isinstance(x, ms.Tensor) else np.asarray(x)


def main(out_dir, inputs_path, *checkpoints):
    rank, size = init_tensor_parallel(2)
    out = {"rank": rank, "size": size, "main": is_main_rank()}
    try:
        init_tensor_parallel(4)
    except ValueError as e:
        out["wrong_size_error"] = str(e)
    inputs = dict(np.load(inputs_path))
    for spec in checkpoints:
        name, folder = spec.split("=", 1)
        tag, _, modes = name.partition(":")
        ms.set_context(mode=ms.PYNATIVE_MODE)
        cls = model_class(model_type_of(folder))  # Qwen2-VL or Qwen2.5-VL
        single = cls.from_pretrained(folder, progress=False)
        tp = cls.from_pretrained(folder, progress=False, tensor_parallel_size=2)
        attn = tp.model.layers[0].self_attn
        out[f"{tag}/heads"] = np.array([attn.num_heads, attn.num_kv_heads])
        out[f"{tag}/tensor_parallel"] = np.array(tp.tensor_parallel)
        d = tp.config.text_config.head_dim
        out[f"{tag}/k_proj_rows"] = np.asarray(attn.k_proj.weight.asnumpy()[:, 0])
        out[f"{tag}/decoder_bytes"] = np.array([decoder_bytes(tp), decoder_bytes(single)])
        out[f"{tag}/single"] = single(**inputs).logits.asnumpy()
        out[f"{tag}/tp_pynative"] = tp(**inputs).logits.asnumpy()
        ms.set_context(mode=ms.GRAPH_MODE)
        out[f"{tag}/tp_graph"] = tp(**inputs).logits.asnumpy()
        if modes and hasattr(tp, "generate"):
            kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
            try:
                ms.set_context(mode=ms.PYNATIVE_MODE)
                out[f"{tag}/tokens_single"] = as_numpy(single.generate(**inputs, **kw))
                for mode in modes.split(","):
                    ms.set_context(mode=MODES[mode])
                    out[f"{tag}/tokens_tp_{mode}"] = as_numpy(tp.generate(**inputs, **kw))
                # No seed set: each process's MindSpore RNG differs, the ranks must still sample alike.
                kw["do_sample"] = True
                out[f"{tag}/tokens_tp_sampled"] = as_numpy(tp.generate(**inputs, **kw))
            except Exception:  # recorded for the test to show; the logits checks still get their data
                out[f"{tag}/generate_error"] = traceback.format_exc()
        del single, tp
    ms.set_context(mode=ms.PYNATIVE_MODE)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    if is_main_rank():
        print("tensor-parallel worker done:", ", ".join(sorted(k for k in out if "/" in k)))


if __name__ == "__main__":
    main(*sys.argv[1:])
