"""from_pretrained: config, checkpoint files, key renaming, streaming tensors into the parameters.

Checkpoint names are mapped to ours by an explicit table of anchored patterns (both HF naming schemes), the
whole set of names and shapes is checked against the model from the file headers before any data is read,
then tensors are read one at a time from memory-mapped files, so peak memory is about one copy of the weights.
A folder holds HF safetensors, or the MindSpore .ckpt / safetensors shards scripts/convert_weights.py writes.
"""
import abc
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
# MindSpore checkpoints written by scripts/convert_weights.py: .ckpt shards with an index of the same layout.
CKPT_INDEX = "model.ckpt.index.json"
CKPT_SINGLE = "model.ckpt"


def canonical_name(name: str) -> str:
    """The model's parameter name for a checkpoint key. Idempotent: canonical names map to themselves."""
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


# ---------------------------------------------------------------------------------------------- slices
def read_slice(read_into, dtype, shape, axis, start, stop) -> np.ndarray:
    """Indices [start, stop) along `axis` of a row-major tensor, reading only their bytes.

    The slice is, for each index of the axes before `axis`, one contiguous run of bytes: one read for a
    slice of rows, one read per row for a slice of columns. read_into(offset, view) fills `view` with the
    tensor's bytes from `offset`. bfloat16 comes back widened to float32 (exact).
    """
    if not 0 <= axis < len(shape) or not 0 <= start < stop <= shape[axis]:
        raise ValueError(f"slice [{start}:{stop}] of axis {axis} is outside a tensor of shape {list(shape)}")
    raw = np.dtype(_ST_DTYPES[dtype])
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) * raw.itemsize
    run = (stop - start) * inner
    out = np.empty(outer * run, np.uint8)
    view = memoryview(out)
    for i in range(outer):
        read_into((i * shape[axis] + start) * inner, view[i * run:(i + 1) * run])
    arr = out.view(raw).reshape(shape[:axis] + (stop - start,) + tuple(shape[axis + 1:]))
    return widen_bf16(arr) if dtype == "BF16" else arr


def _read_exactly(f, view, what):
    if f.readinto(view) != len(view):
        raise ValueError(f"{what} is truncated")


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly, through one float32-sized buffer."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


# ---------------------------------------------------------------------------------------------- safetensors
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # bf16 read as raw bits
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorFile(abc.ABC):
    """What every checkpoint reader offers: `entries` {key: (dtype name, shape, ...)} known at open,
    `raw(key)` (the tensor as stored, bfloat16 as its uint16 bit patterns) and `get(key)` on top of it.

    Reads are plain reads into fresh arrays, never memory maps: mapped pages would stay resident beside the
    parameters and double the peak memory of a load.
    """

    entries: dict

    def keys(self):
        return self.entries.keys()

    def shape(self, key):
        return self.entries[key][1]

    def dtype(self, key):
        return self.entries[key][0]

    @abc.abstractmethod
    def raw(self, key) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16 bit patterns), in a fresh array."""

    def get(self, key) -> np.ndarray:
        """The tensor; bfloat16 widened to float32 (exact)."""
        arr = self.raw(key)
        return widen_bf16(arr) if self.dtype(key) == "BF16" else arr


class SafetensorsFile(TensorFile):
    """Reads a .safetensors file lazily: the header at open, each tensor on demand.

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

    def raw(self, key) -> np.ndarray:
        """The tensor as stored, bfloat16 as its 16-bit patterns (uint16): what a converter copies and checks."""
        dtype, shape, begin, end = self.entries[key]
        raw_dtype = _ST_DTYPES[dtype]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            arr = np.fromfile(f, dtype=raw_dtype, count=(end - begin) // np.dtype(raw_dtype).itemsize)
        return arr.reshape(shape)

    def get_slice(self, key, axis, start, stop) -> np.ndarray:
        """Indices [start, stop) along `axis` of a tensor (a tensor-parallel shard), reading only those bytes."""
        dtype, shape, begin, _ = self.entries[key]
        # Unbuffered: a buffered reader would read ahead past each row of a column slice.
        with open(self.path, "rb", buffering=0) as f:
            def read_into(offset, view):
                f.seek(self.data_start + begin + offset)
                _read_exactly(f, view, f"{self.path}: tensor {key}")

            return read_slice(read_into, dtype, shape, axis, start, stop)


# ---------------------------------------------------------------------------------------------- MindSpore .ckpt
_CKPT_DTYPES = {"Float64": "F64", "Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Int64": "I64",
                "Int32": "I32", "Int16": "I16", "Int8": "I8", "UInt8": "U8", "Bool": "BOOL"}
_CKPT_CRC = b"crc_num"  # save_checkpoint(crc_check=True) appends b"crc_num" and a 10-byte CRC


class _Wire:
    """Just enough of the protobuf wire format to walk a file's fields by offset, skipping payloads unread."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def varint(self, pos, end):
        self.f.seek(pos)
        value = 0
        for i, b in enumerate(self.f.read(max(0, min(10, end - pos)))):
            value |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                return value, pos + i + 1
        raise ValueError(f"{self.path}: truncated or corrupt at byte {pos}")

    def fields(self, start, end):
        """Yield (field number, wire type, varint value or (begin, end) of a length-delimited payload)."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self.varint(pos, end)
            elif wire == 2:
                n, pos = self.varint(pos, end)
                value, pos = (pos, pos + n), pos + n
            elif wire in (1, 5):
                value, pos = None, pos + (8 if wire == 1 else 4)
            else:
                raise ValueError(f"{self.path}: corrupt (wire type {wire} at byte {pos})")
            if pos > end:
                raise ValueError(f"{self.path}: truncated (a record runs past the end of the file)")
            yield number, wire, value

    def read(self, span):
        self.f.seek(span[0])
        return self.f.read(span[1] - span[0])


class MindSporeCkptFile(TensorFile):
    """Reads a MindSpore .ckpt like SafetensorsFile: names, dtypes and shapes at open, each tensor on demand.

    A .ckpt is a protobuf `Checkpoint`: repeated `Value {tag, TensorProto {dims, tensor_type,
    tensor_content}}`, a tensor over 512 MB split into consecutive Values with the same tag.
    `ms.load_checkpoint` reads and parses the whole file, then copies every tensor; walking the wire format
    finds each tensor's bytes without reading them, so names and shapes are checked before any data is
    read and a load holds one copy of the weights, as with safetensors.
    """

    def __init__(self, path):
        self.path = path
        self.entries = {}  # key -> (dtype, shape, offset of its first byte, offset past its last byte)
        self.pieces = {}  # key -> [(begin, end), ...]: byte ranges of its content, in order
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                end = size
                if size >= 17:
                    f.seek(size - 17)
                    if f.read(len(_CKPT_CRC)) == _CKPT_CRC:
                        end = size - 17
                wire = _Wire(f, path)
                last = None
                for number, kind, span in wire.fields(0, end):
                    if number != 1 or kind != 2:
                        raise ValueError(f"{path}: not a MindSpore checkpoint (field {number} at top level)")
                    key, dtype, shape, content = self._value(wire, span)
                    if key == last:
                        if (dtype, shape) != self.entries[key][:2]:
                            raise ValueError(f"{path}: the pieces of tensor {key} disagree on dtype or shape")
                        self.pieces[key].append(content)
                    elif key in self.entries:
                        raise ValueError(f"{path}: tensor {key} appears twice")
                    else:
                        self.entries[key] = (dtype, shape)
                        self.pieces[key] = [content]
                    last = key
        except OSError as e:
            raise ValueError(f"{path}: not a readable MindSpore checkpoint ({e})") from None
        if not self.entries:
            raise ValueError(f"{path}: holds no tensors (empty, or not a MindSpore checkpoint)")
        for key, (dtype, shape) in self.entries.items():
            pieces = self.pieces[key]
            nbytes = sum(e - b for b, e in pieces)
            if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize:
                raise ValueError(f"{path}: tensor {key} is truncated or corrupt ({nbytes} bytes for "
                                 f"{dtype} {list(shape)})")
            self.entries[key] = (dtype, shape, pieces[0][0], pieces[-1][1])

    def _value(self, wire, span):
        key = tensor = None
        for number, kind, value in wire.fields(*span):
            if number == 1 and kind == 2:
                key = wire.read(value).decode("utf-8", "replace")
            elif number == 2 and kind == 2:
                tensor = value
            elif number == 3:
                raise ValueError(f"{self.path}: {key or 'an entry'} is a MapParameter, which Qwen2-VL does not use")
        if key is None or tensor is None:
            raise ValueError(f"{self.path}: corrupt (an entry without a name or a tensor)")
        dims, type_name, content = [], None, None
        for number, kind, value in wire.fields(*tensor):
            if number == 1 and kind == 0:
                dims.append(value)
            elif number == 1 and kind == 2:  # packed encoding of the same repeated field
                pos = value[0]
                while pos < value[1]:
                    d, pos = wire.varint(pos, value[1])
                    dims.append(d)
            elif number == 2 and kind == 2:
                type_name = wire.read(value).decode("utf-8", "replace")
            elif number == 3 and kind == 2:
                content = value
        if type_name is None or content is None:
            raise ValueError(f"{self.path}: tensor {key} is corrupt (no dtype or no data)")
        if type_name not in _CKPT_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {type_name}")
        shape = () if dims == [0] else tuple(dims)  # MindSpore writes a scalar's shape as [0]
        return key, _CKPT_DTYPES[type_name], shape, content

    def raw(self, key) -> np.ndarray:
        """The tensor as stored, bfloat16 as its 16-bit patterns (uint16)."""
        dtype, shape = self.entries[key][:2]
        pieces = self.pieces[key]
        out = np.empty(sum(e - b for b, e in pieces), np.uint8)
        view, at = memoryview(out), 0
        with open(self.path, "rb") as f:
            for begin, end in pieces:
                f.seek(begin)
                if f.readinto(view[at:at + end - begin]) != end - begin:
                    raise ValueError(f"{self.path}: tensor {key} is truncated")
                at += end - begin
        return out.view(_ST_DTYPES[dtype]).reshape(shape)

    def get_slice(self, key, axis, start, stop) -> np.ndarray:
        """Indices [start, stop) along `axis`, reading only those bytes (which may span the tensor's pieces)."""
        dtype, shape = self.entries[key][:2]
        pieces, logical = self.pieces[key], 0
        spans = []  # (offset of the piece in the tensor's bytes, begin, end in the file)
        for begin, end in pieces:
            spans.append((logical, begin, end))
            logical += end - begin
        with open(self.path, "rb", buffering=0) as f:
            def read_into(offset, view):
                at = 0
                for first, begin, end in spans:
                    if at == len(view):
                        break
                    lo = offset + at
                    if not first <= lo < first + end - begin:
                        continue
                    n = min(len(view) - at, first + end - begin - lo)
                    f.seek(begin + lo - first)
                    _read_exactly(f, view[at:at + n], f"{self.path}: tensor {key}")
                    at += n

            return read_slice(read_into, dtype, shape, axis, start, stop)


def open_weights(path):
    """The reader for a weight file: safetensors (HF's or MindSpore's) or a MindSpore .ckpt."""
    if path.endswith(".ckpt"):
        return MindSporeCkptFile(path)
    return SafetensorsFile(path)


def _indexed_files(folder, index):
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not a valid checkpoint index ({e})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
    return [os.path.join(folder, f) for f in files]


def checkpoint_files(folder) -> List[str]:
    """The weight files of a checkpoint folder, from its index when sharded: safetensors first, then MindSpore
    .ckpt (as scripts/convert_weights.py writes them)."""
    for index, single, ext in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ".safetensors"),
                               (CKPT_INDEX, CKPT_SINGLE, ".ckpt")):
        if os.path.exists(os.path.join(folder, index)):
            return _indexed_files(folder, os.path.join(folder, index))
        if os.path.exists(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        found = sorted(f for f in os.listdir(folder) if f.endswith(ext))
        if found:
            return [os.path.join(folder, f) for f in found]
    hint = ""
    if any(f.endswith(".bin") for f in os.listdir(folder)):
        hint = "; its torch .bin weights need converting first (scripts/convert_weights.py)"
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards "
        f"(or MindSpore {CKPT_SINGLE} / {CKPT_INDEX}){hint}"
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


def parameter_pieces(model) -> Dict[str, List[tuple]]:
    """{parameter name: [(checkpoint name, axis, start, stop, whole shape), ...]}: what each parameter is made of.

    A plain parameter is one whole checkpoint tensor of its own name (axis None). A packed projection
    (layers.PackedLinear: q/k/v, gate/up) stacks the rows of several checkpoint tensors, and a tensor-parallel
    layer (parallel.py) holds a slice: those cells say so through `checkpoint_pieces()`, and only the listed
    bytes are read.
    """
    pieces = {p.name: [(p.name, None, None, None, tuple(p.shape))] for p in model.get_parameters()}
    for _, cell in model.cells_and_names():
        get = getattr(cell, "checkpoint_pieces", None)
        if callable(get):
            pieces.update(get())
    return pieces


def expected_tensors(pieces) -> Dict[str, tuple]:
    """{checkpoint name: whole shape} of every tensor the pieces read."""
    return {name: tuple(shape) for parts in pieces.values() for name, _, _, _, shape in parts}


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


def _read_piece(plan, piece):
    name, axis, start, stop, _ = piece
    reader, key = plan[name]
    return reader.get(key) if axis is None else reader.get_slice(key, axis, start, stop)


def load_weights(model, folder, progress=True):
    """Stream every tensor of the checkpoint in `folder` into `model`'s parameters, one parameter at a time.

    A packed parameter is filled piece by piece in place, so a load holds the parameters plus one piece.
    """
    params = {p.name: p for p in model.get_parameters()}
    pieces = parameter_pieces(model)
    readers = [open_weights(f) for f in checkpoint_files(folder)]
    plan = plan_load(expected_tensors(pieces), collect_sources(readers), model.config.tie_word_embeddings)

    def position(name):  # file by file, in data order: one shard's pages are touched at a time
        reader, key = plan[pieces[name][0][0]]
        return readers.index(reader), reader.entries[key][2]

    for name in tqdm(sorted(params, key=position), desc="Loading weights", unit="tensor", disable=not progress):
        param, parts = params[name], pieces[name]
        if len(parts) == 1:
            arr = _read_piece(plan, parts[0])
        else:
            first = _read_piece(plan, parts[0])
            arr = np.empty(tuple(param.shape), first.dtype)
            at = 0
            for i, part in enumerate(parts):
                block = first if i == 0 else _read_piece(plan, part)
                arr[at:at + block.shape[0]] = block
                at += block.shape[0]
                del block
            del first
        param.set_data(to_tensor(arr, param.dtype))
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
    config = Qwen2VLConfig.from_pretrained(folder)
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
