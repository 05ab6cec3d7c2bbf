"""Weight files: the checkpoint formats, their dtypes and index files, read tensor by tensor and written shard by shard.

Formats: safetensors (HF's, and MindSpore's: the same format, metadata {"format": "ms"}), MindSpore .ckpt, and
torch .bin (read only, for converting). A folder holds one file (`model.safetensors`) or shards named in an
index (`model.safetensors.index.json`, the same layout for all three). Every reader (`TensorFile`) knows each
tensor's name, dtype and shape when opened and reads one tensor, or one slice of one, on demand: callers
check a whole checkpoint before reading any data and hold one tensor at a time. Dtypes are named by
safetensors' codes ("F32", "BF16", ...) everywhere; bfloat16 is held as its 16-bit patterns (numpy has no
bfloat16) and widened to float32, exactly, by `get`.
"""
import abc
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np


# ---------------------------------------------------------------------------------------------- dtypes
class Dtype(NamedTuple):
    numpy: type  # how it is held: bfloat16 as uint16 bit patterns
    ckpt: str  # MindSpore's TensorProto.tensor_type
    torch: str  # torch's name, also config.json's torch_dtype


DTYPES = {
    "F64": Dtype(np.float64, "Float64", "float64"),
    "F32": Dtype(np.float32, "Float32", "float32"),
    "F16": Dtype(np.float16, "Float16", "float16"),
    "BF16": Dtype(np.uint16, "BFloat16", "bfloat16"),
    "I64": Dtype(np.int64, "Int64", "int64"),
    "I32": Dtype(np.int32, "Int32", "int32"),
    "I16": Dtype(np.int16, "Int16", "int16"),
    "I8": Dtype(np.int8, "Int8", "int8"),
    "U8": Dtype(np.uint8, "UInt8", "uint8"),
    "BOOL": Dtype(np.bool_, "Bool", "bool"),
}
FLOATS = ("F64", "F32", "F16", "BF16")
_OF_CKPT = {d.ckpt: code for code, d in DTYPES.items()}
_OF_TORCH = {d.torch: code for code, d in DTYPES.items()}


def nbytes(code, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[code].numpy).itemsize


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly, through one float32-sized buffer."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


# ---------------------------------------------------------------------------------------------- folders, indexes
class Layout(NamedTuple):
    index: str
    single: str
    ending: Optional[str]  # any file with this ending is a weight file when there is neither index nor single


LAYOUTS = {
    "safetensors": Layout("model.safetensors.index.json", "model.safetensors", ".safetensors"),
    "ckpt": Layout("model.ckpt.index.json", "model.ckpt", ".ckpt"),
    # No search by ending: HF Trainer folders hold a training_args.bin that holds no weights.
    "bin": Layout("pytorch_model.bin.index.json", "pytorch_model.bin", None),
}


def read_index(path) -> Dict[str, str]:
    """{tensor name: file name} of a `*.index.json`."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid checkpoint index ({e})") from None
    if not weight_map:
        raise ValueError(f"{path}: the index lists no tensors")
    return weight_map


def find_weights(folder, formats) -> Tuple[List[str], Optional[str]]:
    """(weight files, index file or None) of `folder` in the first of `formats` it holds; shards come from
    the index, which must name files of the folder."""
    for fmt in formats:
        layout = LAYOUTS[fmt]
        index = os.path.join(folder, layout.index)
        if os.path.exists(index):
            names = sorted(set(read_index(index).values()))
            for name in names:
                if os.path.basename(name) != name or not os.path.isfile(os.path.join(folder, name)):
                    raise FileNotFoundError(f"{index} names {name}, which is not a file in {folder}")
            return [os.path.join(folder, name) for name in names], index
        if os.path.isfile(os.path.join(folder, layout.single)):
            return [os.path.join(folder, layout.single)], None
        found = sorted(f for f in os.listdir(folder) if layout.ending and f.endswith(layout.ending))
        if found:
            return [os.path.join(folder, f) for f in found], None
    hint = ""
    if "bin" not in formats and any(f.endswith(".bin") for f in os.listdir(folder)):
        hint = "; its torch .bin weights need converting first (scripts/convert_weights.py)"
    expected = " or ".join(f"{LAYOUTS[f].single} / {LAYOUTS[f].index} with its shards" for f in formats)
    raise FileNotFoundError(f"no weights in {folder}: expected {expected}{hint}")


def open_checkpoint(folder, formats) -> Tuple[list, bool]:
    """Readers of the weight files of `folder` in the first of `formats` it holds, and whether it is sharded.
    An index must agree with its files both ways: each tensor is in the file it names, and only there."""
    files, index = find_weights(folder, formats)
    readers = [open_weights(path) for path in files]
    if index:
        _check_index(index, readers)
    return readers, index is not None


def _check_index(index, readers):
    weight_map = read_index(index)
    for reader in readers:
        name = os.path.basename(reader.path)
        listed = {k for k, v in weight_map.items() if v == name}
        absent = sorted(listed - set(reader.keys()))
        if absent:
            raise ValueError(f"{index} lists {absent[0]} in {name}, but {reader.path} has no such tensor"
                             + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        unlisted = sorted(set(reader.keys()) - listed)
        if unlisted:
            raise ValueError(f"{reader.path} holds {unlisted[0]}, which {index} does not list there"
                             + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))


def shard_names(fmt, n, sharded) -> List[str]:
    if not sharded:
        return [LAYOUTS[fmt].single]
    return [f"model-{i + 1:05d}-of-{n:05d}.{fmt}" for i in range(n)]


def write_index(folder, fmt, weight_map, total_size):
    index = {"metadata": {"total_size": total_size, "format": fmt}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, LAYOUTS[fmt].index), "w") as f:
        json.dump(index, f, indent=2)


# ---------------------------------------------------------------------------------------------- reading
def open_weights(path):
    """The reader for a weight file: safetensors, MindSpore .ckpt or torch .bin, by its ending."""
    if path.endswith(".ckpt"):
        return MindSporeCkptFile(path)
    if path.endswith(".bin"):
        return TorchBinFile(path)
    return SafetensorsFile(path)


class TensorFile(abc.ABC):
    """What every reader offers: `entries` {key: (dtype code, shape, position in the file, ...)} known at open,
    `raw(key)` (the tensor as stored, bfloat16 as its uint16 bit patterns) and `get(key)` on top of it.

    Reads are plain reads into fresh arrays, never memory maps: mapped pages would stay resident beside the
    parameters and double the peak memory of a load.
    """

    path: str
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

    def close(self):
        """Release what the reader holds between reads (nothing, unless it maps the file)."""


def read_slice(read_into, dtype, shape, axis, start, stop) -> np.ndarray:
    """Indices [start, stop) along `axis` of a row-major tensor, reading only their bytes.

    The slice is, for each index of the axes before `axis`, one contiguous run of bytes: one read for a
    slice of rows, one read per row for a slice of columns. read_into(offset, view) fills `view` with the
    tensor's bytes from `offset`. bfloat16 comes back widened to float32 (exact).
    """
    if not 0 <= axis < len(shape) or not 0 <= start < stop <= shape[axis]:
        raise ValueError(f"slice [{start}:{stop}] of axis {axis} is outside a tensor of shape {list(shape)}")
    raw = np.dtype(DTYPES[dtype].numpy)
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
        self.entries = {}  # key -> (dtype, shape, offset of its first byte, offset past its last byte)
        for key, info in header.items():
            dtype = info.get("dtype")
            begin, end = info["data_offsets"]
            if dtype not in DTYPES:
                raise ValueError(f"{path}: tensor {key} has unsupported dtype {dtype}")
            shape = tuple(info["shape"])
            if end - begin != nbytes(dtype, shape) or self.data_start + end > size:
                raise ValueError(f"{path}: tensor {key} is truncated or its offsets are corrupt")
            self.entries[key] = (dtype, shape, begin, end)

    def raw(self, key) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        raw_dtype = np.dtype(DTYPES[dtype].numpy)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            arr = np.fromfile(f, dtype=raw_dtype, count=(end - begin) // raw_dtype.itemsize)
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
    tensor_content}}`, a tensor over 512 MB split into consecutive Values with the same tag. Walking the
    wire format finds each tensor's bytes without reading them.

    Why not `ms.load_checkpoint` (MindSpore 2.10): it reads the whole file into one bytes object and parses it
    into a second copy before making any tensor, and reads neither one tensor nor a slice alone. Measured on
    the fp32 2b-slice benchmark checkpoint converted to .ckpt (files of 1.84 and 0.15 GiB; AMD EPYC, 2 cores,
    warm page cache; peak RSS growth from VmHWM, median time of 3 runs):
    - one 1.84 GiB file to numpy: ms.load_checkpoint +3.68 GiB, 6.3 s; this reader +0.87 GiB (its largest
      tensor), 0.6 s;
    - the whole model (1.99 GiB of parameters): +3.68 GiB, 8.0 s; this reader +2.10 GiB, 1.2 s;
    - rank 0 of 2 (1.21 GiB of parameters): +3.68 GiB and all 1.99 GiB read, 5.9 s; this reader +1.26 GiB and
      1.21 GiB read, 0.7 s.
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
            stored = sum(e - b for b, e in pieces)
            if stored != nbytes(dtype, shape):
                raise ValueError(f"{path}: tensor {key} is truncated or corrupt ({stored} bytes for "
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
        if type_name not in _OF_CKPT:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {type_name}")
        shape = () if dims == [0] else tuple(dims)  # MindSpore writes a scalar's shape as [0]
        return key, _OF_CKPT[type_name], shape, content

    def raw(self, key) -> np.ndarray:
        dtype, shape = self.entries[key][:2]
        pieces = self.pieces[key]
        out = np.empty(sum(e - b for b, e in pieces), np.uint8)
        view, at = memoryview(out), 0
        with open(self.path, "rb") as f:
            for begin, end in pieces:
                f.seek(begin)
                _read_exactly(f, view[at:at + end - begin], f"{self.path}: tensor {key}")
                at += end - begin
        return out.view(DTYPES[dtype].numpy).reshape(shape)

    def get_slice(self, key, axis, start, stop) -> np.ndarray:
        """Indices [start, stop) along `axis`, reading only those bytes (which may span the tensor's pieces)."""
        dtype, shape = self.entries[key][:2]
        spans, logical = [], 0  # (offset of the piece in the tensor's bytes, begin, end in the file)
        for begin, end in self.pieces[key]:
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


class TorchBinFile(TensorFile):
    """A torch `.bin` file, read like `SafetensorsFile`: names and shapes first, each tensor on demand.

    `torch.load(weights_only=True, mmap=True)` unpickles no code and maps the data instead of reading it;
    `close` unmaps it, so the pages of a converted file do not stay resident while the next one is read.
    """

    def __init__(self, path):
        self.path = path
        self._tensors = self._open()
        self.entries = {}
        for i, (key, t) in enumerate(self._tensors.items()):
            code = _OF_TORCH.get(str(t.dtype).replace("torch.", ""))
            if code is None:
                raise ValueError(f"{path}: tensor {key} has unsupported dtype {t.dtype}")
            self.entries[key] = (code, tuple(t.shape), i, i)  # the file's own order stands for its position

    def _open(self):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{self.path}: reading torch .bin checkpoints needs torch "
                              "(pip install 'mindone-qwen2vl[convert]')") from None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.path}: not a readable torch checkpoint ({first.split('. ')[0]})") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{self.path}: not a state dict of tensors")
        return state

    def raw(self, key) -> np.ndarray:
        import torch

        if self._tensors is None:
            self._tensors = self._open()
        t = self._tensors[key]
        arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        return np.array(arr, order="C", copy=True)  # a copy: the mapped file is unmapped when the reader closes

    def close(self):
        self._tensors = None


# ---------------------------------------------------------------------------------------------- writing
def open_writer(path, layout: List[Tuple[str, str, tuple]]):
    """A writer for one weight file holding `layout` [(name, dtype code, shape), ...] in that order, by the
    file's ending (.safetensors or .ckpt). Use as a context manager; `add` each tensor as stored, in order.
    The file is complete when the `with` block ends without an error."""
    return CkptWriter(path, layout) if path.endswith(".ckpt") else SafetensorsWriter(path, layout)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor (the header is known from the layout), so a shard is never
    held whole in memory: peak about one tensor. Metadata format "ms" marks it as MindSpore's, as
    `ms.save_checkpoint(format="safetensors")` does."""

    def __init__(self, path, layout):
        header, offset = {"__metadata__": {"format": "ms"}}, 0
        for name, code, shape in layout:
            size = nbytes(code, shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the format recommends
        self._spans = [header[name]["data_offsets"] for name, _, _ in layout]
        self._f = open(path, "wb")
        self._f.write(len(blob).to_bytes(8, "little") + blob)
        self._written = 0

    def add(self, stored: np.ndarray):
        begin, end = self._spans[self._written]
        assert stored.nbytes == end - begin, "tensor size differs from the planned header"
        self._f.write(np.ascontiguousarray(stored).reshape(-1).view(np.uint8).data)
        self._written += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class CkptWriter:
    """Writes a .ckpt with `ms.save_checkpoint`, which takes a whole file at once: the shard's tensors are
    held until the end (peak about the shard plus the save's copy of one tensor)."""

    def __init__(self, path, layout):
        self.path, self._layout, self._tensors = path, layout, []

    def add(self, stored: np.ndarray):
        import mindspore as ms

        name, code, _ = self._layout[len(self._tensors)]
        data = _bf16_tensor(stored) if code == "BF16" else ms.Tensor.from_numpy(stored)  # shares `stored`
        self._tensors.append({"name": name, "data": data})

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        import mindspore as ms

        from .cli_interrupt import interrupt_after

        tensors, self._tensors = self._tensors, []
        if exc_type is None:
            with interrupt_after():
                ms.save_checkpoint(tensors, self.path)


def _bf16_tensor(bits: np.ndarray, reinterpret=True):
    """A MindSpore bfloat16 tensor holding exactly these bit patterns."""
    import mindspore as ms

    if reinterpret:
        try:
            # Reinterpreting the bits (Tensor.view(dtype), MindSpore >= 2.8) needs no float32 copy.
            return ms.Tensor.from_numpy(bits).view(ms.bfloat16)
        except (TypeError, ValueError, RuntimeError):
            pass
    # Older MindSpore: from float32 holding exactly the bf16 values, so its rounding changes no bit.
    return ms.Tensor(widen_bf16(bits), dtype=ms.bfloat16)
