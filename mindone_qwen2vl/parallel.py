"""Tensor parallelism across the cards of one MindSpore distributed job (msrun), for models too big for one card.

Layout of the decoder over N ranks (every rank runs every layer on its share of the width):
- attention: q/k/v split by output columns (whole heads), o_proj by input rows, then an all-reduce;
  when N exceeds the KV heads, each KV head is replicated on the N / num_key_value_heads ranks that share it;
- MLP: gate/up split by output columns, down_proj by input rows, then an all-reduce;
- embedding: each rank holds a range of the vocabulary and looks up only its ids; an all-reduce sums the rows;
- lm_head: each rank computes the logits of its vocabulary range; an all-gather puts them side by side;
- norms, rotary tables and the vision tower are replicated: the tower (675M parameters) is under 1% of 72B,
  so replicating it costs little memory and keeps its per-frame attention layout untouched.

Communication is MindSpore's own (`ops.AllReduce` / `ops.AllGather` on the world group: HCCL on Ascend,
MindSpore's CPU collectives elsewhere); the job is started by `msrun`, which gives every process its rank.
The model is built whole with lazy placeholders (no memory), sharded in place by `shard_model`, then
`loading.load_weights` asks each sharded layer which slice of each checkpoint tensor it holds and reads
only that slice, so a rank holds and reads about 1/N of the decoder.
"""
import os

import numpy as np
from mindspore import Tensor, nn, ops

from .layers import Linear, new_param

_LAUNCH_HINT = "msrun --worker_num={n} --local_worker_num={n} your_script.py ..."


# ---------------------------------------------------------------------------------------------- ranks
def _communication():
    from mindspore import communication

    return communication


def _launched_as_worker():
    # msrun sets MS_ROLE for each process it starts; a rank table / OpenMPI launch sets these instead.
    return any(os.environ.get(k) for k in ("MS_ROLE", "RANK_TABLE_FILE", "OMPI_COMM_WORLD_SIZE"))


def _initialized():
    return _communication().GlobalComm.INITED


def init_tensor_parallel(size=None):
    """Join the distributed job once and return (rank, world size).

    size: the tensor-parallel degree the caller wants; it must equal the number of processes of the job.
    Outside a distributed job, size None or 1 gives (0, 1); a larger size is an error saying how to launch.
    """
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    comm = _communication()
    if not _initialized():
        if not _launched_as_worker():
            if size in (None, 1):
                return 0, 1
            raise RuntimeError(
                f"tensor_parallel_size={size} needs {size} processes of one MindSpore distributed job, but this "
                f"process was not started by msrun: launch it as `{_LAUNCH_HINT.format(n=size)}`"
            )
        comm.init()
    rank, world = comm.get_rank(), comm.get_group_size()
    if size is not None and size != world:
        raise ValueError(
            f"tensor_parallel_size={size} but the distributed job has {world} processes: every process holds one "
            f"shard, so launch `{_LAUNCH_HINT.format(n=size)}`"
        )
    return rank, world


def get_rank():
    return _communication().get_rank() if _initialized() else 0


def get_world_size():
    return _communication().get_group_size() if _initialized() else 1


def is_main_rank():
    """True on rank 0 (and in a single process): the process that prints and writes files."""
    return get_rank() == 0


def _world_group():
    return _communication().GlobalComm.WORLD_COMM_GROUP


def same_on_all_ranks(value: int) -> int:
    """Rank 0's integer on every rank. Host-side choices that feed the next step (the sampling seed) must
    agree, or the ranks would feed different tokens and stop at different steps, one waiting forever in a
    collective the other never reaches."""
    if get_world_size() == 1:
        return value
    # int32: HCCL's broadcast documents no int64 (the seeds are drawn below 2**31)
    x = Tensor(np.array([value], np.int32))
    return int(ops.Broadcast(0, group=_world_group())((x,))[0].asnumpy()[0])


_WIRE_DTYPES = (np.int32, np.int64, np.float32, np.float64, np.bool_, np.uint8)
_HEADER_WORDS = 256


def broadcast_arrays(arrays=None):
    """Rank 0's list of numpy arrays (any of _WIRE_DTYPES, or None) on every rank; the other ranks pass
    nothing. The bytes travel as int32 words, so every value arrives bit for bit (a float64 rounded to
    float32 on the way would give the ranks different rotary positions). Two broadcasts: a header of dtypes
    and shapes, then one payload."""
    bcast = ops.Broadcast(0, group=_world_group())
    header = np.zeros(_HEADER_WORDS, np.int32)
    payload = b""
    if get_rank() == 0:
        fields = [len(arrays)]
        for a in arrays:
            if a is None:
                fields += [-1, 0]
                continue
            a = np.ascontiguousarray(a)
            fields += [[np.dtype(t) for t in _WIRE_DTYPES].index(a.dtype), a.ndim, *a.shape]
            payload += a.tobytes()
        if len(fields) + 1 > _HEADER_WORDS:
            raise ValueError(f"{len(arrays)} arrays do not fit the broadcast header")
        header[0] = len(payload)
        header[1:len(fields) + 1] = fields
    header = bcast((Tensor(header),))[0].asnumpy()
    size = int(header[0])
    words = np.zeros(max(1, -(-size // 4)), np.int32)
    if get_rank() == 0:
        words.view(np.uint8)[:size] = np.frombuffer(payload, np.uint8)
    data = bcast((Tensor(words),))[0].asnumpy().view(np.uint8)[:size]
    out, at, offset = [], 2, 0
    for _ in range(int(header[1])):
        code, ndim = int(header[at]), int(header[at + 1])
        shape = tuple(int(d) for d in header[at + 2:at + 2 + ndim])
        at += 2 + ndim
        if code < 0:
            out.append(None)
            continue
        dtype = np.dtype(_WIRE_DTYPES[code])
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(data[offset:offset + n].view(dtype).reshape(shape).copy())  # writable, its own memory
        offset += n
    return out


# ---------------------------------------------------------------------------------------------- the split
def check_tensor_parallel(text_config, size):
    """Raise a ValueError naming the numbers when the decoder cannot be split over `size` ranks."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    problems = []
    if heads % size:
        problems.append(f"num_attention_heads {heads} is not divisible by tensor_parallel_size {size}")
    if size <= kv and kv % size:
        problems.append(f"num_key_value_heads {kv} is not divisible by tensor_parallel_size {size}")
    if size > kv and size % kv:
        problems.append(f"tensor_parallel_size {size} is larger than num_key_value_heads {kv} but not a multiple "
                        f"of it, so the KV heads cannot be replicated evenly")
    if text_config.intermediate_size % size:
        problems.append(f"intermediate_size {text_config.intermediate_size} is not divisible by "
                        f"tensor_parallel_size {size}")
    if text_config.vocab_size % size:
        problems.append(f"vocab_size {text_config.vocab_size} is not divisible by tensor_parallel_size {size}")
    if problems:
        raise ValueError(f"cannot split the decoder over tensor_parallel_size={size}: " + "; ".join(problems))


def head_layout(text_config, rank, size):
    """(q heads, kv heads, first q head, first kv head) of `rank`.

    With size <= KV heads each rank owns a contiguous block of query heads and of KV heads. With more ranks
    than KV heads, each rank owns H/size query heads, all belonging to one KV head, which it holds a copy of.
    """
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    local_heads = heads // size
    if size <= kv:
        local_kv = kv // size
        return local_heads, local_kv, rank * local_heads, rank * local_kv
    return local_heads, 1, rank * local_heads, rank // (size // kv)


# ---------------------------------------------------------------------------------------------- layers
def _piece_of(param, axis, start, stop, whole_shape):
    """loading.parameter_pieces entry: the parameter is [start, stop) along `axis` of its own checkpoint tensor."""
    return {param.name: (axis, start, stop, tuple(whole_shape))}


class ColumnParallelLinear(Linear):
    """Output features [start, stop) of a Linear (rows of its weight and bias): each rank computes its share of
    the outputs, which the next layer (a RowParallelLinear) takes as its share of the input."""

    def __init__(self, linear, start, stop):
        super().__init__(linear.in_features, stop - start, bias=linear.bias is not None, dtype=linear.weight.dtype)
        self.span = (start, stop)
        self.global_out = linear.out_features

    def checkpoint_pieces(self):
        start, stop = self.span
        pieces = _piece_of(self.weight, 0, start, stop, (self.global_out, self.in_features))
        if self.bias is not None:
            pieces.update(_piece_of(self.bias, 0, start, stop, (self.global_out,)))
        return pieces


class RowParallelLinear(Linear):
    """Input features [start, stop) of a Linear (columns of its weight): each rank multiplies its share of
    the input and an all-reduce sums the partial products. The bias, whole on every rank, is added once after."""

    def __init__(self, linear, start, stop):
        super().__init__(stop - start, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
        self.span = (start, stop)
        self.global_in = linear.in_features
        self.all_reduce = ops.AllReduce(group=_world_group())

    def product(self, x, weight):
        return self.all_reduce(self.matmul(x, weight))

    def checkpoint_pieces(self):
        start, stop = self.span
        return _piece_of(self.weight, 1, start, stop, (self.out_features, self.global_in))


class VocabParallelEmbedding(nn.Cell):
    """Rows [start, stop) of the embedding table. Ids outside the range give zero rows; the all-reduce sums
    the one non-zero row of each id, so the result equals the whole table's lookup exactly."""

    def __init__(self, embedding, start, stop):
        super().__init__()
        vocab, dim = embedding.weight.shape
        self.weight = new_param((stop - start, dim), embedding.weight.dtype)
        self.span = (start, stop)
        self.global_shape = (vocab, dim)
        self.all_reduce = ops.AllReduce(group=_world_group())

    def construct(self, ids):
        local = ids - self.span[0]
        inside = ops.logical_and(local >= 0, local < self.span[1] - self.span[0])
        rows = ops.gather(self.weight, local * inside.astype(local.dtype), 0)
        return self.all_reduce(rows * inside.expand_dims(-1).astype(rows.dtype))

    def checkpoint_pieces(self):
        return _piece_of(self.weight, 0, *self.span, self.global_shape)


class VocabParallelLMHead(nn.Cell):
    """Logits of vocabulary rows [start, stop) on each rank, all-gathered into the whole vocabulary.

    `weight` is the embedding's Parameter when the embeddings are tied (both hold the same vocabulary range).
    """

    def __init__(self, lm_head, start, stop, weight=None):
        super().__init__()
        self.in_features = lm_head.in_features
        self.out_features = lm_head.out_features
        self.weight = weight if weight is not None else new_param((stop - start, self.in_features),
                                                                  lm_head.weight.dtype)
        self.span = (start, stop)
        # W_local @ x^T is [local vocab, tokens]: AllGather concatenates along the first axis, which is then
        # the vocabulary, so one transpose at the end gives [tokens, vocab].
        self.matmul = ops.MatMul(transpose_b=True)
        self.all_gather = ops.AllGather(group=_world_group())

    def construct(self, x):
        shape = x.shape
        local = self.matmul(self.weight, x.reshape(-1, shape[-1]).astype(self.weight.dtype))
        logits = self.all_gather(local).transpose(1, 0)
        return logits.reshape(shape[:-1] + (self.out_features,))

    def checkpoint_pieces(self):
        return _piece_of(self.weight, 0, *self.span, (self.out_features, self.in_features))


# ---------------------------------------------------------------------------------------------- sharding
def _replace(parent, attr, cell, names):
    """Put `cell` at parent.attr and give its parameters the names of the cell it replaces.

    Assigning a cell renames its parameters with the attribute name only ('q_proj.weight'), so the
    checkpoint names (e.g. 'model.layers.0.self_attn.q_proj.weight') are set back afterwards.
    """
    setattr(parent, attr, cell)
    for key, name in names.items():
        param = getattr(cell, key)
        if param is not None:
            param.name = name


def _names(cell):
    return {key: getattr(cell, key).name for key in ("weight", "bias") if getattr(cell, key, None) is not None}


def shard_model(model, rank, size):
    """Split a built (not yet loaded) Qwen2VLForConditionalGeneration over `size` ranks, in place.

    The attention cells get this rank's head counts; their projections, the MLPs, the embedding and lm_head
    are replaced by parallel layers that keep the checkpoint's parameter names.
    """
    text = model.config.text_config
    check_tensor_parallel(text, size)
    if size == 1:
        return model
    local_heads, local_kv, q0, kv0 = head_layout(text, rank, size)
    d = text.head_dim
    q_span = (q0 * d, (q0 + local_heads) * d)
    kv_span = (kv0 * d, (kv0 + local_kv) * d)
    inter = text.intermediate_size // size
    mlp_span = (rank * inter, (rank + 1) * inter)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # Column-parallel q, k, v (this rank's heads) and gate, up; row-parallel o and down.
        for name, span in (("q_proj", q_span), ("k_proj", kv_span), ("v_proj", kv_span)):
            _replace(attn, name, ColumnParallelLinear(getattr(attn, name), *span), _names(getattr(attn, name)))
        _replace(attn, "o_proj", RowParallelLinear(attn.o_proj, *q_span), _names(attn.o_proj))
        attn.num_heads, attn.num_kv_heads = local_heads, local_kv
        for name in ("gate_proj", "up_proj"):
            _replace(mlp, name, ColumnParallelLinear(getattr(mlp, name), *mlp_span), _names(getattr(mlp, name)))
        _replace(mlp, "down_proj", RowParallelLinear(mlp.down_proj, *mlp_span), _names(mlp.down_proj))
    model.model.rotary_emb.set_heads(local_heads, local_kv)

    per = text.vocab_size // size
    vocab_span = (rank * per, (rank + 1) * per)
    old_embed, old_head = model.model.embed_tokens, model.lm_head
    embed = VocabParallelEmbedding(old_embed, *vocab_span)
    _replace(model.model, "embed_tokens", embed, _names(old_embed))
    tied = embed.weight if model.config.tie_word_embeddings else None
    _replace(model, "lm_head", VocabParallelLMHead(old_head, *vocab_span, weight=tied), _names(old_head))
    if tied is not None:
        tied.name = _names(old_embed)["weight"]  # lm_head's assignment renamed the shared Parameter
    model.tensor_parallel = model.model.tensor_parallel = (rank, size)
    return model
