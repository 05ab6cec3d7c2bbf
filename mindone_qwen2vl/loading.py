"""from_pretrained: config, checkpoint files, key renaming, streaming tensors into the parameters.

Checkpoint names are mapped to ours by an explicit table of anchored patterns (both HF naming schemes), the
whole set of names and shapes is checked against the model from the file headers before any data is read,
then tensors (or a tensor-parallel rank's slices of them) are read one at a time, so peak memory is about one
copy of the weights. A folder holds HF safetensors, or the MindSpore safetensors / .ckpt shards
scripts/convert_weights.py writes; the formats themselves are weight_files.py's.
"""
import json
import os
import re
from typing import Dict, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor
from tqdm.auto import tqdm

from .weight_files import find_weights, open_weights

# Newer transformers (>= 4.52) nest the decoder and the tower under `model.`; ours is the original layout.
_RENAMES = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
]
# Buffers some exporters write although they are recomputed, never learned.
_IGNORED = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")


def canonical_name(name: str) -> str:
    """The model's parameter name for a checkpoint key. Idempotent: canonical names map to themselves."""
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def checkpoint_files(folder) -> List[str]:
    """The weight files of a checkpoint folder, from its index when sharded: safetensors first, then MindSpore
    .ckpt (as scripts/convert_weights.py writes them)."""
    return find_weights(folder, ("safetensors", "ckpt"))[0]


def resolve_folder(path_or_hub_id) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise ValueError(f"{path_or_hub_id} is a file; from_pretrained takes the checkpoint's folder")
    if path_or_hub_id.count("/") != 1 or path_or_hub_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_hub_id}: no such folder (and not a hub id like 'Qwen/Qwen2-VL-2B-Instruct')")
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "*.safetensors", "*.ckpt", "*.txt", "*.jinja"]  # weights, configs, tokenizer
        return snapshot_download(path_or_hub_id, allow_patterns=patterns)
    except Exception as e:  # the hub client raises many types; the user needs the id and the reason
        raise OSError(f"could not download {path_or_hub_id} from the Hugging Face Hub: {e}") from None


# ---------------------------------------------------------------------------------------------- loading
def collect_sources(readers) -> Dict[str, Tuple[object, str]]:
    """{parameter name: (reader, checkpoint key)} over all files; recomputed buffers are skipped."""
    sources = {}
    for reader in readers:
        for key in reader.keys():
            if _IGNORED.search(key):
                continue
            name = canonical_name(key)
            if name in sources:
                raise ValueError(f"{key} appears twice in the checkpoint ({sources[name][0].path}, {reader.path})")
            sources[name] = (reader, key)
    return sources


def parameter_pieces(model) -> Dict[str, tuple]:
    """{parameter name: (axis, start, stop, whole shape)}: what each parameter holds of the checkpoint tensor of
    its own name. The whole tensor (axis None) unless a tensor-parallel layer (parallel.py) holds a slice
    [start, stop) along `axis`; such cells say so through `checkpoint_pieces()`, and only those bytes are read.
    """
    pieces = {p.name: (None, None, None, tuple(p.shape)) for p in model.get_parameters()}
    for _, cell in model.cells_and_names():
        get = getattr(cell, "checkpoint_pieces", None)
        if callable(get):
            pieces.update(get())
    return pieces


def expected_tensors(pieces) -> Dict[str, tuple]:
    """{checkpoint name: whole shape} of every tensor the pieces read."""
    return {name: tuple(piece[3]) for name, piece in pieces.items()}


def plan_load(expected: Dict[str, tuple], sources: Dict[str, Tuple[object, str]], tied: bool):
    """Check checkpoint names/shapes against `expected` {checkpoint name: shape}; return {name: (file, key)}
    or raise one error listing every missing, unexpected and mis-shaped tensor."""
    plan, unexpected, mismatched = {}, [], []
    for name, (reader, key) in sources.items():
        if name not in expected:
            if tied and name == "lm_head.weight":
                continue  # tied to the embedding: the checkpoint's copy (if any) is redundant
            unexpected.append(key)
            continue
        want, got = tuple(expected[name]), tuple(reader.shape(key))
        if want != got:
            mismatched.append(f"{key}: checkpoint {list(got)} vs model {list(want)}")
            continue
        plan[name] = (reader, key)
    missing = [n for n in expected if n not in sources]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {'; '.join(mismatched[:20])}")
    if problems:
        raise ValueError("checkpoint does not fit the model config: " + " | ".join(problems))
    return plan


def _read_piece(plan, name, piece):
    axis, start, stop, _ = piece
    reader, key = plan[name]
    return reader.get(key) if axis is None else reader.get_slice(key, axis, start, stop)


def load_weights(model, folder, progress=True):
    """Stream every tensor of the checkpoint in `folder` into `model`'s parameters, one parameter at a time.

    A load holds the parameters plus the tensor being read.
    """
    params = {p.name: p for p in model.get_parameters()}
    pieces = parameter_pieces(model)
    readers = [open_weights(f) for f in checkpoint_files(folder)]
    plan = plan_load(expected_tensors(pieces), collect_sources(readers), model.config.tie_word_embeddings)

    def position(name):  # file by file, in data order: one shard's pages are touched at a time
        reader, key = plan[name]
        return readers.index(reader), reader.entries[key][2]

    for name in tqdm(sorted(params, key=position), desc="Loading weights", unit="tensor", disable=not progress):
        param = params[name]
        param.set_data(to_tensor(_read_piece(plan, name, pieces[name]), param.dtype))
    return model


_NP_OF_MS = {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64}


def to_tensor(arr, dtype):
    """numpy -> Tensor of `dtype` without a second full copy where numpy can cast (fp32/fp16)."""
    if dtype in _NP_OF_MS:
        arr = np.ascontiguousarray(arr, dtype=_NP_OF_MS[dtype])
        return Tensor.from_numpy(arr)  # shares arr's memory: the array becomes the parameter's storage
    return Tensor(arr, dtype=dtype)  # bfloat16: numpy has no such dtype, MindSpore casts


def load_pretrained(cls, path_or_hub_id, policy=None, progress=True, tensor_parallel_size=None):
    """tensor_parallel_size N > 1: this process is one of the N ranks of an msrun job; it holds and reads
    its 1/N of the decoder (parallel.py)."""
    from .parallel import check_tensor_parallel, init_tensor_parallel, shard_model

    folder = resolve_folder(str(path_or_hub_id))
    config = cls.config_class.from_pretrained(folder)
    if tensor_parallel_size is not None:
        check_tensor_parallel(config.text_config, tensor_parallel_size)  # before joining the job
    model = cls(config, policy)  # placeholders allocate nothing until loaded: sharding first is cheap
    if tensor_parallel_size not in (None, 1):
        shard_model(model, *init_tensor_parallel(tensor_parallel_size))
    load_weights(model, folder, progress=progress)
    model.set_train(False)
    model.name_or_path = folder
    model.generation_config = read_generation_config(folder)
    return model


def read_generation_config(folder) -> dict:
    """The folder's generation_config.json ({} when there is none), read once when the model loads."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable generation config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
