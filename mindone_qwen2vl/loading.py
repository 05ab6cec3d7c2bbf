"""from_pretrained: config, checkpoint files, key renaming, streaming tensors into the parameters.

Checkpoint names are mapped to ours by an explicit table of anchored patterns (both HF naming schemes), the
whole set of names and shapes is checked against the model from the file headers before any data is read,
then tensors are read one at a time from memory-mapped files, so peak memory is about one copy of the weights.
"""
import json
import os
import re
from typing import Dict, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor
from tqdm.auto import tqdm

from .config import Qwen2VLConfig

# Newer transformers (>= 4.52) nest the decoder and the tower under `model.`; ours is the original layout.
_RENAMES = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
]
# Buffers some exporters write although they are recomputed, never learned.
_IGNORED = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def canonical_name(name: str) -> str:
    """The model's parameter name for a checkpoint key. Idempotent: canonical names map to themselves."""
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


# ---------------------------------------------------------------------------------------------- safetensors
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # bf16 read as raw bits
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Reads a .safetensors file lazily: the header at open, each tensor from a memory map on demand.

    Own reader rather than safetensors' numpy API, which cannot return bfloat16 (what Qwen2-VL ships in).
    """

    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}
        for key, info in header.items():
            dtype = info.get("dtype")
            begin, end = info["data_offsets"]
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {key} has unsupported dtype {dtype}")
            itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize
            shape = tuple(info["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize or self.data_start + end > size:
                raise ValueError(f"{path}: tensor {key} is truncated or its offsets are corrupt")
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self):
        return self.entries.keys()

    def shape(self, key):
        return self.entries[key][1]

    def dtype(self, key):
        return self.entries[key][0]

    def get(self, key) -> np.ndarray:
        """A fresh array for the tensor; bfloat16 comes back widened to float32 (exact).

        A plain read, not a memory map: mapped pages would stay resident beside the parameters and double
        the peak memory of a load.
        """
        dtype, shape, begin, end = self.entries[key]
        raw_dtype = _ST_DTYPES[dtype]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            arr = np.fromfile(f, dtype=raw_dtype, count=(end - begin) // np.dtype(raw_dtype).itemsize)
        arr = arr.reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def checkpoint_files(folder) -> List[str]:
    """The weight files of a checkpoint folder, from its index when sharded."""
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, f) for f in found]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards"
    )


def resolve_folder(path_or_hub_id) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise ValueError(f"{path_or_hub_id} is a file; from_pretrained takes the checkpoint's folder")
    if path_or_hub_id.count("/") != 1 or path_or_hub_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_hub_id}: no such folder (and not a hub id like 'Qwen/Qwen2-VL-2B-Instruct')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:  # the hub client raises many types; the user needs the id and the reason
        raise OSError(f"could not download {path_or_hub_id} from the Hugging Face Hub: {e}") from None


# ---------------------------------------------------------------------------------------------- loading
def plan_load(params: Dict[str, object], sources: Dict[str, Tuple[object, str]], tied: bool):
    """Check checkpoint names/shapes against the parameters; return {param name: (file, key)} or raise."""
    plan, unexpected, mismatched = {}, [], []
    for name, (reader, key) in sources.items():
        if name not in params:
            if tied and name == "lm_head.weight":
                continue  # tied to the embedding: the checkpoint's copy (if any) is redundant
            unexpected.append(key)
            continue
        want = tuple(params[name].shape)
        got = tuple(reader.shape(key))
        if want != got:
            mismatched.append(f"{key}: checkpoint {list(got)} vs model {list(want)}")
            continue
        plan[name] = (reader, key)
    missing = [n for n in params if n not in sources]
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


def load_weights(model, folder, progress=True):
    """Stream every tensor of the checkpoint in `folder` into `model`'s parameters."""
    params = {p.name: p for p in model.get_parameters()}
    readers = [SafetensorsFile(f) for f in checkpoint_files(folder)]
    sources = {}
    for reader in readers:
        for key in reader.keys():
            if _IGNORED.search(key):
                continue
            name = canonical_name(key)
            if name in sources:
                raise ValueError(f"{key} appears twice in the checkpoint ({sources[name][0].path}, {reader.path})")
            sources[name] = (reader, key)
    plan = plan_load(params, sources, model.config.tie_word_embeddings)
    # File by file, in file order: one shard's pages are touched at a time.
    order = sorted(plan.items(), key=lambda kv: (readers.index(kv[1][0]), kv[1][0].entries[kv[1][1]][2]))
    for name, (reader, key) in tqdm(order, desc="Loading weights", unit="tensor", disable=not progress):
        param = params[name]
        param.set_data(to_tensor(reader.get(key), param.dtype))
    return model


_NP_OF_MS = {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64}


def to_tensor(arr, dtype):
    """numpy -> Tensor of `dtype` without a second full copy where numpy can cast (fp32/fp16)."""
    if dtype in _NP_OF_MS:
        arr = np.ascontiguousarray(arr, dtype=_NP_OF_MS[dtype])
        return Tensor.from_numpy(arr)  # shares arr's memory: the array becomes the parameter's storage
    return Tensor(arr, dtype=dtype)  # bfloat16: numpy has no such dtype, MindSpore casts


def load_pretrained(cls, path_or_hub_id, mindspore_dtype=ms.float32, attn_implementation="eager", progress=True):
    folder = resolve_folder(str(path_or_hub_id))
    config = Qwen2VLConfig.from_pretrained(folder)
    model = cls(config, dtype=mindspore_dtype, attn_implementation=attn_implementation)
    load_weights(model, folder, progress=progress)
    model.set_train(False)
    model.name_or_path = folder
    return model
