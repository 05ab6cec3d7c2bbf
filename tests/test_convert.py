"""scripts/convert_weights.py and mindone_qwen2vl.convert: HF checkpoints (safetensors and torch .bin, single
and sharded) to MindSpore .ckpt / safetensors that load with from_pretrained and give HF's logits; casts;
verification; a bad argument (missing source, existing destination) exits 2 and every failure after that 1, each
with one line, leaving nothing behind."""
import copy
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mindone_qwen2vl import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from mindone_qwen2vl.convert import _to_bf16_bits, convert_checkpoint, verify_checkpoint
from mindone_qwen2vl.loading import canonical_name, checkpoint_files, expected_tensors, parameter_pieces
from mindone_qwen2vl.weight_files import MindSporeCkptFile, SafetensorsFile, _bf16_tensor, open_weights, widen_bf16
from tiny import IMAGE, hf_config, hf_logits, hf_model, random_pixels, rel_err, save_checkpoint, vision_block

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "scripts", "convert_weights.py")
TOKENIZER_DIR = os.path.join(ROOT, "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")
IDS = np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]])
SMALL_VOCAB = 2048
SMALL_IDS = np.array([[1, 872, 198, 1785, 419, 2047, 13, 5]])
SHARD = "300KB"  # about five shards of the small model


def convert(src, dst, **kw):
    return convert_checkpoint(str(src), str(dst), progress=False, **kw)


def load(folder, **kw):
    return Qwen2VLForConditionalGeneration.from_pretrained(str(folder), progress=False, **kw)


def assert_same_logits(ours, hf, ids, **vision):
    err = rel_err(ours(ids, **vision).logits.asnumpy(), hf_logits(hf, input_ids=ids, **vision))
    assert err < 1e-5, err


def tensors_of(folder):
    """{name: (dtype, values)} of every weight file of a folder, through our readers."""
    out = {}
    for path in checkpoint_files(str(folder)):
        reader = open_weights(path)
        out.update({k: (reader.dtype(k), reader.get(k)) for k in reader.keys()})
    return out


@pytest.fixture(scope="module")
def small():
    """Untied (so lm_head is converted too), vocabulary 2048 to keep files and forwards small."""
    return hf_model(hf_config(tied=False, vocab=SMALL_VOCAB), seed=5)


@pytest.fixture(scope="module")
def sharded_src(small, tmp_path_factory):
    return save_checkpoint(small, str(tmp_path_factory.mktemp("st_sharded")), max_shard_size=SHARD)


@pytest.fixture(scope="module")
def bin_sharded_src(small, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bin_sharded"))
    small.save_pretrained(folder, safe_serialization=False, max_shard_size=SHARD)
    return folder


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(SCRIPT)["main"]


# ---------------------------------------------------------------------------------------------- round trips
def test_single_safetensors_to_ckpt_text_image_and_processor(tiny_hf, tmp_path):
    hf, folder = tiny_hf
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(folder, src)
    for name in os.listdir(TOKENIZER_DIR):
        if name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(TOKENIZER_DIR, name), src)
    summary = convert(src, dst, fmt="ckpt")

    side = sorted(f for f in os.listdir(src) if f != "model.safetensors")
    assert sorted(os.listdir(dst)) == sorted(side + ["model.ckpt"])
    source = SafetensorsFile(str(src / "model.safetensors"))
    assert "lm_head.weight" not in source.keys()  # tied: HF does not write it, nor do we
    assert (summary.tensors, summary.files, summary.verified) == (len(source.keys()), 1, True)
    assert summary.bytes == sum(source.get(k).nbytes for k in source.keys())
    assert f"{summary.tensors} tensors" in str(summary)

    ours = load(dst)
    assert_same_logits(ours, hf, IDS)
    grid = np.array([(1, 4, 6)])
    ids = np.array([[872, 198] + vision_block(IMAGE, (1, 4, 6)) + [13]])
    assert_same_logits(ours, hf, ids, pixel_values=random_pixels(grid, 3), image_grid_thw=grid)

    theirs, mine = Qwen2VLProcessor.from_pretrained(str(src)), Qwen2VLProcessor.from_pretrained(str(dst))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert mine.apply_chat_template(chat, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, add_generation_prompt=True)
    assert mine(text=["Describe this image."])["input_ids"].tolist() == \
        theirs(text=["Describe this image."])["input_ids"].tolist()

    # MindSpore's own loader reads the file the same way.
    params = ms.load_checkpoint(str(dst / "model.ckpt"))
    ckpt = MindSporeCkptFile(str(dst / "model.ckpt"))
    assert set(params) == set(ckpt.keys()) == set(source.keys())
    for key, p in params.items():
        assert p.dtype == ms.float32 and tuple(p.shape) == ckpt.shape(key)
        np.testing.assert_array_equal(p.asnumpy(), ckpt.get(key))


@pytest.mark.parametrize("kind, fmt", [("safetensors-sharded-new-names", "ckpt"), ("bin-single", "safetensors"),
                                       ("bin-sharded", "ckpt")])
def test_sources_convert_and_load_to_hf_logits(small, bin_sharded_src, kind, fmt, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if kind == "bin-sharded":
        src = bin_sharded_src
    elif kind == "bin-single":
        small.save_pretrained(src, safe_serialization=False)
    else:
        save_checkpoint(small, str(src), max_shard_size=SHARD, new_names=True)
    sources = sorted(f for f in os.listdir(src) if f.endswith((".bin", ".safetensors")))
    summary = convert(src, dst, fmt=fmt, verify=kind != "bin-single")
    assert summary.verified == (kind != "bin-single")

    written = sorted(f for f in os.listdir(dst) if f.endswith("." + fmt))
    assert len(written) == len(sources) == summary.files
    index = os.path.join(dst, f"model.{fmt}.index.json")
    if len(sources) > 1:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        assert sorted(set(weight_map.values())) == written
    else:
        assert written == [f"model.{fmt}"] and not os.path.exists(index)
    ours = load(dst)
    # canonical checkpoint names, whatever the source's scheme
    assert set(tensors_of(dst)) == set(expected_tensors(parameter_pieces(ours)))
    assert_same_logits(ours, small, SMALL_IDS)
    if fmt == "safetensors":  # MindSpore's loader reads what we wrote ourselves
        path = os.path.join(dst, written[0])
        ours = SafetensorsFile(path)
        for key, p in ms.load_checkpoint(path, format="safetensors").items():
            np.testing.assert_array_equal(p.asnumpy(), ours.get(key))


def test_bf16_source_stays_bf16_and_loads_exactly(small, tmp_path):
    hf_bf16 = copy.deepcopy(small).to(torch.bfloat16)
    src = save_checkpoint(hf_bf16, str(tmp_path / "src"), max_shard_size="150KB")
    assert convert(src, tmp_path / "dst").fmt == "safetensors"  # the default
    assert all(f.endswith(".safetensors") for f in checkpoint_files(str(tmp_path / "dst")))
    got = tensors_of(tmp_path / "dst")
    want = {canonical_name(k): v.float().numpy() for k, v in hf_bf16.state_dict().items()}
    assert {dtype for dtype, _ in got.values()} == {"BF16"}
    for name, (_, values) in got.items():
        np.testing.assert_array_equal(values, want[name])
    for path in checkpoint_files(str(tmp_path / "dst")):  # MindSpore's loader reads our bf16 files alike
        for key, p in ms.load_checkpoint(path, format="safetensors").items():
            assert p.dtype == ms.bfloat16
            np.testing.assert_array_equal(p.float().asnumpy(), want[key])
    reference = copy.deepcopy(small)  # the same bf16 weights computed in fp32, as ours (buffers stay fp32)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_same_logits(load(tmp_path / "dst"), reference, SMALL_IDS)

    convert(src, tmp_path / "fp32", dtype="fp32")
    assert {dtype for dtype, _ in tensors_of(tmp_path / "fp32").values()} == {"F32"}


@pytest.mark.parametrize("dtype, fmt", [("bf16", "ckpt"), ("fp16", "safetensors")])
def test_dtype_casts(small, dtype, fmt, tmp_path):
    src = save_checkpoint(small, str(tmp_path / "src"))
    convert(src, tmp_path / "dst", dtype=dtype, fmt=fmt)
    source = load_file(os.path.join(src, "model.safetensors"))
    got = tensors_of(tmp_path / "dst")
    assert set(got) == set(source)
    for name, (code, values) in got.items():
        if dtype == "bf16":
            assert code == "BF16"
            want = torch.from_numpy(source[name]).to(torch.bfloat16).float().numpy()
        else:
            assert code == "F16"
            want = source[name].astype(np.float16)
        np.testing.assert_array_equal(values, want)
    with open(tmp_path / "dst" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    ours = load(tmp_path / "dst")
    assert ours(SMALL_IDS).logits.asnumpy().std() > 0


def test_bf16_rounding_equals_torch():
    specials = np.array([1.0, -1.0, 0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, 65504.0],
                        np.float32)
    ties = (np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000, 0x3F807FFF], np.uint32)).view(np.float32)
    rng = np.random.default_rng(0)
    values = np.concatenate([specials, ties, rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(
        -30, 30, 10000)]).astype(np.float32)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = _to_bf16_bits(values)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan((got[~finite].astype(np.uint32) << 16).view(np.float32)).all()


def test_bf16_tensors_keep_their_bits_either_way():
    """Reinterpreting uint16 as bfloat16, or the float32 route older MindSpore needs, change no bit."""
    rng = np.random.default_rng(1)
    bits = _to_bf16_bits(rng.standard_normal((3, 5)).astype(np.float32) * 100)
    for reinterpret in (True, False):
        t = _bf16_tensor(bits, reinterpret)
        assert t.dtype == ms.bfloat16 and t.shape == (3, 5)
        np.testing.assert_array_equal(t.float().asnumpy(), widen_bf16(bits))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_verification_catches_a_tensor_altered_after_writing(sharded_src, fmt, tmp_path):
    dst = tmp_path / "dst"
    summary = convert(sharded_src, dst, fmt=fmt)
    assert verify_checkpoint(sharded_src, dst) == summary.tensors
    key = "model.layers.1.mlp.down_proj.weight"
    with open(dst / f"model.{fmt}.index.json") as f:
        path = str(dst / json.load(f)["weight_map"][key])
    reader = open_weights(path)
    offset = reader.entries[key][2] + (reader.data_start if fmt == "safetensors" else 0)
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ValueError, match=rf"verification failed: .*{os.path.basename(path)}: tensor {key}.*checksum"):
        verify_checkpoint(sharded_src, dst)
    # Casting is part of what is verified: the fp32 files are not what a bf16 conversion gives.
    with pytest.raises(ValueError, match="verification failed: .* is F32 .* the source gives BF16"):
        verify_checkpoint(sharded_src, dst, dtype="bf16")


def test_verification_checks_the_index(sharded_src, tmp_path):
    dst = tmp_path / "dst"
    convert(sharded_src, dst)
    path = dst / "model.safetensors.index.json"
    with open(path) as f:
        index = json.load(f)
    key = "model.layers.1.mlp.down_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=rf"verification failed: .*({key} in {other}, but .* has no such tensor|"
                                         rf"holds {key}, which .* does not list there)"):
        verify_checkpoint(sharded_src, dst)


def test_ckpt_reader_pieces_crc_trailer_and_scalars(tmp_path):
    """What ms.save_checkpoint writes for tensors over 512 MB (consecutive pieces with one name) and with
    crc_check (a trailer), read as MindSpore reads it."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    big = np.arange(24, dtype=np.float32).reshape(4, 6)
    with open(tmp_path / "pieces.ckpt", "wb") as f:
        for part in np.array_split(big.reshape(-1).view(np.uint8), 3):
            msg = Checkpoint()
            value = msg.value.add()
            value.tag = "big"
            value.tensor.dims.extend([4, 6])
            value.tensor.tensor_type = "Float32"
            value.tensor.tensor_content = part.tobytes()
            f.write(msg.SerializeToString())
    reader = MindSporeCkptFile(str(tmp_path / "pieces.ckpt"))
    assert len(reader.pieces["big"]) == 3
    np.testing.assert_array_equal(reader.get("big"), big)
    np.testing.assert_array_equal(ms.load_checkpoint(str(tmp_path / "pieces.ckpt"))["big"].asnumpy(), big)

    items = [{"name": "s", "data": ms.Tensor(np.float32(2.5))},
             {"name": "h", "data": ms.Tensor(np.ones((2, 3), np.float16))},
             {"name": "b", "data": ms.Tensor(big, dtype=ms.bfloat16)}]
    ms.save_checkpoint(items, str(tmp_path / "crc.ckpt"), crc_check=True)
    reader = MindSporeCkptFile(str(tmp_path / "crc.ckpt"))
    theirs = ms.load_checkpoint(str(tmp_path / "crc.ckpt"), crc_check=True)
    assert [reader.dtype(k) for k in ("s", "h", "b")] == ["F32", "F16", "BF16"]
    for key in ("s", "h", "b"):
        assert reader.shape(key) == tuple(theirs[key].shape)
        np.testing.assert_array_equal(reader.get(key), theirs[key].float().asnumpy())


# ---------------------------------------------------------------------------------------------- failures
def _shards(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))


def _edit_shard(folder, edit, which=0):
    """Rewrite one shard and its index entries with `edit(tensors)`; returns the shard name."""
    name = _shards(folder)[which]
    path = os.path.join(folder, name)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update({k: name for k in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f)
    return name


def truncated_shard(src):
    name = _shards(src)[1]
    path = os.path.join(src, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return rf"{name}: tensor .* is truncated"


def corrupt_shard(src):
    name = _shards(src)[0]
    with open(os.path.join(src, name), "r+b") as f:
        f.write(b"\xff" * 8)  # header length far beyond the file
    return rf"{name}: not a readable safetensors file"


def truncated_bin(src):
    name = _shards(src)[2]
    path = os.path.join(src, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return rf"{name}: not a readable torch checkpoint"


def index_names_missing_file(src):
    name = _shards(src)[1]
    os.remove(os.path.join(src, name))
    return rf"model.safetensors.index.json names {name}, which is not a file"


def index_names_missing_tensor(src):
    path = os.path.join(src, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.0.mlp.gate_proj.bias"] = _shards(src)[0]
    with open(path, "w") as f:
        json.dump(index, f)
    return rf"lists model.layers.0.mlp.gate_proj.bias in {_shards(src)[0]}, but .* has no such tensor"


def unknown_tensor(src):
    _edit_shard(src, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    return r"does not fit the model config: unexpected 1 tensors: model.layers.0.mlp.extra.weight"


def missing_tensor(src):
    first = sorted(load_file(os.path.join(src, _shards(src)[0])))[0]
    _edit_shard(src, lambda t: t.pop(first))
    return rf"does not fit the model config: missing 1 tensors: {first}"


def shape_contradicts_config(src):
    path = os.path.join(src, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["text_config"]["intermediate_size"] = 96
    config.pop("intermediate_size", None)
    with open(path, "w") as f:
        json.dump(config, f)
    return (r"6 tensors of the wrong shape: .*model.layers.0.mlp.gate_proj.weight: checkpoint \[128, 64\] vs "
            r"model \[96, 64\].*src/config.json")


def fp16_overflow_while_writing(src):
    name = _edit_shard(src, lambda t: t[sorted(t)[-1]].reshape(-1).__setitem__(0, 1e6), which=-1)
    return rf"{name}: .*: 1 values exceed the float16 range"


FAILURES = [truncated_shard, corrupt_shard, truncated_bin, index_names_missing_file, index_names_missing_tensor,
            unknown_tensor, missing_tensor, shape_contradicts_config, fp16_overflow_while_writing]


@pytest.mark.parametrize("damage", FAILURES, ids=lambda f: f.__name__)
def test_failures_exit_1_with_one_line_and_leave_nothing(damage, main, sharded_src, bin_sharded_src, tmp_path,
                                                         capsys):
    src = tmp_path / "src"
    shutil.copytree(bin_sharded_src if damage is truncated_bin else sharded_src, src)
    expected = damage(str(src))
    argv = ["--src", str(src), "--dst", str(tmp_path / "out" / "models" / "dst"), "--no-progress"]
    if damage is fp16_overflow_while_writing:
        argv += ["--dtype", "fp16"]  # fails on the last shard, after the others were written
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_weights: error: "), err
    assert re.search(expected, err[0]), err[0]
    assert os.listdir(tmp_path) == ["src"]  # no DST, no temporary folder, not even the parent made for DST


def test_existing_dst_needs_overwrite(main, sharded_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["--src", sharded_src, "--dst", str(dst), "--no-progress"]) == 2  # a bad argument
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convert_weights: error: {dst} already exists (pass --overwrite to replace it)"]
    assert os.listdir(dst) == ["keep.txt"]
    assert main(["--src", sharded_src, "--dst", str(dst), "--no-progress", "--overwrite"]) == 0
    # safetensors by default
    assert "keep.txt" not in os.listdir(dst) and "model.safetensors.index.json" in os.listdir(dst)
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # neither the temporary folder nor the replaced one remain


def test_missing_source_is_a_bad_argument(main, tmp_path, capsys):
    missing, dst = tmp_path / "nothing", tmp_path / "out" / "dst"
    assert main(["--src", str(missing), "--dst", str(dst), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"convert_weights: error: {missing}: no such folder"]
    (tmp_path / "file").write_text("not a folder")
    assert main(["--src", str(tmp_path / "file"), "--dst", str(dst), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"convert_weights: error: {tmp_path / 'file'} is not a "
                                                            "folder"]
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing written, not even DST's parent


def test_ctrl_c_during_a_ckpt_save_takes_effect_once_it_is_done(tmp_path):
    """A SIGINT while MindSpore's save_checkpoint writes a shard is held until the save ends, then raised: the file
    is whole. Inside the save MindSpore caught it, logged a CRITICAL line blaming permissions or disk space, and
    left no file (convert_weights then printed that line before its own)."""
    import signal
    import threading
    import time

    from mindone_qwen2vl.weight_files import CkptWriter

    arrays = [np.random.default_rng(i).standard_normal((2048, 4096), dtype=np.float32) for i in range(5)]  # 160 MB
    path = str(tmp_path / "shard.ckpt")
    writer = CkptWriter(path, [(f"w{i}", "F32", a.shape) for i, a in enumerate(arrays)])
    for array in arrays:
        writer.add(array)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        try:
            timer.start()
            writer.__exit__(None, None, None)
            time.sleep(5)  # a save faster than the timer: the interrupt still lands in this block
        finally:
            timer.cancel()
    loaded = ms.load_checkpoint(path)
    assert sorted(loaded) == [f"w{i}" for i in range(5)]
    np.testing.assert_array_equal(loaded["w4"].asnumpy(), arrays[4])


def test_destinations_that_cannot_be_made_are_named(main, sharded_src, tmp_path, capsys):
    """A destination under a file, an empty one, and one in a folder that takes no new folder (/proc): one line
    naming the problem, nothing made (they gave "[Errno 17] File exists", "would replace the source folder", and
    a raw errno naming the temporary folder)."""
    (tmp_path / "file").write_text("x")
    under_a_file = tmp_path / "file" / "out"
    assert main(["--src", sharded_src, "--dst", str(under_a_file), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"convert_weights: error: {under_a_file}: {tmp_path / 'file'} is a file, not a folder"]
    assert main(["--src", sharded_src, "--dst", "", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["convert_weights: error: the destination is an empty path"]
    if os.path.isdir("/proc/self"):
        assert main(["--src", sharded_src, "--dst", "/proc/converted", "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("convert_weights: error: /proc/converted: cannot make a folder "
                                                   "in /proc ("), err
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("argv", [["--src", "a", "--dst", "b", "--dtype", "fp8"], ["--src", "a"],
                                  ["--src", "a", "--dst", "b", "--format", "onnx"], ["--src", "a", "--dst", "a/"]])
def test_bad_arguments_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_script_end_to_end(sharded_src, tmp_path):
    """The real process: exit codes, the summary on stdout, one line on stderr, no traceback."""
    run = [sys.executable, SCRIPT, "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]
    missing = subprocess.run(run, capture_output=True, text=True)  # no src folder yet: a bad argument
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [f"convert_weights: error: {tmp_path / 'src'}: no such folder"]
    assert os.listdir(tmp_path) == []
    shutil.copytree(sharded_src, tmp_path / "src")
    truncated_shard(str(tmp_path / "src"))
    bad = subprocess.run(run, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    assert os.listdir(tmp_path) == ["src"]

    shutil.rmtree(tmp_path / "src")
    shutil.copytree(sharded_src, tmp_path / "src")
    good = subprocess.run(run + ["--dtype", "bf16", "--format", "safetensors"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("Converted ") and "bf16" in good.stdout and "verified" in good.stdout
    assert "Converting" in good.stderr and "Verifying" in good.stderr  # progress bars
    assert {d for d, _ in tensors_of(tmp_path / "dst").values()} == {"BF16"}
