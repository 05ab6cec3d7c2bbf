"""Qwen2-VL vision tower: patch embedding, 2-D rotary, per-frame attention blocks, 2x2 PatchMerger.

Everything that depends on the image sizes (rotary positions, which patches attend to which, how queries are
split into blocks) is computed on the host in numpy by `vision_plan` and enters the graphs as index tensors.
The steps are declared with dynamic shapes (graphs.Step): one compilation serves every image size, frame
layout and number of images.

Qwen2.5-VL's tower (modeling_vision_qwen2_5_vl) is this one with other norms and MLP in its blocks and
attention within windows in most of them: windows are segments like frames (AttentionLayout), in a patch order
the plan gives, so the same steps run both.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import flash_kernel, frame_attention, layer_kernels, query_blocks, segment_batches
from .config import Qwen2VLVisionConfig
from .graphs import HotLayouts, Step, dynamic, like
from .kernels import PortableKernels, broadcast, kernels_for, rotate_half_matrix, split
from .layers import LayerNorm, Linear, layer_arguments, new_param
from .precision import PrecisionPolicy


# ---------------------------------------------------------------------------------------------- host plan
@dataclass
class AttentionLayout:
    """Which rows attend to which, for a sequence cut into consecutive segments (frames, or Qwen2.5-VL's
    windows) that attend only within themselves.

    Segments of the same length are batched: each group is [F, L] row indices (`groups[g]`), so attention runs
    on a [F, heads, L, L] batch with no padding and no mask. Query positions are split into blocks
    (`blocks[g]`) when a group's eager scores would not fit attention.SCORES_BUDGET. `unpad` takes the rows of
    the concatenated outputs (group by group, block by block, each [F, block]) back to sequence order; None
    when they are in that order already.
    """

    groups: List[np.ndarray]  # [F, L] int32 per segment length
    blocks: List[List[Tuple[int, int]]]  # query position ranges within the segments of each group
    unpad: Optional[np.ndarray]  # [N] int32
    bounds: np.ndarray  # [segments + 1] int32: segment s is the rows bounds[s]..bounds[s+1]-1 (csrc/vision.cc)


def segment_layout(lengths, num_heads=1, impl="eager") -> AttentionLayout:
    """The AttentionLayout of consecutive segments of the given lengths (zero lengths are skipped)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    groups, blocks, order = [], [], []
    for length in sorted(set(lengths.tolist()) - {0}):
        every = starts[lengths == length][:, None] + np.arange(length)[None, :]
        for first, last in segment_batches(len(every), impl):
            rows = every[first:last]
            groups.append(rows.astype(np.int32))
            blocks.append(query_blocks(length, length, len(rows) * num_heads, impl))
            order += [rows[:, a:b].reshape(-1) for a, b in blocks[-1]]
    order = np.concatenate(order)
    in_order = (order == np.arange(len(order))).all()
    unpad = None if in_order else np.argsort(order, kind="stable").astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return AttentionLayout(groups, blocks, unpad, bounds)


@dataclass
class VisionPlan:
    """Host-side tables for one call of the tower.

    Attention never crosses a frame (`frames`). Qwen2.5-VL's windowed blocks attend within windows instead
    (`windows`); the blocks then see the patches reordered window by window (`order`), which keeps each
    frame's patches together, so `frames` is laid out over that order too, and `restore` puts the merged
    features back in the processor's order at the end.
    """

    rot_pos: np.ndarray  # [N, 2] int32: (row, col) of each patch, in the order the blocks see the patches
    frames: AttentionLayout
    windows: Optional[AttentionLayout] = None
    order: Optional[np.ndarray] = None  # [N] int32: processor patch row of each row the blocks see
    restore: Optional[np.ndarray] = None  # [N / merge^2] int32: merger output row of each merged feature

    @property
    def groups(self):
        return self.frames.groups

    @property
    def blocks(self):
        return self.frames.blocks

    @property
    def unpad(self):
        return self.frames.unpad


def _merge_window_positions(h, w, merge):
    # Patches arrive from the processor grouped by 2x2 merge window: window row, window col, row, col.
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    rows = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def _windows(t, gh, gw, size):
    """Merged tokens of a (t, gh, gw) token grid in window order (size x size tokens per window, row-major
    windows per frame, row-major tokens per window; windows at the right and bottom edges are cut short)
    and the number of tokens of each window."""
    nh, nw = -(-gh // size), -(-gw // size)
    padded = np.full((t, nh * size, nw * size), -1, np.int64)
    padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    tiles = padded.reshape(t, nh, size, nw, size).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, size * size)
    return tiles[tiles >= 0], (tiles >= 0).sum(-1)


def vision_plan(grid_thw, spatial_merge_size=2, num_heads=1, impl="eager", window=None) -> VisionPlan:
    """Rotary positions and attention layouts for the given grids. window: merged tokens per window side
    (Qwen2.5-VL), None for frame attention only (Qwen2-VL)."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    for t, h, w in grid_thw:
        if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"grid_thw row {[int(t), int(h), int(w)]}: t, h and w must be >= 1, h and w multiples "
                             f"of {spatial_merge_size}")
    rot_pos = np.concatenate(
        [np.tile(_merge_window_positions(h, w, spatial_merge_size), (t, 1)) for t, h, w in grid_thw]
    ).astype(np.int32)
    frames = segment_layout(np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]), num_heads, impl)
    if window is None:
        return VisionPlan(rot_pos, frames)
    unit = spatial_merge_size ** 2
    tokens, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        order, sizes = _windows(t, h // spatial_merge_size, w // spatial_merge_size, window)
        tokens.append(order + offset)
        lengths.append(sizes * unit)
        offset += t * h * w // unit
    tokens = np.concatenate(tokens)
    # A merged token is `unit` consecutive patch rows; the merger keeps them together in any token order.
    order = (tokens[:, None] * unit + np.arange(unit)).reshape(-1).astype(np.int32)
    windows = segment_layout(np.concatenate(lengths), num_heads, impl)
    restore = np.argsort(tokens, kind="stable").astype(np.int32)
    return VisionPlan(rot_pos[order], frames, windows, order, restore)


# ---------------------------------------------------------------------------------------------- cells
class PatchProjection(nn.Cell):
    """The Conv3d of the checkpoint (weight [embed, C, 2, 14, 14], no bias), computed as a matmul.

    Its stride equals its kernel and each input is exactly one kernel-sized patch, so the convolution is
    one dot product per patch and output channel: a matmul against the weight flattened to [embed, C*2*14*14],
    in the same (C, T, H, W) order as the processor flattens patches. Measured on the CPU backend (graph
    mode): 7 ms against 910 ms for nn.Conv3d on 1024 patches, 34 ms against 9.5 s on 14308.
    """

    def __init__(self, in_channels, embed_dim, kernel, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((embed_dim, in_channels) + tuple(kernel), dtype)
        self.embed_dim = embed_dim
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, patches):
        return self.matmul(patches.astype(self.weight.dtype), self.weight.reshape(self.embed_dim, -1))


class PatchEmbed(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, out_dtype=ms.float32):
        # dtype: the policy's conv_dtype (bf16 on Ascend); out_dtype: its compute dtype, the blocks' input
        super().__init__()
        self.dtype = out_dtype
        self.patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = PatchProjection(config.in_channels, config.embed_dim, kernel, dtype)

    def construct(self, x):
        return self.proj(x.reshape(-1, self.patch_dim)).astype(self.dtype)


class VisionRotaryEmbedding(nn.Cell):
    """2-D rotary tables [N, 3, 1, head_dim] for the q/k/v rows of each patch: the first half of the frequencies
    follow the row, the second the column.

    The q rows carry the attention scale and the v rows are cos 1, sin 0, so one pass over the qkv projection
    rotates q and k, scales q, and leaves v unchanged (x * 1 + y * 0 == x exactly).
    """

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))
        self.head_dim = head_dim
        scale = np.float32(head_dim) ** np.float32(-0.5)
        self.factor = Tensor(np.array([scale, 1.0, 0.0], np.float32).reshape(1, 3, 1, 1))
        self.value_cos = Tensor(np.array([0.0, 0.0, 1.0], np.float32).reshape(1, 3, 1, 1))

    def construct(self, rot_pos):
        row, col = split(rot_pos.astype(ms.float32), (1, 1), 1, 2)
        freqs = ops.cat((row * self.inv_freq, col * self.inv_freq), -1)
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, 1, self.head_dim)
        return ops.cos(emb) * self.factor + self.value_cos, ops.sin(emb) * self.factor


class VisionBlockWeights(NamedTuple):
    """A block's tensors by name. In graphs they travel as a plain tuple in this order: MindSpore's graph mode
    treats a NamedTuple as an opaque Python object, so the code unpacks by position."""

    norm1_weight: Tensor
    norm1_bias: Tensor
    qkv_weight: Tensor
    qkv_bias: Tensor
    proj_weight: Tensor
    proj_bias: Tensor
    norm2_weight: Tensor
    norm2_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor


class VisionAttention(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32):
        super().__init__()
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim, bias=True, dtype=dtype)
        self.proj = Linear(config.embed_dim, config.embed_dim, bias=True, dtype=dtype)


class VisionMlp(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        self.kernels = kernels
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden, dtype=dtype)
        self.fc2 = Linear(hidden, config.embed_dim, dtype=dtype)

    def construct(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        h = self.fc1(x, fc1_weight, fc1_bias)
        return self.fc2(self.kernels.quick_gelu(h), fc2_weight, fc2_bias)


class Qwen2VLVisionBlock(nn.Cell):
    """One block under HF's names. Its two halves, `project` and `attend`, take the weights as a bundle so that
    one compiled step (VisionProjectStep, VisionAttendStep) runs every block.

    The attention is the same in Qwen2.5-VL's blocks; their norms and MLP differ. A subclass gives its own
    `norms_and_mlp`, `weights` and the two hooks that read them (`pre_attention_norm`, `feed_forward`), and
    where the attention's weights sit in its bundle (QKV, PROJ)."""

    QKV = 2  # index of qkv.weight in weights(), qkv.bias follows
    PROJ = 4  # index of proj.weight, proj.bias follows

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_implementation = policy.attn_implementation
        self.flash_dtype = policy.flash_dtype
        self.flash_kernel = flash_kernel(policy)
        self.norm1, self.norm2, self.mlp = self.norms_and_mlp(config, policy)
        self.attn = VisionAttention(config, policy.compute_dtype)
        self.rotate_half = Tensor(rotate_half_matrix(self.head_dim))
        self.matmul = ops.MatMul()

    def norms_and_mlp(self, config, policy):
        norms = LayerNorm(config.embed_dim, eps=1e-6), LayerNorm(config.embed_dim, eps=1e-6)
        return norms + (VisionMlp(config, policy.compute_dtype, kernels_for(policy)),)

    def pre_attention_norm(self, x, w):
        return self.norm1(x, w[0], w[1])

    def feed_forward(self, x, w):
        return self.mlp(self.norm2(x, w[6], w[7]), w[8], w[9], w[10], w[11])

    def weights(self):
        """The block's Parameters in VisionBlockWeights' order, as a plain tuple (in a graph a NamedTuple is
        an opaque object)."""
        return (self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias,
                self.attn.proj.weight, self.attn.proj.bias, self.norm2.weight, self.norm2.bias,
                self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias)

    def project(self, x, cos, sin, w):
        """x [N, E] -> q, k, v heads first [H, N, D], q and k rotated (in float32 whatever the compute dtype),
        q scaled. w: VisionBlockWeights (or the same tensors as a tuple)."""
        heads, d = self.num_heads, self.head_dim
        qkv = self.attn.qkv(self.pre_attention_norm(x, w), w[self.QKV], w[self.QKV + 1])
        qkv = qkv.astype(ms.float32)
        rotated = self.matmul(qkv.reshape(-1, d), self.rotate_half).reshape(-1, 3, heads, d)
        qkv = qkv.reshape(-1, 3, heads, d)
        qkv = qkv * broadcast(cos, qkv) + rotated * broadcast(sin, qkv)
        q, k, v = split(qkv.astype(x.dtype).transpose(1, 2, 0, 3), (1, 1, 1), 0, 4)
        return q.reshape(heads, -1, d), k.reshape(heads, -1, d), v.reshape(heads, -1, d)

    def attend(self, x, q, k, v, w):
        """The rest of the block for some rows: x [F * Lq, E] and their queries q [H, F, Lq, D] against their
        frames' keys and values k, v [H, F, L, D] -> [F * Lq, E]. w: VisionBlockWeights (or a tuple)."""
        out = frame_attention(q, k, v, self.attn_implementation, self.flash_dtype, self.flash_kernel)
        x = x + self.attn.proj(out, w[self.PROJ], w[self.PROJ + 1])
        return x + self.feed_forward(x, w)


class VisionProjectStep(Step):
    """`Qwen2VLVisionBlock.project` with the block's weights as arguments: one graph for every block and every
    image size.

    In GRAPH_MODE each compiled graph keeps its own workspace for as long as it lives: the 32-block tower as one
    graph held +11.5 GB for one 1024-patch image at the 2B widths; steps shared by every block hold one block's.
    """

    def __init__(self, block: Qwen2VLVisionBlock):
        super().__init__()
        self.block = block

    def specs(self):
        b = self.block
        d = b.head_dim
        return (dynamic((None, b.attn.proj.out_features), b.attn.qkv.weight.dtype), dynamic((None, 3, 1, d)),
                dynamic((None, 3, 1, d)), *like(b.weights()))

    def construct(self, x, cos, sin, *weights):
        return self.block.project(x, cos, sin, weights)


class VisionAttendStep(Step):
    """`Qwen2VLVisionBlock.attend` for the query rows `rows` [F, Lq] against the keys of `frames` [F, L]
    (patch indices, see VisionPlan): one graph for every block, image size and frame layout."""

    def __init__(self, block: Qwen2VLVisionBlock):
        super().__init__()
        self.block = block

    def specs(self):
        b = self.block
        dtype = b.attn.qkv.weight.dtype
        index = dynamic((None, None), ms.int32)
        heads = dynamic((b.num_heads, None, b.head_dim), dtype)
        return (dynamic((None, b.attn.proj.out_features), dtype), heads, heads, heads, index, index,
                *like(b.weights()))

    def construct(self, x, q, k, v, rows, frames, *weights):
        # Gathers by [F, Lq] / [F, L] index tensors give the frame layout directly: no reshape that would depend
        # on the dynamic sizes (each costs host-side shape arithmetic at every call of a dynamic graph).
        x = ops.gather(x, rows, 0).reshape(-1, x.shape[1])
        q, k, v = ops.gather(q, rows, 1), ops.gather(k, frames, 1), ops.gather(v, frames, 1)
        return self.block.attend(x, q, k, v, weights)


class VisionBlockStep(Step):
    """A whole block as one CPU kernel (csrc/vision.cc; Qwen2VisionTransformer.block_kernels says when it
    applies): x [N, E], the rotary tables and the segment bounds [S + 1] of the rows that attend to each other ->
    [N, E]. One graph for every block, image size and layout, of one operator where the two steps make about 30
    and a gather per frame group."""

    def __init__(self, block: Qwen2VLVisionBlock, kind):
        super().__init__()
        self.block = block
        self.kind = Tensor(np.array([kind], np.int32))  # 0: Qwen2-VL's block, 1: Qwen2.5-VL's

    def specs(self):
        b = self.block
        table = dynamic((None, 3, 1, b.head_dim))
        return (dynamic((None, b.attn.proj.out_features)), table, table, dynamic((None,), ms.int32),
                *like(b.weights()))

    def construct(self, x, cos, sin, bounds, *weights):
        return self.block.flash_kernel.vision_block(x, cos, sin, bounds, self.kind, *weights)


EMBED_ROWS = 2048  # patches a call of the patch embedding (9.6 MB of float32 pixels)


class VisionEmbed(Step):
    """Patches and their positions -> the first block's input and the rotary tables: one graph, any N."""

    def __init__(self, patch_embed: PatchEmbed, rotary: VisionRotaryEmbedding):
        super().__init__()
        self.patch_embed = patch_embed
        self.rotary = rotary

    def specs(self):
        return dynamic((None, self.patch_embed.patch_dim), ms.float32), dynamic((None, 2), ms.int32)

    def construct(self, pixels, rot_pos):
        cos, sin = self.rotary(rot_pos)
        return self.patch_embed(pixels), cos, sin


class MergerStep(Step):
    """The PatchMerger as one graph for any number of patches."""

    def __init__(self, merger):
        super().__init__()
        self.merger = merger

    def specs(self):
        ln = self.merger.ln_q.weight
        return (dynamic((None, ln.shape[0]), self.merger.mlp[0].weight.dtype),)

    def construct(self, x):
        return self.merger(x)


class GELU(nn.Cell):
    """The exact GELU as a cell (the merger's `mlp` is a sequence: HF's mlp.0 / mlp.2 names)."""

    def __init__(self, kernels):
        super().__init__()
        self.kernels = kernels

    def construct(self, x):
        return self.kernels.gelu(x)


class PatchMerger(nn.Cell):
    def __init__(self, config: Qwen2VLVisionConfig, dtype=ms.float32, kernels=PortableKernels):
        super().__init__()
        self.hidden = config.embed_dim * config.spatial_merge_size ** 2
        self.ln_q = self.norm(config.embed_dim, kernels)
        self.mlp = nn.SequentialCell(
            [
                Linear(self.hidden, self.hidden, dtype=dtype),
                GELU(kernels),
                Linear(self.hidden, config.out_features, dtype=dtype),
            ]
        )

    @staticmethod
    def norm(dim, kernels):
        return LayerNorm(dim, eps=1e-6)

    def construct(self, x):
        # Consecutive rows are one 2x2 window (the processor's patch order), so a reshape merges them.
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


class Qwen2VisionTransformer(nn.Cell):
    """`visual.*` of the HF checkpoint. Call with the processor's flattened patches and their grids.

    Not one graph: the embedding, each block (two steps shared by every block) and the merger run as separate
    graphs in GRAPH_MODE, each compiled once whatever the image sizes.
    """

    block_class = Qwen2VLVisionBlock
    merger_class = PatchMerger
    window = None  # merged tokens per attention window side; None: every block attends per frame
    kernel_kind = 0  # the block's layout for csrc/vision.cc

    def __init__(self, config: Qwen2VLVisionConfig, policy: PrecisionPolicy):
        super().__init__()
        self.config = config
        self.policy = policy
        self.patch_embed = PatchEmbed(config, policy.conv_dtype, policy.compute_dtype)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim)
        self.blocks = nn.CellList([self.block_class(config, policy) for _ in range(config.depth)])
        self.merger = self.merger_class(config, policy.compute_dtype, kernels_for(policy))
        # Steps computing with the first block's cells (never its parameters), as plain attributes: registered
        # sub-cells would prefix their own parameter names.
        steps = dict(embed=VisionEmbed(self.patch_embed, self.rotary_pos_emb),
                     project=VisionProjectStep(self.blocks[0]),
                     attend=VisionAttendStep(self.blocks[0]), merger=MergerStep(self.merger))
        if policy.attn_implementation == "sdpa":
            steps["block_fused"] = VisionBlockStep(self.blocks[0], self.kernel_kind)
        object.__setattr__(self, "steps", steps)
        self.hot_layouts = HotLayouts()

    def block_kernels(self):
        """The CPU kernel that runs a whole block (csrc/vision.cc), or None where it does not apply: it comes with
        the "sdpa" attention of the CPU backend, computes in float32 and needs oneDNN's sgemm from MindSpore's
        backend."""
        kernels = layer_kernels(self.policy)
        return kernels if kernels is not None and kernels.layers_ready else None

    def windowed(self, index):
        """Whether block `index` attends within windows (else within frames)."""
        return False

    @staticmethod
    def layout(grid_thw):
        """The key HotLayouts knows a call's images by: their (t, h, w) grids in order."""
        return tuple(map(tuple, np.asarray(grid_thw).tolist()))

    def plan(self, grid_thw) -> VisionPlan:
        return vision_plan(grid_thw, self.config.spatial_merge_size, self.config.num_heads,
                           self.policy.attn_implementation, window=self.window)

    def __call__(self, pixel_values, grid_thw):
        """pixel_values [N, C * T * P * P] (numpy or Tensor), grid_thw [images, 3] -> merged features, in the
        processor's order."""
        plan = self.plan(grid_thw)
        if isinstance(pixel_values, Tensor):
            pixels = pixel_values if plan.order is None else ops.gather(pixel_values, Tensor(plan.order), 0)
        else:
            pixels = np.asarray(pixel_values, np.float32)
            # The patch embedding is row by row, so reordering its input reorders its output.
            pixels = pixels if plan.order is None else pixels[plan.order]
        x, cos, sin = self.embed(pixels, plan.rot_pos)
        if self.block_kernels() is not None:
            x = self.fused_blocks_forward(x, cos, sin, plan)
        else:
            layouts = {"frames": _calls(plan.frames)}
            if plan.windows is not None:
                layouts["windows"] = _calls(plan.windows)
            if ms.get_context("mode") != ms.GRAPH_MODE:
                x = self.blocks_forward(x, cos, sin, layouts, False)
            else:
                x = self.hot_layouts.run(self.layout(grid_thw), len(plan.rot_pos),
                                         lambda static: self.blocks_forward(x, cos, sin, layouts, static))
        x = self.steps["merger"](x)
        return x if plan.restore is None else ops.gather(x, Tensor(plan.restore), 0)

    def embed(self, pixels, rot_pos):
        """The patch embedding and rotary tables, EMBED_ROWS patches a call: the pixels are the largest input
        of a request (1176 floats a patch), and one call over all of them would make MindSpore's memory pool
        keep room for the largest image seen."""
        parts = []
        for a in range(0, len(rot_pos), EMBED_ROWS):
            chunk = pixels[a:a + EMBED_ROWS]
            parts.append(self.steps["embed"](chunk if isinstance(chunk, Tensor) else Tensor(chunk),
                                             Tensor(rot_pos[a:a + EMBED_ROWS])))
        return parts[0] if len(parts) == 1 else tuple(ops.cat(part, 0) for part in zip(*parts))

    def fused_blocks_forward(self, x, cos, sin, plan):
        """The blocks, each one kernel (block_kernels): a dynamic-shape graph serves every layout, so no
        HotLayouts."""
        frames = Tensor(plan.frames.bounds)
        windows = None if plan.windows is None else Tensor(plan.windows.bounds)
        for i, arguments in enumerate(layer_arguments(self, self.blocks)):
            x = self.steps["block_fused"](x, cos, sin, windows if self.windowed(i) else frames, *arguments())
        return x

    def blocks_forward(self, x, cos, sin, layouts, static):
        """The blocks, through the shared steps: dynamic, or static for this layout's shapes (HotLayouts)."""
        project, attend = self.steps["project"], self.steps["attend"]
        if static:
            project, attend = project.static, attend.static
        for i, arguments in enumerate(layer_arguments(self, self.blocks)):
            calls, unpad = layouts["windows" if self.windowed(i) else "frames"]
            w = arguments()
            q, k, v = project(x, cos, sin, *w)
            outs = [attend(x, q, k, v, query_rows, segments, *w) for query_rows, segments in calls]
            x = outs[0] if len(outs) == 1 else ops.cat(outs, 0)
            if unpad is not None:
                x = ops.gather(x, unpad, 0)
        return x


def _calls(layout: AttentionLayout):
    """The attend step's index arguments for a layout, one (query rows, their segments) pair per call, and
    its unpad table."""
    calls = [(Tensor(np.ascontiguousarray(rows[:, a:b])), Tensor(rows))
             for rows, blocks in zip(layout.groups, layout.blocks) for a, b in blocks]
    return calls, None if layout.unpad is None else Tensor(layout.unpad)
