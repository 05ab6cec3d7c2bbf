"""Attention backends, the one place that knows how attention is computed.

- "eager": matmul + float32 softmax, runs everywhere (CPU and Ascend); the numerical reference.
- "flash_attention_2": `ops.flash_attention_score` (Ascend only; see precision.py for when it is chosen), in
  the documented BNSD layout with a boolean mask of the discarded keys.
- "sdpa": the CPU backend's fused kernel (cpu_kernels.py, csrc/sdpa.cc), float32, for the vision tower and the
  prompt; it never holds the scores. Its decode steps run csrc/decode.cc's layer kernels
  (generation.DecodeOneToken), not these functions.

Queries arrive already multiplied by the attention scale (the rotary tables carry it). Eager attention holds
float32 scores for every query at once, so callers with long sequences split the queries into blocks on the
host (`query_blocks`): softmax is per query row, so blocks are exact, and each block is one more call of the
same compiled graph instead of a graph per size.

A long causal prompt also attends in blocks inside one graph (`causal_blocks`, `causal_prompt_attention`): each
block's queries attend only the keys up to their own last position, since the later ones are masked out anyway.
That halves the work, and the smaller scores stay in the CPU's cache.
"""
import mindspore as ms
import numpy as np
from mindspore import ops

from .kernels import broadcast

SCORES_BUDGET = 256 * 2 ** 20  # bytes of float32 eager attention scores held at once
FUSED = ("flash_attention_2", "sdpa")  # backends that never hold the scores: no query blocks
MASK_MIN = -3.4028234663852886e38  # float32's most negative value: a key that weighs exactly 0 after softmax

_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def query_blocks(queries, length, rows, impl="eager"):
    """[(start, stop)] query ranges whose float32 scores (rows x block x length, `rows` = batch x heads) fit
    SCORES_BUDGET; one range when they all fit or the backend holds no scores (flash, sdpa)."""
    if impl in FUSED:
        return [(0, queries)]
    block = max(1, min(queries, SCORES_BUDGET // max(1, rows * length * 4)))
    return [(start, min(start + block, queries)) for start in range(0, queries, block)]


# Causal blocks in one graph (eager only). Measured on the development CPU (AMD EPYC, 2 cores), one prompt
# attention of 4 heads x 16 dims, in ms, as one block / 8 blocks / 16 blocks: 500 positions 1.8 / 5.2 / 6.4,
# 1000: 9.0 / 7.1 / 8.8, 2000: 35.5 / 19.9 / 19.3, 4000: 124 / 69 / 48. Each block costs its own kernels (about
# 0.4 ms on that CPU), so a call stays one block up to CAUSAL_FROM bytes of scores (1000 positions at 4 heads),
# and takes CAUSAL_BLOCKS beyond. One count only: the count is a constant of the compiled graph, and every
# count is one more graph to compile (8 blocks would gain about 2 ms a layer around 1000 positions).
CAUSAL_FROM = 16 * 2 ** 20
CAUSAL_BLOCKS = 16


def causal_blocks(queries, length, rows, impl="eager"):
    """How many causal blocks one call of the prompt attention takes for `queries` queries over `length` keys
    (`rows` = heads): 1 (a single block over all the keys) or CAUSAL_BLOCKS."""
    if impl in FUSED or queries < CAUSAL_BLOCKS or rows * queries * length * 4 <= CAUSAL_FROM:
        return 1
    return CAUSAL_BLOCKS


def causal_edges(start, stop, count):
    """The query ranges [(a, z)] of `count` causal blocks of the queries start..stop-1 (equal sizes)."""
    edges = np.linspace(start, stop, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def flash_kernel(policy):
    """The fused kernel of a precision policy: under "sdpa" the CPU kernels (cpu_kernels.Kernels), else the flash
    kernel, MindSpore's unless the policy names another one (CPU tests pass an emulation of its documented
    semantics, tests/flash_emulation.py)."""
    if policy.attn_implementation == "sdpa":
        from . import cpu_kernels
        return cpu_kernels.kernels()
    return policy.flash_kernel or ops.flash_attention_score


def layer_kernels(policy):
    """The CPU kernels that also run whole layers (csrc/decode.cc, prompt.cc, vision.cc) under `policy`, or None:
    they come with the "sdpa" attention of the CPU backend and compute in float32. (Each user adds its own
    conditions: the cache's dtype, tensor parallelism, oneDNN's sgemm.)"""
    if policy.attn_implementation != "sdpa" or policy.compute_dtype != ms.float32:
        return None
    return flash_kernel(policy)


FLASH_MAX_HEAD_DIM = 512
FLASH_MAX_BATCH = 2048  # ops.flash_attention_score documents B from 1 to 2k


def segment_batches(count, impl="eager"):
    """[(start, stop)] ranges of `count` equal-length segments (frames, windows) attended in one call: all of
    them, except that the flash kernel documents at most FLASH_MAX_BATCH batch entries (a long video, or the
    windows of many images, can have more)."""
    step = FLASH_MAX_BATCH if impl == "flash_attention_2" else max(1, count)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def check_flash_head_dim(d):
    """The flash kernel documents head sizes that are multiples of 16, at most 512 (Qwen2-VL's 80 and 128
    are). Checked when a graph is built (d is a constant then), before the kernel could be given a bad size."""
    if d % 16 or d > FLASH_MAX_HEAD_DIM:
        raise ValueError(f"flash_attention_2 needs a head size that is a multiple of 16 and at most "
                         f"{FLASH_MAX_HEAD_DIM} (ops.flash_attention_score); this model's is {d}: use "
                         "attn_implementation='eager'")


def _fp32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)  # the dtype test is a constant in a graph


def _softmax_fp32(scores, dtype):
    # Scores arrive in float32 (masks hold float32's most negative value, which is -inf in fp16 and would
    # turn a fully masked padding row into NaN); softmax in float32 as HF does, then back to the compute dtype.
    return ops.softmax(scores, -1).astype(dtype)


def frame_attention(q, k, v, impl="eager", flash_dtype=ms.float16, kernel=None):
    """Attention within frames of equal length (the vision tower), heads first: q [H, F, Lq, D], k and v
    [H, F, L, D] -> [F * Lq, H * D]. No mask: every key of a frame is a real patch."""
    heads, d = q.shape[0], q.shape[3]
    if impl == "flash_attention_2":
        check_flash_head_dim(d)
        bnsd = (1, 0, 2, 3)
        out = kernel(q.transpose(bnsd).astype(flash_dtype), k.transpose(bnsd).astype(flash_dtype),
                     v.transpose(bnsd).astype(flash_dtype), heads, scalar_value=1.0, input_layout="BNSD",
                     sparse_mode=0).astype(q.dtype)
        return out.transpose(0, 2, 1, 3).reshape(-1, heads * d)
    if impl == "sdpa":
        out = kernel.frame(_fp32(q), _fp32(k), _fp32(v)).astype(q.dtype)
        return out.transpose(1, 2, 0, 3).reshape(-1, heads * d)
    out = _bmm(_softmax_fp32(_bmm_t(q, k).astype(ms.float32), q.dtype), v)
    return out.transpose(1, 2, 0, 3).reshape(-1, heads * d)


def prompt_attention(q, k, v, mask, kv_index, impl="eager", flash_dtype=ms.float16, kernel=None,
                     per_head_mask=False):
    """Attention of one sequence's queries over its keys, heads first: q [H, Sq, D], k and v [KVH, S, D], mask
    additive float32 [H, Sq, S] (per_head_mask) or [1, Sq, S] (0 or MASK_MIN) -> [Sq, H * D]. kv_index [H]: the KV
    head of each query head.

    Heads first and without reshapes that depend on Sq or S: in a dynamic-shape graph on the CPU backend a
    transpose costs about 4x its static time, and each reshape computed from a dimension costs host-side shape
    arithmetic at every call."""
    heads, d = q.shape[0], q.shape[2]
    if impl == "flash_attention_2":
        check_flash_head_dim(d)
        # BNSD with the KV heads as they are (the kernel takes N2 dividing N1); its mask is boolean, True
        # where a key is discarded, [B, 1, S1, S2].
        out = kernel(q.expand_dims(0).astype(flash_dtype), k.expand_dims(0).astype(flash_dtype),
                     v.expand_dims(0).astype(flash_dtype), heads, attn_mask=(mask < -1.0).expand_dims(0),
                     scalar_value=1.0, input_layout="BNSD", sparse_mode=0)
        return out[0].astype(q.dtype).transpose(1, 0, 2).reshape(-1, heads * d)
    # Keys and values per query head (a gather of the KV heads): the scores [H, Sq, S] then take the mask
    # elementwise (CPU BatchMatMul does not broadcast the grouped layout's batch dimensions).
    kh, vh = ops.gather(k, kv_index, 0), ops.gather(v, kv_index, 0)
    scores = _bmm_t(q, kh).astype(ms.float32)
    probs = _softmax_fp32(scores + (mask if per_head_mask else broadcast(mask, scores)), q.dtype)
    return _bmm(probs, vh).transpose(1, 0, 2).reshape(-1, heads * d)


def fused_causal_attention(q, k, v, positions, kernel):
    """Causal attention with the CPU's fused kernel: q [H, Sq, D] at the sequence positions `positions` [Sq]
    int32, k and v [KVH, S, D] (positions 0..S-1) -> [Sq, H * D]; query i sees the keys 0..positions[i]."""
    heads, d = q.shape[0], q.shape[2]
    out = kernel.causal(_fp32(q), _fp32(k), _fp32(v), positions).astype(q.dtype)
    return out.transpose(1, 0, 2).reshape(-1, heads * d)


def causal_prompt_attention(q, k, v, blocks, kv_index, per_head_mask=False):
    """Eager attention of one sequence's queries in causal blocks: q [H, Sq, D], k and v [KVH, S, D]; blocks:
    (rows, keys, mask) per block, the block's query rows of q [n], the key positions it attends [m] (0..m-1,
    m = the block's last position + 1), its additive float32 mask [H or 1, n, m] -> [Sq, H * D], the blocks'
    rows in order."""
    heads, d = q.shape[0], q.shape[2]
    kh, vh = ops.gather(k, kv_index, 0), ops.gather(v, kv_index, 0)
    outs = []
    for rows, keys, mask in blocks:
        scores = _bmm_t(ops.gather(q, rows, 1), ops.gather(kh, keys, 1)).astype(ms.float32)
        probs = _softmax_fp32(scores + (mask if per_head_mask else broadcast(mask, scores)), q.dtype)
        outs.append(_bmm(probs, ops.gather(vh, keys, 1)))
    return ops.cat(outs, 1).transpose(1, 0, 2).reshape(-1, heads * d)


def decode_attention(q, k, v, mask, impl="eager", flash_dtype=ms.float16, kernel=None):
    """One query per row over the cache (static shapes): q [B, H, D], k and v [B, KVH, L, D], mask additive
    float32 [B, 1, 1, L] -> [B, H * D]."""
    b, heads, d = q.shape
    if impl == "flash_attention_2":
        check_flash_head_dim(d)
        out = kernel(q.reshape(b, heads, 1, d).astype(flash_dtype), k.astype(flash_dtype), v.astype(flash_dtype),
                     heads, attn_mask=mask < -1.0, scalar_value=1.0, input_layout="BNSD", sparse_mode=0)
        return out.astype(q.dtype).reshape(b, heads * d)
    kv_heads = k.shape[1]
    n_rep = heads // kv_heads
    # The query heads of one KV head are the rows of one product ([B, KVH, n_rep, D]) instead of repeating K
    # and V n_rep times.
    scores = _bmm_t(q.reshape(b, kv_heads, n_rep, d), k).astype(ms.float32) + mask
    out = _bmm(_softmax_fp32(scores, q.dtype), v)
    return out.reshape(b, heads * d)
