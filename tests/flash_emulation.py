"""An emulation of `ops.flash_attention_score` from its documented semantics, for CPU tests.

The kernel only exists on Ascend (Atlas A2). This emulation follows the MindSpore 2.10 docstring: layouts
BSH/BNSD/SBH/BSND/TND; N2 must divide N1 = head_num; D a multiple of 16 (at most 512); `attn_mask` is bool or
uint8 with True/1 meaning *discard*, shaped (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) for sparse_mode 0/1;
sparse_mode 2/3 are the left-up / right-down causal modes with a (2048, 2048) compressed mask; TND needs
cumulative, non-decreasing actual_seq_qlen/kvlen ending at T1/T2, with no zero-length key sequence;
`scalar_value` scales q.k. It checks every documented constraint it can, so a wrong layout, head count or
mask convention in our call fails here instead of on the NPU. float32 inputs are accepted (the real kernel
takes fp16/bf16) so that the plumbing can be compared with eager attention at fp32 precision.
"""
import mindspore as ms
from mindspore import ops

LAYOUTS = ("BSH", "BNSD", "SBH", "BSND", "TND")
CALLS = []  # (layout, sparse_mode, query shape, key shape, attn_mask (shape, dtype) or None) of every call, so tests
#           can check the path was taken


def _to_bnsd(x, layout, heads):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).transpose(1, 2, 0, 3)
    raise ValueError(layout)


def _from_bnsd(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _attend(q, k, v, discard, scale):
    """q [B, N1, S1, D], k/v [B, N2, S2, D], discard bool broadcastable to [B, N1, S1, S2] or None."""
    n1, n2 = q.shape[1], k.shape[1]
    if n2 != n1:
        k = ops.repeat_interleave(k, n1 // n2, 1)
        v = ops.repeat_interleave(v, n1 // n2, 1)
    scores = ops.matmul(q.astype(ms.float32), k.astype(ms.float32).swapaxes(-1, -2)) * scale
    if discard is not None:
        scores = ops.masked_fill(scores, discard, ms.Tensor(-1e30, ms.float32))
        # A query row with every key discarded is undefined in the kernel's docs: give it NaN, the worst it
        # could be, so that a parity test fails if such a row ever reaches a real output.
        all_discarded = ops.broadcast_to(discard, scores.shape).all(-1, keep_dims=True)
        scores = ops.masked_fill(scores, all_discarded, ms.Tensor(float("nan"), ms.float32))
    probs = ops.softmax(scores, -1)
    return ops.matmul(probs, v.astype(ms.float32)).astype(q.dtype)


def _causal_discard(s1, s2, right_down):
    rows = ops.arange(s1).reshape(s1, 1)
    cols = ops.arange(s2).reshape(1, s2)
    shift = s2 - s1 if right_down else 0
    return cols > rows + shift


def emulated_flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None,
                                   padding_mask=None, attn_mask=None, prefix=None, actual_seq_qlen=None,
                                   actual_seq_kvlen=None, keep_prob=1.0, scalar_value=1.0, pre_tokens=2147483647,
                                   next_tokens=2147483647, inner_precise=0, input_layout="BSH", sparse_mode=0):
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout {input_layout!r} is not one of {LAYOUTS}")
    if query.dtype not in (ms.float16, ms.bfloat16, ms.float32):
        raise TypeError(f"query dtype {query.dtype} is not float16/bfloat16")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError("query, key and value must have the same dtype")
    if real_shift is not None or drop_mask is not None or prefix is not None or keep_prob != 1.0:
        raise NotImplementedError("the emulation covers inference calls only (no pse, dropout or prefix)")
    if sparse_mode not in (0, 1, 2, 3):
        raise RuntimeError(f"sparse_mode {sparse_mode} is not emulated")
    if attn_mask is not None and attn_mask.dtype not in (ms.bool_, ms.uint8):
        raise TypeError(f"attn_mask dtype {attn_mask.dtype} is not bool/uint8")
    if sparse_mode in (2, 3) and (attn_mask is None or tuple(attn_mask.shape) != (2048, 2048)):
        raise RuntimeError("sparse_mode 2/3 need the compressed (2048, 2048) attn_mask")
    mask = None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype)
    CALLS.append((input_layout, sparse_mode, tuple(query.shape), tuple(key.shape), mask))
    # Separate functions per layout: graph mode wants every variable defined on both sides of a branch.
    if input_layout == "TND":
        return _tnd(query, key, value, head_num, actual_seq_qlen, actual_seq_kvlen, scalar_value, sparse_mode)
    return _dense(query, key, value, head_num, attn_mask, scalar_value, input_layout, sparse_mode)


def _check_batch(b):
    if b > 2048:  # documented range of B: 1 to 2k (a dynamic B is -1 when the graph compiles)
        raise RuntimeError(f"batch {b} is above the kernel's documented 2048")


def _check_heads(head_num, n1, n2, d):
    if head_num != n1:
        raise RuntimeError(f"head_num {head_num} is not the number of query heads {n1}")
    if n1 % n2:
        raise RuntimeError(f"key/value heads {n2} must divide query heads {n1}")
    if d % 16 or d > 512:
        raise RuntimeError(f"head size {d} must be a multiple of 16, at most 512")


def _tnd(query, key, value, head_num, actual_seq_qlen, actual_seq_kvlen, scale, sparse_mode):
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise RuntimeError("TND needs actual_seq_qlen and actual_seq_kvlen")
    qlen, kvlen = list(actual_seq_qlen), list(actual_seq_kvlen)
    t1, n1, d = query.shape
    t2, n2 = key.shape[0], key.shape[1]
    _check_heads(head_num, n1, n2, d)
    if len(qlen) != len(kvlen):
        raise RuntimeError("actual_seq_qlen and actual_seq_kvlen must have the same length (the batch)")
    if qlen[-1] != t1 or kvlen[-1] != t2:
        raise RuntimeError(f"cumulative lengths must end at T1={t1}, T2={t2}; got {qlen[-1]}, {kvlen[-1]}")
    if any(b < a for a, b in zip([0] + qlen, qlen)) or any(b <= a for a, b in zip([0] + kvlen, kvlen)):
        raise RuntimeError("actual_seq lengths must be cumulative (non-decreasing, no empty key sequence)")
    outs, q0, k0 = [], 0, 0
    for q1, k1 in zip(qlen, kvlen):
        q = query[q0:q1].transpose(1, 0, 2).expand_dims(0)
        k = key[k0:k1].transpose(1, 0, 2).expand_dims(0)
        v = value[k0:k1].transpose(1, 0, 2).expand_dims(0)
        discard = _causal_discard(q1 - q0, k1 - k0, sparse_mode == 3) if sparse_mode in (2, 3) else None
        outs.append(_attend(q, k, v, discard, scale)[0].transpose(1, 0, 2))
        q0, k0 = q1, k1
    return ops.cat(outs, 0)


def _dense(query, key, value, head_num, attn_mask, scale, layout, sparse_mode):
    q = _to_bnsd(query, layout, head_num)
    n1, d = q.shape[1], q.shape[3]
    n2 = {"BNSD": key.shape[1], "BSND": key.shape[2]}.get(layout, key.shape[-1] // d)
    _check_heads(head_num, n1, n2, d)
    _check_batch(q.shape[0])
    k = _to_bnsd(key, layout, n2)
    v = _to_bnsd(value, layout, n2)
    s1, s2 = q.shape[2], k.shape[2]
    discard = None
    if sparse_mode in (2, 3):
        discard = _causal_discard(s1, s2, sparse_mode == 3)
    elif attn_mask is not None:
        shape = tuple(attn_mask.shape)
        b = q.shape[0]
        if shape not in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)):
            raise RuntimeError(f"attn_mask shape {shape} is not (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) "
                               f"= {(b, n1, s1, s2)}")
        discard = attn_mask.astype(ms.bool_)
    return _from_bnsd(_attend(q, k, v, discard, scale), layout)
