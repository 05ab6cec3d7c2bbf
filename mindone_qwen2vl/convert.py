"""Convert a Hugging Face Qwen2-VL checkpoint (torch `.bin` or safetensors) into a MindSpore one.

    from mindone_qwen2vl.convert import convert_checkpoint
    convert_checkpoint("Qwen2-VL-7B-Instruct", "Qwen2-VL-7B-Instruct-ms", dtype="bf16")

The whole checkpoint is checked against `config.json` from the file headers before any tensor is read
(names through loading.py's renaming table, shapes through the model's own parameters). Then one source
shard at a time is read, cast and written as one MindSpore shard: safetensors by default, written tensor by
tensor (peak about the largest tensor), or .ckpt through `ms.save_checkpoint`, which holds a whole shard
(weight_files.py). Everything goes into a hidden folder beside DST, is read back and compared with the source
(name, shape, dtype, CRC-32 of the stored bytes), and only then renamed to DST: a failure leaves neither DST
nor the temporary folder behind.
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

from .config import load_config
from .loading import collect_sources, expected_tensors, parameter_pieces, plan_load
from .weight_files import (DTYPES, FLOATS, LAYOUTS, nbytes, open_checkpoint, open_writer, shard_names, widen_bf16,
                           write_index)

__all__ = ["convert_checkpoint", "verify_checkpoint", "ConversionSummary", "ArgumentError", "TARGET_DTYPES",
           "FORMATS"]

TARGET_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
FORMATS = ("safetensors", "ckpt")  # what the converter writes, the default first
SOURCE_FORMATS = ("safetensors", "bin")  # what it reads, in order of preference
# Non-weight files a model folder needs (config, generation, tokenizer, processor, chat template, licence).
_SIDE_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".md")
_SIDE_NAMES = ("LICENSE", "NOTICE", "README")


class ArgumentError(ValueError):
    """What was asked cannot be done as asked (no source folder, a destination that exists without overwrite,
    an unknown dtype or format): found before anything is read or written. scripts/convert_weights.py exits
    with 2 for these, with 1 for a conversion that fails after them."""


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
    return target if target and src_code in FLOATS else src_code


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
        out = values.astype(DTYPES[out_code].numpy, copy=False)  # a copy unless widened bf16 -> fp32
    if out_code == "F16" and src_code != "F16":
        overflow = int(np.isinf(out).sum()) - int(np.isinf(values).sum())
        if overflow:
            raise ValueError(f"{where}: {overflow} values exceed the float16 range (max |value| "
                             f"{float(np.abs(values[np.isfinite(values)]).max()):.4g}); use --dtype bf16 or fp32")
    return out


def _crc(stored: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(stored).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------- source
def _plan(src) -> Tuple[List[Tuple[object, List[Tuple[str, str]]]], bool]:
    """([(reader, [(parameter name, checkpoint key), ...]), ...] in file and data order, sharded) of the HF
    checkpoint folder `src`, checked against the parameters a model of its config.json has (built lazily: no
    parameter memory is allocated)."""
    from .models import model_class

    config = load_config(src)  # Qwen2-VL or Qwen2.5-VL, after config.json's model_type
    readers, sharded = open_checkpoint(src, SOURCE_FORMATS)
    expected = expected_tensors(parameter_pieces(model_class(config.model_type)(config)))
    try:
        plan = plan_load(expected, collect_sources(readers), config.tie_word_embeddings)
    except ValueError as e:
        raise ValueError(f"{src}: {e} (model built from {os.path.join(src, 'config.json')})") from None
    shards = []
    for reader in readers:
        items = [(name, key) for name, (r, key) in plan.items() if r is reader]
        items.sort(key=lambda item: reader.entries[item[1]][2])
        shards.append((reader, items))
    return shards, sharded


def _expected(shards, target, progress, desc) -> Dict[str, Tuple[str, tuple, int]]:
    """{name: (dtype, shape, crc)} of what converting the source gives, computed from the source data."""
    out = {}
    with tqdm(total=_total(shards, target), desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for reader, items in shards:
            for name, key in items:
                code = _out_code(reader.dtype(key), target)
                stored = _cast(reader.raw(key), reader.dtype(key), code, f"{reader.path}: {key}")
                out[name] = (code, tuple(reader.shape(key)), _crc(stored))
                bar.update(stored.nbytes)
            reader.close()
    return out


def _close(shards):
    for reader, _ in shards:
        reader.close()  # a torch .bin reader unmaps its file


def _total(shards, target):
    return sum(nbytes(_out_code(r.dtype(k), target), r.shape(k)) for r, items in shards for _, k in items)


# ---------------------------------------------------------------------------------------------- writing
def _write(folder, shards, fmt, target, sharded, progress) -> Tuple[Dict, int, int]:
    """Write the shards; returns {name: (dtype, shape, crc)} of what was written, its bytes and its files."""
    shards = [(r, items) for r, items in shards if items]  # e.g. a shard holding only a tied lm_head
    names = shard_names(fmt, len(shards), sharded)
    expected, weight_map, total_bytes = {}, {}, 0
    mode = 0o666 & ~_umask()
    with tqdm(total=_total(shards, target), desc="Converting", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for (reader, items), file_name in zip(shards, names):
            path = os.path.join(folder, file_name)
            bar.set_postfix_str(os.path.basename(reader.path), refresh=False)
            codes = [_out_code(reader.dtype(key), target) for _, key in items]
            with open_writer(path, [(n, c, tuple(reader.shape(k))) for (n, k), c in zip(items, codes)]) as writer:
                for (name, key), code in zip(items, codes):
                    stored = _cast(reader.raw(key), reader.dtype(key), code, f"{reader.path}: {key}")
                    expected[name] = (code, tuple(reader.shape(key)), _crc(stored))
                    weight_map[name] = file_name
                    writer.add(stored)
                    total_bytes += stored.nbytes
                    bar.update(stored.nbytes)
                    del stored
            # MindSpore leaves its files owner-read-only; a converted model is shared data, so normal modes.
            os.chmod(path, mode)
            reader.close()
    if sharded:
        write_index(folder, fmt, weight_map, total_bytes)
    return expected, total_bytes, len(names)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_side_files(src, dst, target):
    weight_indexes = {layout.index for layout in LAYOUTS.values()}
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
            config["torch_dtype"] = DTYPES[target].torch
            if "dtype" in config:
                config["dtype"] = DTYPES[target].torch
            with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
        else:
            shutil.copyfile(path, os.path.join(dst, name))


# ---------------------------------------------------------------------------------------------- checking
def _check_written(folder, expected, progress=False):
    """Read every tensor of the MindSpore checkpoint in `folder` back and compare it with `expected`."""
    try:
        readers, _ = open_checkpoint(folder, FORMATS)
    except ValueError as e:
        raise ValueError(f"verification failed: {e}") from None
    seen = set()
    total = sum(nbytes(code, shape) for code, shape, _ in expected.values())
    with tqdm(total=total, desc="Verifying", unit="B", unit_scale=True, disable=not progress) as bar:
        for reader in readers:
            for key in reader.keys():
                where = f"verification failed: {reader.path}: tensor {key}"
                if key not in expected:
                    raise ValueError(f"{where} is not in the source checkpoint")
                if key in seen:
                    raise ValueError(f"{where} appears twice")
                code, shape, crc = expected[key]
                if reader.dtype(key) != code or tuple(reader.shape(key)) != shape:
                    raise ValueError(f"{where} is {reader.dtype(key)} {list(reader.shape(key))}, the source "
                                     f"gives {code} {list(shape)}")
                stored = reader.raw(key)
                if _crc(stored) != crc:
                    raise ValueError(f"{where}: checksum differs from the source (the data was altered)")
                seen.add(key)
                bar.update(stored.nbytes)
            reader.close()
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"verification failed: {folder} lacks {len(missing)} tensors of the source: "
                         f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    return len(seen)


def verify_checkpoint(src, dst, dtype=None, progress=False) -> int:
    """Compare every tensor of the converted checkpoint `dst` with the source `src` (name, shape, dtype and
    a CRC-32 of the stored bytes) after casting to `dtype` as the conversion did; raises ValueError naming
    the first difference, returns the number of tensors checked."""
    target = _target_code(dtype)
    shards, _ = _plan(src)
    try:
        expected = _expected(shards, target, progress, "Reading the source")
    finally:
        _close(shards)
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
    if dtype not in TARGET_DTYPES:
        raise ArgumentError(f"dtype must be one of {', '.join(TARGET_DTYPES)} (or None to keep the checkpoint's), "
                            f"got {dtype!r}")
    return TARGET_DTYPES[dtype]


def _check_paths(src, dst, overwrite):
    if not os.path.isdir(src):
        raise ArgumentError(f"{src}: no such folder" if not os.path.exists(src) else f"{src} is not a folder")
    ancestor = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ArgumentError(f"{dst}: {ancestor} is a file, not a folder")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
        raise ArgumentError(f"{dst}: the destination would replace the source folder {src}")
    if os.path.lexists(dst):
        if not overwrite:
            raise ArgumentError(f"{dst} already exists (pass --overwrite to replace it)")
        if os.path.islink(dst) or not os.path.isdir(dst):
            raise ArgumentError(f"{dst} exists and is not a folder; refusing to replace it")


def _make_parents(folder) -> List[str]:
    """makedirs, returning the folders it created, deepest first."""
    created = []
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(created):
        os.mkdir(path)
    return created


def _remove_empty(created):
    """The folders _make_parents created, deepest first, as long as they are empty."""
    for folder in created:
        try:
            os.rmdir(folder)
        except OSError:
            break


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


def convert_checkpoint(src, dst, dtype: Optional[str] = None, fmt: str = "safetensors", overwrite: bool = False,
                       verify: bool = True, progress: bool = True) -> ConversionSummary:
    """Convert the HF Qwen2-VL checkpoint folder `src` into a MindSpore one at `dst`.

    dtype: "fp32", "fp16", "bf16", or None to keep each tensor's own dtype. fmt: "safetensors" (MindSpore
    safetensors, written tensor by tensor) or "ckpt" (MindSpore's `save_checkpoint`). Sharded like the
    source, with an index.
    Raises ArgumentError (a ValueError) for what cannot be done as asked, before reading anything; after that
    (ValueError, FileNotFoundError, OSError) with the file and the problem, and then nothing is left at `dst`
    (an existing folder replaced with `overwrite` is kept until the new one is done).
    """
    start = time.perf_counter()
    if not os.fspath(dst):
        raise ArgumentError("the destination is an empty path")
    src, dst = os.fspath(src), os.path.normpath(os.fspath(dst))
    target = _target_code(dtype)
    if fmt not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_paths(src, dst, overwrite)
    shards, sharded = _plan(src)
    try:
        parent = os.path.dirname(os.path.abspath(dst))
        created = _make_parents(parent)
        try:
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.converting-", dir=parent)
        except OSError as e:  # a folder that takes no new folder (/proc, a read-only mount)
            _remove_empty(created)
            raise OSError(f"{dst}: cannot make a folder in {parent} ({e.strerror or e})") from None
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; DST should look like any folder
            expected, total_bytes, files = _write(tmp, shards, fmt, target, sharded, progress)
            _copy_side_files(src, tmp, target)
            if verify:
                _check_written(tmp, expected, progress)
            _publish(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(created)
            raise
    finally:
        _close(shards)
    return ConversionSummary(src=src, dst=dst, fmt=fmt, dtype=dtype, tensors=len(expected), bytes=total_bytes,
                             files=files, seconds=time.perf_counter() - start, verified=verify)
