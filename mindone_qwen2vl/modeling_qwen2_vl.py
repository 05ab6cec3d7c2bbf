"""The top-level Qwen2-VL model: vision features, their merge into the text embeddings, logits.

Host work (numpy, inputs.py) happens here, before the device calls: position ids from `input_ids` and the
grids, the gather table that merges features, the attention mask. The graphs it calls (the vision tower's and
the decoder's steps, the head) are declared with dynamic shapes, so any request shape reuses them.
"""
import functools
import threading
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import host_memory
from .config import Qwen2VLConfig
from .graphs import Step, dynamic
from .inputs import check_inputs, check_media, check_second_per_grid_ts, get_rope_index, to_numpy
from .layers import Linear
from .modeling_text import Qwen2VLTextModel
from .modeling_vision import Qwen2VisionTransformer
from .precision import PrecisionPolicy, resolve_policy


def serialized(method):
    """Calls of `method` on one model run one at a time, from any threads: MindSpore's runtime is not safe for
    two threads running one model's graphs at once (in pynative mode that gave wrong answers, "pointer[runtime_info]
    is null" errors and crashes). While an engine serves the model (engine.Engine), the call is handed to the
    engine's thread and runs there between two of its steps; otherwise it runs on the caller's thread under the
    model's lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        engine = self.engine
        if engine is not None and threading.current_thread() is not engine.thread:
            ran, result = engine.call(functools.partial(method, self, *args, **kwargs))
            if ran:
                return result
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Qwen2VLOutput:
    logits: Tensor  # [batch, seq, vocab], float32
    rope_deltas: Optional[np.ndarray] = None  # [batch, 1]: position of the next token minus its index


class HeadStep(Step):
    """Final norm and lm_head: hidden states [T, hidden] -> float32 logits [T, vocab], any T."""

    def __init__(self, model):
        super().__init__()
        # The model as a plain attribute, its lm_head looked up when the graph compiles: tensor parallelism
        # (parallel.shard_model) replaces lm_head after the model is built.
        object.__setattr__(self, "model", model)

    def specs(self):
        head = self.model.lm_head
        return (dynamic((None, head.in_features), head.weight.dtype),)

    def construct(self, hidden):
        return self.model.lm_head(self.model.model.norm(hidden)).astype(ms.float32)


class Qwen2VLForConditionalGeneration(nn.Cell):
    """Qwen2-VL: `visual` (vision tower), `model` (decoder), `lm_head`; HF parameter names.

    Qwen2.5-VL (modeling_qwen2_5_vl) is this class with another config, tower and temporal positions."""

    config_class = Qwen2VLConfig
    vision_class = Qwen2VisionTransformer
    tokens_per_second = None  # Qwen2-VL's temporal positions count frames, not seconds

    def __init__(self, config: Qwen2VLConfig, policy: Optional[PrecisionPolicy] = None):
        super().__init__()
        from .generation import Runners

        self.config = config
        self.policy = policy or resolve_policy()
        dtype = self.policy.compute_dtype
        self.visual = self.vision_class(config.vision_config, self.policy)
        self.model = Qwen2VLTextModel(config.text_config, self.policy)
        text = config.text_config
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False, dtype=dtype, weight=tied)
        if tied is not None:
            # Assigning the shared Parameter to lm_head renamed it; it is saved and loaded as the embedding.
            tied.name = "model.embed_tokens.weight"
        self.name_or_path = None  # the folder loaded from (loading.load_pretrained)
        self.generation_config = {}  # its generation_config.json, read once at load
        self.tensor_parallel = None  # (rank, size) when sharded over an msrun job (parallel.shard_model)
        self.lock = threading.RLock()  # see `serialized`
        object.__setattr__(self, "engine", None)  # the engine.Engine serving this model, while one runs
        object.__setattr__(self, "head", HeadStep(self))
        object.__setattr__(self, "runners", Runners(self))  # generation's compiled decode steps and caches
        if self.policy.device == "CPU":
            host_memory.bound_primitive_cache()


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
    # model goes straight to `forward`; the steps it calls compile on their own in GRAPH_MODE.
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                       second_per_grid_ts=None):
        """See inputs.get_rope_index; second_per_grid_ts (seconds per temporal grid step of each video) matters
        to Qwen2.5-VL only, as in HF."""
        c = self.config
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                              vision_start_token_id=c.vision_start_token_id,
                              spatial_merge_size=c.vision_config.spatial_merge_size,
                              second_per_grid_ts=second_per_grid_ts, tokens_per_second=self.tokens_per_second)

    @serialized
    def get_vision_features(self, pixel_values, grid_thw):
        """Merged vision features [sum(t*h*w)/4, hidden] for images or videos (or both concatenated)."""
        pixels, grid = check_media(self.config, pixel_values, grid_thw, names=("pixel_values", "grid_thw"))
        return self.visual(pixels, grid)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None):
        """Token embeddings with the vision features written over the image/video pad tokens."""
        ids = to_numpy(input_ids, np.int64)
        batch, seq = ids.shape
        embeds = self.model.steps["embed"](Tensor(ids.reshape(-1).astype(np.int32)))
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
            return embeds.reshape(batch, seq, -1)
        # One tower call for images and videos together: attention is per frame, so nothing mixes.
        # No copy of one kind's pixels (up to 47 MB a 1400-px image); the tower reads them as float32.
        pixels = [to_numpy(p) for _, p, _ in items]
        pixels = pixels[0] if len(pixels) == 1 else np.concatenate([np.asarray(p, np.float32) for p in pixels])
        grid = np.concatenate([g for _, _, g in items])
        # self.visual, not get_vision_features: callers checked these inputs already (inputs.check_inputs).
        features = self.visual(pixels, grid).astype(embeds.dtype)
        # masked_scatter as one gather: pad-token rows read the feature rows, in row-major order per kind.
        flat = ids.reshape(-1)
        index = np.arange(flat.size, dtype=np.int32)
        offset = flat.size
        for token, _, g in items:
            where = np.nonzero(flat == token)[0]
            index[where] = offset + np.arange(len(where))
            offset += len(where)
        table = ops.cat((embeds, features))
        return ops.gather(table, Tensor(index), 0).reshape(batch, seq, -1)

    @serialized
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Token ids with the prompt first, like HF's generate; see generation.generate for the options."""
        from .generation import generate

        try:
            return generate(self, input_ids, attention_mask, **kwargs)
        finally:
            host_memory.release_freed()  # the request's freed host memory back to the system

    @serialized
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, position_ids=None, logits_to_keep=0,
                second_per_grid_ts=None, **unused):
        """Logits [batch, seq, vocab] float32; `logits_to_keep=n` (n > 0) keeps only the last n positions, as
        in HF (the vocabulary projection of every prompt position is most of a long prefill's work), and the
        last decoder layer then computes those positions only (see Qwen2VLTextModel.prompt)."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position; HF's tensor of indices is not "
                             f"supported), got {logits_to_keep!r}")
        ids, mask, images, videos = check_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                                 pixel_values_videos, video_grid_thw)
        pixel_values, image_grid_thw = images or (None, None)
        pixel_values_videos, video_grid_thw = videos or (None, None)
        batch, seq = ids.shape
        check_second_per_grid_ts(second_per_grid_ts, video_grid_thw)  # before the vision tower's work
        embeds = self.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        rope_deltas = None
        if position_ids is None:
            position_ids, rope_deltas = self.get_rope_index(ids, image_grid_thw, video_grid_thw, mask,
                                                            second_per_grid_ts)
        position_ids = to_numpy(position_ids, np.int64).reshape(3, batch, seq)
        kept = seq if not logits_to_keep or logits_to_keep >= seq else int(logits_to_keep)
        # Padding positions keep zero logits: each row runs without its padding.
        logits = np.zeros((batch, kept, self.config.text_config.vocab_size), np.float32)
        wanted = np.arange(seq - kept, seq)
        for row, hidden, _ in self.prompt_rows(embeds, position_ids, mask, keep_last=logits_to_keep):
            real = np.nonzero(mask[row])[0]
            where = np.searchsorted(wanted, real[-hidden.shape[0]:])
            logits[row, where] = self.head(hidden).asnumpy()
        return Qwen2VLOutput(logits=Tensor(logits), rope_deltas=rope_deltas)

    def prompt_rows(self, embeds, position_ids, mask, keep_last=0, keep_kv=False):
        """Each row of a batch through the decoder on its own, its padding (mask 0) left out: yields
        (row, hidden states before the final norm, keys and values), see Qwen2VLTextModel.prompt. keep_last=n
        (n > 0): only the row's tokens among the last n positions of the padded batch."""
        batch, seq = mask.shape
        flat = embeds.reshape(batch * seq, -1)
        for row in range(batch):
            real = np.nonzero(mask[row])[0]
            keep = int(np.sum(real >= seq - keep_last)) if keep_last else 0
            if keep_last and keep == 0:
                continue  # none of its tokens is wanted (right padding under logits_to_keep)
            hidden, kv = self.model.prompt(ops.gather(flat, Tensor((row * seq + real).astype(np.int32)), 0),
                                           position_ids[:, row, real], keep_last=keep, keep_kv=keep_kv)
            yield row, hidden, kv

    def graphs(self):
        """The model's compiled steps by name (see compiled_graphs)."""
        steps = {f"vision.{k}": v for k, v in self.visual.steps.items()}
        steps.update({f"text.{k}": v for k, v in self.model.steps.items()})
        steps["head"] = self.head
        steps.update(self.runners.graphs())
        return steps

    def compiled_graphs(self):
        """{step name: graphs compiled so far} (GRAPH_MODE; all 0 in PYNATIVE_MODE)."""
        return {name: step.compiled() for name, step in self.graphs().items()}
