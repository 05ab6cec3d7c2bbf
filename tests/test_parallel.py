"""Tensor parallelism (parallel.py): one msrun job of 2 CPU workers (tests/tp_worker.py) against the
single-process model and HF; sliced checkpoint reads; the errors for a bad tensor_parallel_size.

The msrun job covers three checkpoints: tied embeddings with 4 heads / 2 KV heads (one KV head per rank), an
untied, sharded bf16 checkpoint with 1 KV head (replicated on both ranks), and a tied Qwen2.5-VL one (logits
only: its decoder is Qwen2-VL's, sharded alike; generation is covered by the other two).
"""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file

from mindone_qwen2vl import Qwen2VLForConditionalGeneration
from mindone_qwen2vl.config import Qwen2VLTextConfig
from mindone_qwen2vl.weight_files import MindSporeCkptFile, SafetensorsFile
from mindone_qwen2vl.parallel import check_tensor_parallel, head_layout, init_tensor_parallel, is_main_rank
from tiny import IMAGE, VIDEO, hf_config, hf_config_2_5, hf_logits, hf_model, left_pad, random_pixels, rel_err, \
    save_checkpoint, vision_block

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
TOL = 1e-4
JOB_TIMEOUT = 400  # seconds; the job takes about a minute on 2 cores
IMG, VID = (1, 4, 6), (2, 4, 4)
# Greedy generation checked per checkpoint and mode against the single process's tokens (pynative); graph
# compiles dominate the job's time, so the second checkpoint generates in graph mode only.
GENERATE = [("tied", "pynative"), ("tied", "graph"), ("kv_replicated", "graph"), ("qwen2_5_vl", "graph")]


def job_inputs():
    ids, mask = left_pad([
        [1, 2] + vision_block(IMAGE, IMG) + [3, 4],
        [7] + vision_block(VIDEO, VID) + [8, 9],
        [151644, 872, 198, 74785, 419],
    ])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels([IMG], 1),
                image_grid_thw=np.array([IMG]), pixel_values_videos=random_pixels([VID], 2),
                video_grid_thw=np.array([VID]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_executable():
    here = os.path.join(os.path.dirname(sys.executable), "msrun")
    return here if os.path.exists(here) else shutil.which("msrun")


def run_msrun(args, log_dir, workers=2):
    """msrun with `workers` local workers; returns its CompletedProcess, or fails with the workers' log tails."""
    env = dict(os.environ)
    # msrun starts workers with `python` from PATH: make it this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [msrun_executable(), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={free_port()}", "--join=True", f"--log_dir={log_dir}", "--cluster_time_out=120",
           *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # msrun and the workers it started, all in this new session
        output, _ = proc.communicate()
    logs = ""
    for path in sorted(glob.glob(os.path.join(log_dir, "worker_*.log"))):
        with open(path, errors="replace") as f:
            lines = [l for l in f if "[WARNING]" not in l and "[INFO]" not in l]
        logs += f"--- {os.path.basename(path)}\n" + "".join(lines[-40:])
    assert proc.returncode == 0, f"msrun failed (exit {proc.returncode}):\n{output[-3000:]}\n{logs}"
    return logs


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Checkpoints, HF references, and the results of one 2-worker msrun job: {tag: hf logits}, [rank0, rank1]."""
    import torch

    root = tmp_path_factory.mktemp("tp")
    inputs = job_inputs()
    np.savez(root / "inputs.npz", **inputs)

    tied = hf_model(hf_config(tied=True, heads=4, kv_heads=2), seed=11)
    save_checkpoint(tied, str(root / "tied"))
    # bf16 on disk exercises the widening of sliced reads; the reference is the same rounded weights in fp32.
    rep = hf_model(hf_config(tied=False, heads=4, kv_heads=1), seed=12).to(torch.bfloat16)
    save_checkpoint(rep, str(root / "kv_replicated"), max_shard_size="10MB")
    rep = rep.float()
    qwen2_5 = hf_model(hf_config_2_5(tied=True, heads=4, kv_heads=2), seed=13)
    save_checkpoint(qwen2_5, str(root / "qwen2_5_vl"))
    refs = {"tied": hf_logits(tied, **inputs), "kv_replicated": hf_logits(rep, **inputs),
            "qwen2_5_vl": hf_logits(qwen2_5, **inputs)}

    out = root / "out"
    out.mkdir()
    specs = [f"{tag}:{','.join(m for t, m in GENERATE if t == tag)}={root / tag}" for tag in refs]
    logs = run_msrun([WORKER, str(out), str(root / "inputs.npz"), *specs], str(root / "logs"))
    ranks = []
    for r in range(2):
        path = out / f"rank{r}.npz"
        assert path.exists(), f"rank {r} wrote no results\n{logs}"
        ranks.append(dict(np.load(path)))
    return refs, ranks, inputs["attention_mask"]


# ---------------------------------------------------------------------------------------------- the msrun job
@pytest.mark.parametrize("tag", ["tied", "kv_replicated", "qwen2_5_vl"])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_logits_equal_single_process_and_hf(job, tag, mode):
    refs, ranks, mask = job
    for r, res in enumerate(ranks):
        tp = res[f"{tag}/tp_{mode}"]
        assert tp.shape == refs[tag].shape
        err_single = rel_err(tp, res[f"{tag}/single"], mask)
        err_hf = rel_err(tp, refs[tag], mask)
        print(f"{tag} rank {r} [{mode}]: vs single process {err_single:.2e}, vs HF {err_hf:.2e}")
        assert err_single < TOL and err_hf < TOL
        assert (tp.argmax(-1) == refs[tag].argmax(-1))[mask.astype(bool)].all()
    # The lm_head all-gather hands every rank the same logits.
    np.testing.assert_array_equal(ranks[0][f"{tag}/tp_{mode}"], ranks[1][f"{tag}/tp_{mode}"])


def test_each_rank_holds_half_of_the_decoder(job):
    _, ranks, _ = job
    for res in ranks:
        for tag in ("tied", "kv_replicated", "qwen2_5_vl"):
            local, whole = res[f"{tag}/decoder_bytes"]
            # Only the norms (a few KB) are whole on every rank.
            assert 0.5 <= local / whole < 0.501, (tag, local, whole)


def test_heads_split_and_kv_heads_replicated(job):
    _, ranks, _ = job
    for r, res in enumerate(ranks):
        assert res["tied/tensor_parallel"].tolist() == [r, 2]
        assert res["tied/heads"].tolist() == [2, 1]
        assert res["kv_replicated/heads"].tolist() == [2, 1]
    # Two KV heads: each rank holds a different one. One KV head: both hold the same copy.
    assert not np.array_equal(ranks[0]["tied/k_proj_rows"], ranks[1]["tied/k_proj_rows"])
    np.testing.assert_array_equal(ranks[0]["kv_replicated/k_proj_rows"], ranks[1]["kv_replicated/k_proj_rows"])


def test_ranks_and_world_size(job):
    _, ranks, _ = job
    assert [int(r["rank"]) for r in ranks] == [0, 1]
    assert [bool(r["main"]) for r in ranks] == [True, False]
    for res in ranks:
        assert int(res["size"]) == 2
        assert "tensor_parallel_size=4 but the distributed job has 2 processes" in str(res["wrong_size_error"])


@pytest.mark.skipif(not hasattr(Qwen2VLForConditionalGeneration, "generate"),
                    reason="Qwen2VLForConditionalGeneration.generate has not landed yet")
@pytest.mark.parametrize("tag, mode", GENERATE)
def test_greedy_tokens_identical_on_every_rank_and_to_single_process(job, tag, mode):
    _, ranks, mask = job
    for res in ranks:
        error = res.get(f"{tag}/generate_error")
        assert error is None, f"{tag}: generate failed on rank {int(res['rank'])}:\n{error}"
        tokens = res[f"{tag}/tokens_tp_{mode}"]
        assert tokens.shape[0] == mask.shape[0] and tokens.shape[1] > mask.shape[1]
        np.testing.assert_array_equal(tokens, res[f"{tag}/tokens_single"])
    np.testing.assert_array_equal(ranks[0][f"{tag}/tokens_tp_{mode}"], ranks[1][f"{tag}/tokens_tp_{mode}"])


@pytest.mark.skipif(not hasattr(Qwen2VLForConditionalGeneration, "generate"),
                    reason="Qwen2VLForConditionalGeneration.generate has not landed yet")
def test_sampling_without_a_seed_draws_the_same_tokens_on_every_rank(job):
    _, ranks, _ = job
    for tag in ("tied", "kv_replicated"):
        assert ranks[0].get(f"{tag}/generate_error") is None
        np.testing.assert_array_equal(ranks[0][f"{tag}/tokens_tp_sampled"], ranks[1][f"{tag}/tokens_tp_sampled"])


# ---------------------------------------------------------------------------------------------- in one process
def text_config(heads, kv, intermediate=128, vocab=1024):
    return Qwen2VLTextConfig(hidden_size=heads * 16, num_attention_heads=heads, num_key_value_heads=kv,
                             intermediate_size=intermediate, vocab_size=vocab,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})


@pytest.mark.parametrize("heads, kv, size, message", [
    (4, 2, 3, "num_attention_heads 4 is not divisible by tensor_parallel_size 3"),
    (6, 3, 2, "num_key_value_heads 3 is not divisible by tensor_parallel_size 2"),
    (12, 4, 6, "tensor_parallel_size 6 is larger than num_key_value_heads 4 but not a multiple of it"),
    (4, 4, 0, "tensor_parallel_size must be a positive integer, got 0"),
])
def test_bad_size_is_named(heads, kv, size, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(text_config(heads, kv), size)


def test_bad_intermediate_and_vocab_are_named():
    with pytest.raises(ValueError, match="intermediate_size 129 .* vocab_size 1025 is not divisible by "
                                         "tensor_parallel_size 2"):
        check_tensor_parallel(text_config(4, 2, intermediate=129, vocab=1025), 2)


def test_head_layout():
    # 72B: 64 heads, 8 KV heads. On 8 cards each rank has 8 heads and its own KV head.
    assert [head_layout(text_config(64, 8), r, 8) for r in (0, 7)] == [(8, 1, 0, 0), (8, 1, 56, 7)]
    # On 16 cards two ranks share each KV head.
    assert [head_layout(text_config(64, 8), r, 16)[3] for r in range(16)] == [r // 2 for r in range(16)]
    assert head_layout(text_config(4, 2), 1, 1) == (4, 2, 4, 2)


def test_from_pretrained_with_bad_size_fails_before_loading(tiny_hf):
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor_parallel_size 3"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, tensor_parallel_size=3)


def test_without_msrun_the_error_says_how_to_launch(tiny_hf, monkeypatch):
    for var in ("MS_ROLE", "RANK_TABLE_FILE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"not started by msrun: launch it as `msrun --worker_num=2 "
                                           r"--local_worker_num=2"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, tensor_parallel_size=2)
    assert init_tensor_parallel(1) == (0, 1) and is_main_rank()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, tensor_parallel_size=1)
    assert model.tensor_parallel is None  # a size of 1 shards nothing


# ---------------------------------------------------------------------------------------------- sliced reads
def bytes_read():
    """Bytes this process has read through read(2) so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar:")).split()[1])


def slices_of(arr):
    for axis in range(arr.ndim):
        n = arr.shape[axis]
        for start, stop in ((0, n // 2), (n // 2, n), (1, n - 1), (0, n)):
            yield axis, start, stop


def test_safetensors_slices_read_only_their_bytes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((64, 96)).astype(np.float32),
               "h": rng.standard_normal((3, 8, 10)).astype(np.float16),
               "b": rng.standard_normal(40).astype(np.float32)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    reader = SafetensorsFile(path)
    for key, arr in tensors.items():
        for axis, start, stop in slices_of(arr):
            got = reader.get_slice(key, axis, start, stop)
            np.testing.assert_array_equal(got, np.take(arr, np.arange(start, stop), axis), f"{key} {axis}")
    # A column half of a row-major [256, 512] float32 reads its 256 x 256 floats (reading /proc/self/io
    # itself counts a few hundred bytes), not the whole tensor.
    save_file({"big": rng.standard_normal((256, 512)).astype(np.float32)}, str(tmp_path / "big.safetensors"))
    big = SafetensorsFile(str(tmp_path / "big.safetensors"))
    before = bytes_read()
    big.get_slice("big", 1, 256, 512)
    assert 0 <= bytes_read() - before - 256 * 256 * 4 < 4096
    with pytest.raises(ValueError, match=r"slice \[0:65\] of axis 0 is outside a tensor of shape \[64, 96\]"):
        reader.get_slice("w", 0, 0, 65)


def test_bf16_slices_widen_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    w = torch.randn(16, 12).to(torch.bfloat16)
    save_torch({"w": w}, str(tmp_path / "b.safetensors"))
    got = SafetensorsFile(str(tmp_path / "b.safetensors")).get_slice("w", 1, 6, 12)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.float().numpy()[:, 6:])


def test_ckpt_slices_across_pieces(tmp_path):
    """A .ckpt tensor over 512 MB is stored in consecutive pieces; slices may straddle their boundaries."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    big = np.arange(7 * 10, dtype=np.float32).reshape(7, 10)
    with open(tmp_path / "pieces.ckpt", "wb") as f:
        for part in np.array_split(big.reshape(-1).view(np.uint8), 3):  # boundaries fall inside rows
            msg = Checkpoint()
            value = msg.value.add()
            value.tag = "big"
            value.tensor.dims.extend(big.shape)
            value.tensor.tensor_type = "Float32"
            value.tensor.tensor_content = part.tobytes()
            f.write(msg.SerializeToString())
    reader = MindSporeCkptFile(str(tmp_path / "pieces.ckpt"))
    assert len(reader.pieces["big"]) == 3
    for axis, start, stop in slices_of(big):
        np.testing.assert_array_equal(reader.get_slice("big", axis, start, stop),
                                      np.take(big, np.arange(start, stop), axis))
    ms.save_checkpoint([{"name": "h", "data": ms.Tensor(big.astype(np.float16))}], str(tmp_path / "h.ckpt"))
    np.testing.assert_array_equal(MindSporeCkptFile(str(tmp_path / "h.ckpt")).get_slice("h", 1, 2, 5),
                                  big.astype(np.float16)[:, 2:5])
