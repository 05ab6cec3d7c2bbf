"""Attention backends, the one place that knows how attention is computed.

- "eager": matmul + float32 softmax, runs everywhere (CPU and Ascend); the numerical reference.
- "flash_attention_2": `ops.flash_attention_score` (Ascend only; see precision.py for when it is chosen).

Vision attention is block-diagonal per frame: each frame of each image/video attends only to itself. The
eager path batches the frames as [frames, heads, L, L] (padded to the longest frame when sizes differ), so
memory is the block diagonal only, never a mask over every patch.
"""
import mindspore as ms
from mindspore import ops

from .layers import split

ATTN_IMPLEMENTATIONS = ("eager", "flash_attention_2")

# The flash kernel, looked up at call time so that CPU tests can put an emulation of its documented
# semantics in its place (tests/flash_emulation.py); on Ascend it is always MindSpore's own.
FLASH_KERNEL = {"fn": None}


def flash_kernel():
    fn = FLASH_KERNEL["fn"]
    return fn if fn is not None else ops.flash_attention_score

_bmm_t = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def _softmax_fp32(scores, dtype):
    # Scores arrive in float32 (masks hold float32's most negative value, which is -inf in fp16 and would
    # turn a fully masked padding row into NaN); softmax in float32 as HF does, then back to the compute dtype.
    return ops.softmax(scores, -1).astype(dtype)


SCORES_BUDGET = 256 * 2 ** 20  # bytes of float32 attention scores held at once by the eager paths


def _query_block(rows, length):
    """Query rows per block so that rows x block x length float32 scores fit SCORES_BUDGET."""
    per_query = rows * length * 4
    return max(1, min(length, SCORES_BUDGET // per_query))


def vision_attention(q, k, v, layout, scale, impl="eager", flash_dtype=ms.float16):
    """q, k, v: [N, heads, head_dim] for all patches of all frames -> [N, heads * head_dim].

    layout (from modeling_vision.attention_layout): (frame_len, gather_idx, key_bias, unpad_idx, frame_ends).
    eager: frame_len is the common frame length when all frames are equal, else the three tables pad frames
    to the longest. flash: frame_ends, the cumulative frame lengths, are the kernel's actual_seq_qlen/kvlen
    in the TND layout (one variable-length sequence per frame, no mask).
    """
    n, heads, dim = q.shape
    frame_len, gather_idx, key_bias, unpad_idx, frame_ends = layout
    if impl == "flash_attention_2":
        out = flash_kernel()(q.astype(flash_dtype), k.astype(flash_dtype), v.astype(flash_dtype), heads,
                             actual_seq_qlen=frame_ends, actual_seq_kvlen=frame_ends, scalar_value=scale,
                             input_layout="TND")
        return out.astype(q.dtype).reshape(n, heads * dim)
    if gather_idx is None:
        n_frames, lmax = n // frame_len, frame_len
    else:
        n_frames, lmax = key_bias.shape
        q = ops.gather(q, gather_idx, 0)
        k = ops.gather(k, gather_idx, 0)
        v = ops.gather(v, gather_idx, 0)
    # [F, L, H, D] -> [F, H, L, D]
    q = q.reshape(n_frames, lmax, heads, dim).transpose(0, 2, 1, 3)
    k = k.reshape(n_frames, lmax, heads, dim).transpose(0, 2, 1, 3)
    v = v.reshape(n_frames, lmax, heads, dim).transpose(0, 2, 1, 3)
    bias = None if key_bias is None else key_bias.reshape(n_frames, 1, 1, lmax)
    # Softmax is per query row, so query blocks are exact; blocks bound the float32 scores (a 1372x2044
    # image is one 14k-patch frame: 16 heads x 14k^2 scores would be 13 GB at once).
    block = _query_block(n_frames * heads, lmax)
    sizes = [min(block, lmax - start) for start in range(0, lmax, block)]
    q_blocks = [q] if len(sizes) == 1 else split(q, sizes, 2)  # Slice: StridedSlice is slow on CPU
    outs = []
    for q_block in q_blocks:
        if outs:
            # Order the blocks: without it graph mode may compute every block's scores before any softmax,
            # holding them all at once.
            q_block = ops.depend(q_block, outs[-1])
        scores = _bmm_t(q_block, k)
        if scale != 1.0:
            scores = scores * scale
        scores = scores.astype(ms.float32)
        if bias is not None:
            scores = scores + bias
        outs.append(_bmm(_softmax_fp32(scores, q.dtype), v))
    out = outs[0] if len(outs) == 1 else ops.cat(outs, 2)
    out = out.transpose(0, 2, 1, 3).reshape(n_frames * lmax, heads * dim)
    if unpad_idx is not None:
        out = ops.gather(out, unpad_idx, 0)
    return out


def decoder_attention(q, k, v, mask, impl="eager", flash_dtype=ms.float16):
    """Grouped-query attention.

    q: [B, S, H, D], already multiplied by the attention scale (the rotary tables carry it, see
    modeling_text.Qwen2VLRotaryEmbedding); k, v: [B, KVH, L, D]; mask: additive [B, 1, S, L] (0 or a large
    negative). Returns [B * S, H * D].
    """
    b, s, heads, d = q.shape
    length = k.shape[2]
    if impl == "flash_attention_2":
        # BNSD with the KV heads as they are (the kernel takes N2 dividing N1); its mask is boolean, True
        # where a key is discarded, the causal and padding pattern of the additive mask.
        discard = mask < -1.0
        out = flash_kernel()(q.transpose(0, 2, 1, 3).astype(flash_dtype), k.astype(flash_dtype),
                             v.astype(flash_dtype), heads, attn_mask=discard, scalar_value=1.0, input_layout="BNSD",
                             sparse_mode=0)
        return out.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b * s, heads * d)
    if s == 1:
        return _grouped_attention(q, k, v, mask)
    # A prompt: query blocks bound the float32 scores as in the vision path (softmax is per query row, so
    # blocks are exact); a 4000-token prompt of the 2B model would otherwise hold 12 x 4000^2 scores per copy.
    block = _query_block(b * heads, length)
    if block >= s:
        return _grouped_attention(q, k, v, mask)
    sizes = [min(block, s - start) for start in range(0, s, block)]
    outs = []
    for q_block, mask_block in zip(split(q, sizes, 1), split(mask, sizes, 2)):
        if outs:
            q_block = ops.depend(q_block, outs[-1])  # one block's scores at a time, as in vision_attention
        outs.append(_grouped_attention(q_block, k, v, mask_block).reshape(b, -1, heads * d))
    return ops.cat(outs, 1).reshape(b * s, heads * d)


def _grouped_attention(q, k, v, mask):
    """Eager grouped-query attention: q [B, S, H, D], k/v [B, KVH, L, D], mask [B, 1, S, L] -> [B * S, H * D]."""
    b, s, heads, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    n_rep = heads // kv_heads
    # The query heads of one KV head become the rows of one product ([B, KVH, n_rep * S, D]) instead of
    # repeating K and V n_rep times. With one query position (decode) that layout is a plain reshape.
    if s == 1:
        qg = q.reshape(b, kv_heads, n_rep, d)
    else:
        qg = q.reshape(b, s, kv_heads, n_rep, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, n_rep * s, d)
    scores = _bmm_t(qg, k).astype(ms.float32).reshape(b, kv_heads, n_rep, s, length)
    scores = scores + mask.reshape(b, 1, 1, s, length)
    probs = _softmax_fp32(scores, q.dtype).reshape(b, kv_heads, n_rep * s, length)
    out = _bmm(probs, v)
    if s == 1:
        return out.reshape(b, heads * d)
    return out.reshape(b, kv_heads, n_rep, s, d).transpose(0, 3, 1, 2, 4).reshape(b * s, heads * d)
