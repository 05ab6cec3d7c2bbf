"""The top-level Qwen2-VL model: vision features, their merge into the text embeddings, 3-axis positions.

Host work (numpy) happens here, before the device calls: position ids from `input_ids` and the grids,
the vision attention layout, the gather table that merges features, the attention mask. The cells it calls
(`visual`, `model`, `lm_head`) hold only tensor code, so they compile in graph mode.
"""
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .config import Qwen2VLConfig
from .cpu_tuning import on_launcher
from .layers import Linear
from .precision import PrecisionPolicy, resolve_policy
from .modeling_text import Qwen2VLTextModel
from .modeling_vision import Qwen2VisionTransformer


def to_numpy(x, dtype=None):
    if x is None:
        return None
    if isinstance(x, Tensor):
        x = x.asnumpy()
    elif hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor handed over from an HF pipeline
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x if dtype is None else x.astype(dtype)


@dataclass
class Qwen2VLOutput:
    logits: Tensor  # [batch, seq, vocab], float32
    rope_deltas: Optional[np.ndarray] = None  # [batch, 1]: position of the next token minus its index


def get_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   spatial_merge_size=2):
    """3-axis (temporal, height, width) position ids for M-RoPE, computed on the host.

    Text tokens advance all three axes together. A vision item of grid (t, h, w) becomes t*h*w/4 tokens
    laid out as (t, h/2, w/2); its positions start where the text stopped, each axis counting its own index,
    and the text after it resumes at one past the largest position used. Padding (attention_mask 0) gets 1.

    Example: one image of grid (1, 4, 4) (2x2 tokens) after 2 text tokens, then 1 text token:
        temporal: 0 1 2 2 2 2 4
        height:   0 1 2 2 3 3 4
        width:    0 1 2 3 2 3 4

    Returns (position_ids [3, B, S] int64, rope_deltas [B, 1] int64), where rope_deltas is the position
    of the next token minus its index in the padded sequence, used to continue positions while decoding.
    """
    ids = to_numpy(input_ids, np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    batch, seq = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, np.int64).reshape(batch, seq)
    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = np.broadcast_to(np.arange(seq), (3, batch, seq)).copy()
            return pos, np.zeros((batch, 1), np.int64)
        pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
        deltas = pos.max(-1, keepdims=True) + 1 - seq
        return np.broadcast_to(pos, (3, batch, seq)).copy(), deltas.astype(np.int64)

    grids = {
        image_token_id: iter(np.asarray(to_numpy(image_grid_thw) if image_grid_thw is not None else [],
                                        np.int64).reshape(-1, 3)),
        video_token_id: iter(np.asarray(to_numpy(video_grid_thw) if video_grid_thw is not None else [],
                                        np.int64).reshape(-1, 3)),
    }
    position_ids = np.ones((3, batch, seq), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        tokens = ids[b][mask[b] == 1]
        n = len(tokens)
        after_start = tokens[np.nonzero(tokens[:-1] == vision_start_token_id)[0] + 1]
        remaining = {k: int((after_start == k).sum()) for k in grids}
        pieces, cursor, next_pos = [], 0, 0
        for _ in range(sum(remaining.values())):
            # The next vision item is whichever pad token (image or video) comes first from the cursor.
            first = {}
            for kind, left in remaining.items():
                hits = np.nonzero(tokens[cursor:] == kind)[0] if left else []
                first[kind] = cursor + int(hits[0]) if len(hits) else n + 1
            kind = min(first, key=first.get)
            start = first[kind]
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(
                    f"row {b} has more {'image' if kind == image_token_id else 'video'} items than grids given"
                ) from None
            remaining[kind] -= 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            text_len = start - cursor
            pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            base = next_pos + text_len
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + base)
            next_pos = base + max(t, gh, gw)
            cursor = start + t * gh * gw
        if cursor < n:
            pieces.append(np.broadcast_to(np.arange(n - cursor) + next_pos, (3, n - cursor)))
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b] == 1] = row
        deltas[b, 0] = (row.max() + 1 if row.size else 0) - seq
    return position_ids, deltas


def causal_mask(attention_mask, query_len, key_len, past_len=0):
    """Additive float32 mask [B, 1, S, L]: a query at absolute position past_len+i sees keys 0..past_len+i
    that are not padding."""
    q_pos = np.arange(query_len)[:, None] + past_len
    allowed = np.arange(key_len)[None, :] <= q_pos
    allowed = allowed[None] & (attention_mask[:, None, :key_len] == 1)
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]


class Qwen2VLForConditionalGeneration(nn.Cell):
    """Qwen2-VL: `visual` (vision tower), `model` (decoder), `lm_head`; HF parameter names."""

    def __init__(self, config: Qwen2VLConfig, policy: Optional[PrecisionPolicy] = None):
        super().__init__()
        self.config = config
        self.policy = policy or resolve_policy()
        dtype = self.policy.compute_dtype
        self.visual = Qwen2VisionTransformer(config.vision_config, self.policy)
        self.model = Qwen2VLTextModel(config.text_config, self.policy)
        text = config.text_config
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False, dtype=dtype, weight=tied)
        if tied is not None:
            # Assigning the shared Parameter to lm_head renamed it; it is saved and loaded as the embedding.
            tied.name = "model.embed_tokens.weight"

    @classmethod
    def from_pretrained(cls, path_or_hub_id, mindspore_dtype=ms.float32, attn_implementation=None, policy=None,
                        tensor_parallel_size=None, **kwargs):
        """Load a HF-format (or converted) checkpoint folder or hub id.

        mindspore_dtype / attn_implementation go through the precision policy (precision.resolve_policy):
        on a CPU, bf16 falls back to float32 and flash attention to eager, with a warning. `policy` gives a
        PrecisionPolicy directly instead.
        tensor_parallel_size=N splits the decoder over the N processes of an msrun job (parallel.py); each
        process loads and holds its 1/N.
        """
        from .loading import load_pretrained

        policy = policy or resolve_policy(mindspore_dtype, attn_implementation)
        return load_pretrained(cls, path_or_hub_id, policy=policy, tensor_parallel_size=tensor_parallel_size,
                               **kwargs)

    # The orchestration below runs numpy on the host, so it must not be compiled as a graph: calling the
    # model goes straight to `forward`; its cells compile on their own in GRAPH_MODE. The entry points marked
    # on_launcher run on the CPU launcher thread in graph mode (cpu_tuning).
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        c = self.config
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                              vision_start_token_id=c.vision_start_token_id,
                              spatial_merge_size=c.vision_config.spatial_merge_size)

    @on_launcher
    def get_vision_features(self, pixel_values, grid_thw):
        """Merged vision features [sum(t*h*w)/4, hidden] for images or videos (or both concatenated)."""
        grid = to_numpy(grid_thw, np.int64).reshape(-1, 3)
        pixels = to_numpy(pixel_values, np.float32)
        if pixels.ndim != 2 or pixels.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(
                f"pixel values of shape {tuple(pixels.shape)} do not match grid_thw {grid.tolist()}: "
                f"expected [{int(grid.prod(-1).sum())}, channels*temporal_patch*patch*patch] patches"
            )
        return self.visual(Tensor(pixels), *self.visual.plan_inputs(grid))

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None):
        """Token embeddings with the vision features written over the image/video pad tokens."""
        ids = to_numpy(input_ids, np.int64)
        batch, seq = ids.shape
        embeds = self.model.embed_tokens(Tensor(ids.astype(np.int32)))
        c = self.config
        merge = c.vision_config.spatial_merge_size ** 2
        items = []  # (token id, pixels, grid) for the kinds present, images first
        for name, token, pixels, grid in (("image", c.image_token_id, pixel_values, image_grid_thw),
                                          ("video", c.video_token_id, pixel_values_videos, video_grid_thw)):
            n_tokens = int((ids == token).sum())
            if pixels is None:
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} {name} tokens but no {name} pixel values were given")
                continue
            if grid is None:
                raise ValueError(f"{name} pixel values given without {name}_grid_thw")
            grid = to_numpy(grid, np.int64).reshape(-1, 3)
            n_features = int(grid.prod(-1).sum()) // merge
            if n_tokens != n_features:
                raise ValueError(
                    f"{name.capitalize()} features and {name} tokens do not match: tokens: {n_tokens}, "
                    f"features: {n_features}"
                )
            items.append((token, pixels, grid))
        if not items:
            return embeds
        # One tower call for images and videos together: attention is per frame, so nothing mixes.
        pixels = np.concatenate([to_numpy(p, np.float32) for _, p, _ in items])
        grid = np.concatenate([g for _, _, g in items])
        features = self.get_vision_features(pixels, grid).astype(embeds.dtype)
        # masked_scatter as one gather: pad-token rows read the feature rows, in row-major order per kind.
        flat = ids.reshape(-1)
        index = np.arange(flat.size, dtype=np.int32)
        offset = flat.size
        for token, _, g in items:
            where = np.nonzero(flat == token)[0]
            index[where] = offset + np.arange(len(where))
            offset += len(where)
        table = ops.cat((embeds.reshape(batch * seq, -1), features))
        return ops.gather(table, Tensor(index), 0).reshape(batch, seq, -1)

    @on_launcher
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Token ids with the prompt first, like HF's generate; see generation.generate for the options."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    @on_launcher
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, position_ids=None, logits_to_keep=0, **unused):
        """Logits [batch, seq, vocab] float32; `logits_to_keep=n` (n > 0) keeps only the last n positions, as
        in HF (the vocabulary projection of every prompt position is most of a long prefill's work), and the
        last decoder layer then computes those positions only (see Qwen2VLTextModel.prompt_layers)."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position; HF's tensor of indices is not "
                             f"supported), got {logits_to_keep!r}")
        ids = to_numpy(input_ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        batch, seq = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, np.int64).reshape(batch, seq)
        embeds = self.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        rope_deltas = None
        if position_ids is None:
            position_ids, rope_deltas = self.get_rope_index(ids, image_grid_thw, video_grid_thw, mask)
        hidden, _ = self.model.prompt_layers(embeds, Tensor(to_numpy(position_ids, np.int32)),
                                             Tensor(causal_mask(mask, seq, seq)), keep_last=int(logits_to_keep))
        logits = self.lm_head(hidden).astype(ms.float32)
        return Qwen2VLOutput(logits=logits, rope_deltas=rope_deltas)
