"""Convert a Hugging Face Qwen2-VL checkpoint (torch `.bin` or safetensors) into a MindSpore one.

    from mindone_qwen2vl.convert import convert_checkpoint
    convert_checkpoint("Qwen2-VL-7B-Instruct", "Qwen2-VL-7B-Instruct-ms", dtype="bf16")

The whole checkpoint is checked against `config.json` from the file headers before any tensor is read
(names through loading.py's renaming table, shapes through the model's own parameters). Then one source
shard at a time is read, cast and written as one MindSpore shard. `ms.save_checkpoint` takes a whole file at
once, so a .ckpt shard is held in memory (plus the save's copies of one tensor): peak about the largest shard
plus the largest tensor. MindSpore safetensors are written tensor by tensor: peak about the largest tensor.
Everything goes into a hidden folder beside DST, is read back and compared with the source (name, shape,
dtype, CRC-32 of the stored bytes), and only then renamed to DST: a failure leaves neither DST nor the
temporary folder behind.
"""
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from .config import Qwen2VLConfig
from .loading import (CKPT_INDEX, CKPT_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SafetensorsFile,
                      TensorFile, checkpoint_files, collect_sources, expected_tensors, open_weights, parameter_pieces,
                      plan_load, widen_bf16)

__all__ = ["convert_checkpoint", "verify_checkpoint", "ConversionSummary", "TorchBinFile", "DTYPES", "FORMATS"]

DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
FORMATS = ("ckpt", "safetensors")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# bf16 is held as its 16-bit patterns: numpy has no bfloat16.
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_HF_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Non-weight files a model folder needs (config, generation, tokenizer, processor, chat template, licence).
_SIDE_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".md")
_SIDE_NAMES = ("LICENSE", "NOTICE", "README")


# ---------------------------------------------------------------------------------------------- torch .bin
_TORCH_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class TorchBinFile(TensorFile):
    """A torch `.bin` shard, read like `SafetensorsFile`: names and shapes first, each tensor on demand.

    `torch.load(weights_only=True, mmap=True)` unpickles no code and maps the data instead of reading it;
    `close` unmaps it, so the pages of a converted shard do not stay resident while the next one is read.
    """

    def __init__(self, path):
        self.path = path
        self._tensors = self._open()
        self.entries = {}
        for i, (key, t) in enumerate(self._tensors.items()):
            code = _TORCH_CODES.get(str(t.dtype).replace("torch.", ""))
            if code is None:
                raise ValueError(f"{path}: tensor {key} has unsupported dtype {t.dtype}")
            self.entries[key] = (code, tuple(t.shape), i, i)  # (dtype, shape, order, order) as SafetensorsFile

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
        """A fresh array of the tensor as stored, bfloat16 as its 16-bit patterns (uint16)."""
        import torch

        if self._tensors is None:
            self._tensors = self._open()
        t = self._tensors[key]
        arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        return np.array(arr, order="C", copy=True)  # a copy: the mapped file is unmapped when the shard closes

    def close(self):
        self._tensors = None


# ---------------------------------------------------------------------------------------------- casting
def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch and MindSpore do); NaN stays NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep the sign, force a quiet NaN
    return out


def _out_code(src_code: str, target: Optional[str]) -> str:
    # Only floating tensors are cast; Qwen2-VL has no others, but an integer buffer must not become float.
    return target if target and src_code in _FLOAT_CODES else src_code


def _cast(stored: np.ndarray, src_code: str, out_code: str, where: str) -> np.ndarray:
    """A tensor as stored (a fresh array from `reader.raw`) -> the stored form of `out_code`.

    Kept in stored form throughout (bf16 as 16-bit patterns): a bf16 checkpoint kept in bf16 is copied
    without ever being widened, which matters for the 2.5 GB embedding of the 72B model.
    """
    if out_code == src_code:
        return stored
    values = widen_bf16(stored) if src_code == "BF16" else stored
    if out_code == "BF16":
        return _to_bf16_bits(values)
    with np.errstate(over="ignore"):  # overflow is reported below, as an error naming the tensor
        out = values.astype(_NUMPY[out_code], copy=False)  # a copy unless widened bf16 -> fp32
    if out_code == "F16" and src_code != "F16":
        overflow = int(np.isinf(out).sum()) - int(np.isinf(values).sum())
        if overflow:
            raise ValueError(f"{where}: {overflow} values exceed the float16 range (max |value| "
                             f"{float(np.abs(values[np.isfinite(values)]).max()):.4g}); use --dtype bf16 or fp32")
    return out


def _crc(stored: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(stored).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------- source
def _read_index(path) -> Dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid checkpoint index ({e})") from None
    return weight_map


def _open_source(path):
    return TorchBinFile(path) if path.endswith(".bin") else SafetensorsFile(path)


def open_sources(src) -> Tuple[list, bool]:
    """Readers for the weight files of a HF checkpoint folder (safetensors preferred over .bin), and whether
    it is sharded. An index must agree with its shards both ways."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = os.path.join(src, index_name)
        if os.path.exists(index):
            weight_map = _read_index(index)
            if not weight_map:
                raise ValueError(f"{index}: the index lists no tensors")
            files = list(dict.fromkeys(sorted(weight_map.values())))
            for name in files:
                if os.path.basename(name) != name or not os.path.isfile(os.path.join(src, name)):
                    raise FileNotFoundError(f"{index} names {name}, which is not a file in {src}")
            readers = [_open_source(os.path.join(src, name)) for name in files]
            for name, reader in zip(files, readers):
                listed = {k for k, v in weight_map.items() if v == name}
                absent = sorted(listed - set(reader.keys()))
                if absent:
                    raise ValueError(f"{index} lists {absent[0]} in {name}, but {reader.path} has no such tensor"
                                     + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
                unlisted = sorted(set(reader.keys()) - listed)
                if unlisted:
                    raise ValueError(f"{reader.path} holds {unlisted[0]}, which {index} does not list there"
                                     + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))
            return readers, True
        if os.path.isfile(os.path.join(src, single)):
            return [_open_source(os.path.join(src, single))], False
    raise FileNotFoundError(f"no weights in {src}: expected {SAFETENSORS_SINGLE}, {BIN_SINGLE}, or "
                            f"{SAFETENSORS_INDEX} / {BIN_INDEX} with their shards")


def _plan(src, config, readers) -> List[Tuple[object, List[Tuple[str, str]]]]:
    """[(reader, [(parameter name, checkpoint key), ...]), ...] in file and data order, checked against the
    parameters a model of `config` has (built lazily: no parameter memory is allocated)."""
    from .modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    expected = expected_tensors(parameter_pieces(Qwen2VLForConditionalGeneration(config)))
    try:
        plan = plan_load(expected, collect_sources(readers), config.tie_word_embeddings)
    except ValueError as e:
        raise ValueError(f"{src}: {e} (model built from {os.path.join(src, 'config.json')})") from None
    shards = []
    for reader in readers:
        items = [(name, key) for name, (r, key) in plan.items() if r is reader]
        items.sort(key=lambda item: reader.entries[item[1]][2])
        shards.append((reader, items))
    return shards


def _expected(shards, target, progress, desc) -> Dict[str, Tuple[str, tuple, int]]:
    """{name: (dtype, shape, crc)} of what converting the source gives, computed from the source data."""
    out = {}
    total = sum(_nbytes(r, k, target) for r, items in shards for _, k in items)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for reader, items in shards:
            for name, key in items:
                code = _out_code(reader.dtype(key), target)
                stored = _cast(reader.raw(key), reader.dtype(key), code, f"{reader.path}: {key}")
                out[name] = (code, tuple(reader.shape(key)), _crc(stored))
                bar.update(stored.nbytes)
            _close(reader)
    return out


def _nbytes(reader, key, target):
    return int(np.prod(reader.shape(key), dtype=np.int64)) * _ITEMSIZE[_out_code(reader.dtype(key), target)]


def _close(reader):
    close = getattr(reader, "close", None)
    if close:
        close()


# ---------------------------------------------------------------------------------------------- writing
def _ms_tensor(stored: np.ndarray, code: str):
    import mindspore as ms

    if code == "BF16":
        return _bf16_tensor(stored)
    return ms.Tensor.from_numpy(stored)  # `stored` is a fresh array: the tensor may keep it


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


class _SafetensorsWriter:
    """Writes a safetensors file tensor by tensor (the header is known from the plan), so a shard never has to
    be held whole in memory. Metadata format "ms" marks it as MindSpore's, as `ms.save_checkpoint` does."""

    def __init__(self, path, layout: List[Tuple[str, str, tuple]]):
        header, offset = {"__metadata__": {"format": "ms"}}, 0
        for name, code, shape in layout:
            size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the format recommends
        self._sizes = [header[name]["data_offsets"] for name, _, _ in layout]
        self._f = open(path, "wb")
        self._f.write(len(blob).to_bytes(8, "little") + blob)
        self._written = 0

    def add(self, stored: np.ndarray):
        begin, end = self._sizes[self._written]
        assert stored.nbytes == end - begin, "tensor size differs from the planned header"
        self._f.write(np.ascontiguousarray(stored).reshape(-1).view(np.uint8).data)
        self._written += 1

    def close(self):
        self._f.close()


def _shard_names(n, fmt, sharded):
    if not sharded:
        return [CKPT_SINGLE if fmt == "ckpt" else SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.{fmt}" for i in range(n)]


def _write(folder, shards, fmt, target, sharded, progress) -> Tuple[Dict, int]:
    import mindspore as ms

    shards = [(r, items) for r, items in shards if items]  # e.g. a shard holding only a tied lm_head
    names = _shard_names(len(shards), fmt, sharded)
    expected, weight_map, total_bytes = {}, {}, 0
    total = sum(_nbytes(r, k, target) for r, items in shards for _, k in items)
    mode = 0o666 & ~_umask()
    with tqdm(total=total, desc="Converting", unit="B", unit_scale=True, disable=not progress) as bar:
        for (reader, items), file_name in zip(shards, names):
            path = os.path.join(folder, file_name)
            bar.set_postfix_str(os.path.basename(reader.path), refresh=False)
            codes = [_out_code(reader.dtype(key), target) for _, key in items]
            writer = _SafetensorsWriter(path, [(n, c, tuple(reader.shape(k))) for (n, k), c in zip(items, codes)]) \
                if fmt == "safetensors" else None
            tensors = []
            try:
                for (name, key), code in zip(items, codes):
                    stored = _cast(reader.raw(key), reader.dtype(key), code, f"{reader.path}: {key}")
                    expected[name] = (code, tuple(reader.shape(key)), _crc(stored))
                    weight_map[name] = file_name
                    if writer:
                        writer.add(stored)
                    else:
                        tensors.append({"name": name, "data": _ms_tensor(stored, code)})
                    total_bytes += stored.nbytes
                    bar.update(stored.nbytes)
                    del stored
            finally:
                if writer:
                    writer.close()
            if tensors:
                ms.save_checkpoint(tensors, path)
                del tensors
            # MindSpore leaves its files owner-read-only; a converted model is shared data, so normal modes.
            os.chmod(path, mode)
            _close(reader)
    if sharded:
        index = {"metadata": {"total_size": total_bytes, "format": fmt},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(folder, CKPT_INDEX if fmt == "ckpt" else SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return expected, total_bytes


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_side_files(src, dst, target):
    weight_indexes = {SAFETENSORS_INDEX, BIN_INDEX, CKPT_INDEX}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.startswith(".") or not os.path.isfile(path) or name in weight_indexes:
            continue
        if not (name.endswith(_SIDE_SUFFIXES) or name.upper().startswith(_SIDE_NAMES)):
            continue
        if name == "config.json" and target:
            # The stored dtype changed: say so where HF (and our loader) reads it.
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            config["torch_dtype"] = _HF_DTYPE_NAMES[target]
            if "dtype" in config:
                config["dtype"] = _HF_DTYPE_NAMES[target]
            with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
        else:
            shutil.copyfile(path, os.path.join(dst, name))


# ---------------------------------------------------------------------------------------------- checking
def _check_written(folder, expected, progress=False):
    """Read every tensor of the MindSpore checkpoint in `folder` back and compare it with `expected`."""
    files = checkpoint_files(folder)
    index = next((os.path.join(folder, n) for n in (CKPT_INDEX, SAFETENSORS_INDEX)
                  if os.path.exists(os.path.join(folder, n))), None)
    weight_map = _read_index(index) if index else None
    seen = set()
    total = sum(int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[code] for code, shape, _ in expected.values())
    with tqdm(total=total, desc="Verifying", unit="B", unit_scale=True, disable=not progress) as bar:
        for path in files:
            reader = open_weights(path)
            for key in reader.keys():
                where = f"verification failed: {path}: tensor {key}"
                if key not in expected:
                    raise ValueError(f"{where} is not in the source checkpoint")
                if key in seen:
                    raise ValueError(f"{where} appears twice")
                if weight_map is not None and weight_map.get(key) != os.path.basename(path):
                    raise ValueError(f"{where} is indexed in {index} as being in {weight_map.get(key)}")
                code, shape, crc = expected[key]
                if reader.dtype(key) != code or tuple(reader.shape(key)) != shape:
                    raise ValueError(f"{where} is {reader.dtype(key)} {list(reader.shape(key))}, the source "
                                     f"gives {code} {list(shape)}")
                stored = reader.raw(key)
                if _crc(stored) != crc:
                    raise ValueError(f"{where}: checksum differs from the source (the data was altered)")
                seen.add(key)
                bar.update(stored.nbytes)
            _close(reader)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"verification failed: {folder} lacks {len(missing)} tensors of the source: "
                         f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if weight_map is not None and set(weight_map) != seen:
        extra = sorted(set(weight_map) - seen)
        raise ValueError(f"verification failed: {index} lists tensors no shard holds: {', '.join(extra[:10])}")
    return len(seen)


def verify_checkpoint(src, dst, dtype=None, progress=False) -> int:
    """Compare every tensor of the converted checkpoint `dst` with the source `src` (name, shape, dtype and
    a CRC-32 of the stored bytes) after casting to `dtype` as the conversion did; raises ValueError naming
    the first difference, returns the number of tensors checked."""
    target = _target_code(dtype)
    config = Qwen2VLConfig.from_pretrained(src)
    readers, _ = open_sources(src)
    try:
        expected = _expected(_plan(src, config, readers), target, progress, "Reading the source")
    finally:
        for r in readers:
            _close(r)
    return _check_written(dst, expected, progress)


# ---------------------------------------------------------------------------------------------- conversion
@dataclass
class ConversionSummary:
    src: str
    dst: str
    fmt: str
    dtype: Optional[str]  # None: each tensor kept its own dtype
    tensors: int
    bytes: int
    files: int
    seconds: float
    verified: bool

    def __str__(self):
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e9 else f"{self.bytes / 1e6:.2f} MB"
        dtype = self.dtype or "source dtypes"
        check = "verified against the source" if self.verified else "not verified (--no-verify)"
        return (f"Converted {self.tensors} tensors ({size}, {dtype}) into {self.files} MindSpore {self.fmt} "
                f"file(s) at {self.dst} in {self.seconds:.2f} s; {check}")


def _target_code(dtype):
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or None to keep the checkpoint's), got {dtype!r}")
    return DTYPES[dtype]


def _check_paths(src, dst, overwrite):
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such folder")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
        raise ValueError(f"{dst}: the destination would replace the source folder {src}")
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
        if os.path.islink(dst) or not os.path.isdir(dst):
            raise FileExistsError(f"{dst} exists and is not a folder; refusing to replace it")


def _make_parents(folder) -> List[str]:
    """makedirs, returning the folders it created, deepest first."""
    created = []
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(created):
        os.mkdir(path)
    return created


def _publish(tmp, dst):
    """Rename the finished folder to DST; an existing DST (--overwrite) is swapped out, then deleted."""
    old = None
    if os.path.lexists(dst):
        old = tmp + ".replaced"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old:
            os.rename(old, dst)
        raise
    if old:
        shutil.rmtree(old)


def convert_checkpoint(src, dst, dtype: Optional[str] = None, fmt: str = "ckpt", overwrite: bool = False,
                       verify: bool = True, progress: bool = True) -> ConversionSummary:
    """Convert the HF Qwen2-VL checkpoint folder `src` into a MindSpore one at `dst`.

    dtype: "fp32", "fp16", "bf16", or None to keep each tensor's own dtype. fmt: "ckpt" (MindSpore's
    `save_checkpoint`) or "safetensors" (MindSpore safetensors). Sharded like the source, with an index.
    Raises (ValueError, FileNotFoundError, FileExistsError, OSError) with the file and the problem; then
    nothing is left at `dst` (an existing folder replaced with `overwrite` is kept until the new one is done).
    """
    start = time.perf_counter()
    src, dst = os.fspath(src), os.path.normpath(os.fspath(dst))
    target = _target_code(dtype)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_paths(src, dst, overwrite)
    config = Qwen2VLConfig.from_pretrained(src)
    readers, sharded = open_sources(src)
    try:
        shards = _plan(src, config, readers)
        parent = os.path.dirname(os.path.abspath(dst))
        created = _make_parents(parent)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; DST should look like any folder
            expected, nbytes = _write(tmp, shards, fmt, target, sharded, progress)
            _copy_side_files(src, tmp, target)
            if verify:
                _check_written(tmp, expected, progress)
            files = len(checkpoint_files(tmp))
            _publish(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # deepest first; only the ones made here, and only if still empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break
            raise
    finally:
        for r in readers:
            _close(r)
    return ConversionSummary(src=src, dst=dst, fmt=fmt, dtype=dtype, tensors=len(expected), bytes=nbytes,
                             files=files, seconds=time.perf_counter() - start, verified=verify)
