"""generate(): the prompt through the shared prompt steps, a decode step compiled per (batch, cache length)
bucket, HF's logits processing and sampling, left-padded batches, streaming.

One call:
  host    options (arguments > the checkpoint's generation_config.json > HF's defaults), rope index and
          rope_deltas, the key mask over the cache, the prompt embedding (the vision tower runs here, once)
  device  the prompt through the decoder's shared steps (modeling_text.Qwen2VLTextModel.prompt, dynamic shapes:
          compiled once for any prompt), its keys/values written to the cache (cache.WritePrompt), the last
          position's logits (the model's head)
  loop    host: next tokens from the logits (`TokenChooser`), pad for finished rows, streamer, eos
          device `DecodeOneToken`: one token per row written at the row's position; its rotary positions and
          attention mask are computed in the graph from per-row positions, so its inputs keep their shapes and
          it is compiled once per (batch rows, cache length) bucket for the life of the model (`Runners`).
Per-token host work has a fixed size ([batch, vocab] logits, [batch] ids): nothing grows with the sequence.
"""
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from tqdm.auto import tqdm

from . import layerwise as layerwise_decode
from .attention import layer_kernels
from .cache import StaticCache
from .graphs import Step
from .inputs import check_inputs, check_second_per_grid_ts

# HF GenerationConfig defaults, used where neither the call nor generation_config.json says otherwise.
HF_DEFAULTS = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, max_length=20,
                   max_new_tokens=None, min_new_tokens=0)
# Decode steps are compiled per (batch rows, cache length) bucket, both powers of two, each once for the
# model's life: 6-7 s for 28 layers on the development CPU. On the CPU backend attention over the cache costs in
# proportion to its length (overhead shape: 15 ms/token over 256 positions, 20 over 4096; 2b-slice: 70 against
# 77, which the whole 2B model pays 7 times over), so the tightest bucket decodes fastest; but a compilation
# costs hundreds of steps. Runners.get rents before it buys: a generation runs in the shortest compiled bucket
# that holds it as long as the steps run that way for its own bucket (this one's included) stay below what a
# compilation costs in steps of that bucket (both measured as they happen); then its own bucket is compiled.
# Until a bucket's costs are measured, a compilation counts as SHORT_GENERATION steps (WHOLE_STEP_AFTER while
# the bucket decodes layer by layer, see below). When no compiled bucket holds a short generation (fewer than
# SHORT_GENERATION new tokens), the bucket compiled has room to spare (twice the need, and SHORT_CACHE_POSITIONS
# shared by the rows), so that the next short requests fit it: in a stream of 32 requests of 27 to 2154 prompt
# tokens and 8 new tokens, one decode compilation instead of five. Under sdpa on the CPU backend (decode_kernels)
# a step reads only the positions its rows see, so it costs the same in any bucket that holds the generation:
# a generation always runs in a compiled bucket that holds it (at `2b-slice` the measured rule bought four more
# buckets in a 12-request stream, for nothing).
MIN_CACHE_LENGTH = 256
SHORT_GENERATION = 64
SHORT_CACHE_POSITIONS = 4096
# Under eager attention on the CPU backend generate() first decodes a bucket layer by layer (layerwise.py); under
# sdpa (the CPU's default) the whole step's layers are fused kernels (decode_kernels) and it compiles in about 1 s
# at 28 layers, so it runs from the first token. Layer by layer is two small graphs of its own (and the prompt's
# head step), compiled in about 0.5 s, against 5.2-6.2 s for the eager whole-decoder step at 28 layers
# (development CPU, AMD EPYC).
# A token then takes about 6-8 ms more than with the whole step (overhead shape: 33-35 ms against 27-29 in the
# same processes). A bucket compiles its whole step before a generation whose tokens, with those it has already
# decoded layer by layer, reach what that compilation costs over what it saves per token. Until both steps have
# been measured in this process, that is this many tokens: 5 s / 8 ms is about 600; rounded down, towards the
# whole step.
WHOLE_STEP_AFTER = 512


def _power_of_two(n, minimum=1):
    return max(minimum, 1 << (int(n) - 1).bit_length())


def cache_length(needed):
    """Cache positions for a generation that needs `needed` of them."""
    return _power_of_two(needed, MIN_CACHE_LENGTH)


def batch_rows(batch):
    """Rows of the decode step for `batch` sequences (the rest are idle)."""
    return _power_of_two(batch)


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    eos_token_id: Tuple[int, ...]
    pad_token_id: Optional[int]


def _as_int(value, name, minimum, what):
    """value as an int >= minimum, or a ValueError naming the option."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _as_float(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _id_list(value, name):
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    return tuple(_as_int(v, name, 0, "a token id or a list of token ids (non-negative ints)") for v in values)


def resolve_options(model, prompt_length, **given) -> GenerationOptions:
    """Options of one call: the arguments, else the checkpoint's generation_config.json, else HF's defaults."""
    saved = model.generation_config

    def pick(name):
        if given.get(name) is not None:
            return given[name]
        if saved.get(name) is not None:
            return saved[name]
        return HF_DEFAULTS.get(name)

    max_new = pick("max_new_tokens")
    if max_new is None:
        max_length = _as_int(pick("max_length"), "max_length", 1, "a positive int")
        max_new = max_length - prompt_length
        if max_new <= 0:
            raise ValueError(f"the prompt is {prompt_length} tokens long but max_length is {max_length}: "
                             "pass max_new_tokens (tokens to generate after the prompt)")
    max_new = _as_int(max_new, "max_new_tokens", 1, "a positive int")
    # The static cache holds prompt and answer: a bound, checked here, rather than a failed allocation later.
    limit = model.config.text_config.max_position_embeddings
    if prompt_length + max_new > limit:
        raise ValueError(f"max_new_tokens {max_new}: with the prompt's {prompt_length} tokens that is more than the "
                         f"model's {limit} positions (max_position_embeddings)")
    min_new = _as_int(pick("min_new_tokens"), "min_new_tokens", 0, "a non-negative int")
    do_sample = bool(pick("do_sample"))
    top_k = _as_int(pick("top_k"), "top_k", 0, "a non-negative int (0 disables it)")
    temperature, top_p, penalty = (_as_float(pick(n), n) for n in ("temperature", "top_p", "repetition_penalty"))
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    eos = _id_list(given["eos_token_id"] if given.get("eos_token_id") is not None
                   else saved.get("eos_token_id", model.config.eos_token_id), "eos_token_id")
    pad = pick("pad_token_id")
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # as HF does: finished rows repeat the first eos id
    if pad is not None:
        pad = _id_list(pad, "pad_token_id")
        if len(pad) != 1:
            raise ValueError(f"pad_token_id must be one token id, got {pad}")
        pad = pad[0]
    return GenerationOptions(max_new, min_new, do_sample, temperature, top_k, top_p, penalty, eos, pad)


# ---------------------------------------------------------------------------------------------- choosing
class TokenChooser:
    """HF's logits processing for one call, on the host in float32: repetition penalty and min_new_tokens
    (also when greedy), then, when sampling, temperature, top-k and top-p, and a draw.

    The tokens seen so far (prompt, padding included, and everything generated) are a [batch, vocab] mask
    updated by `observe`, so the per-token work does not grow with the sequence.
    """

    def __init__(self, options: GenerationOptions, prompt_ids, vocab_size, rng=None):
        self.o = options
        self.vocab_size = vocab_size
        self.rng = rng
        self.eos = np.array([e for e in options.eos_token_id if e < vocab_size], np.int64)
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros((prompt_ids.shape[0], vocab_size), bool)
            rows = np.repeat(np.arange(prompt_ids.shape[0]), prompt_ids.shape[1])
            ids = prompt_ids.reshape(-1)
            keep = (ids >= 0) & (ids < vocab_size)
            self.seen[rows[keep], ids[keep]] = True

    def observe(self, tokens):
        if self.seen is not None:
            keep = (tokens >= 0) & (tokens < self.vocab_size)
            self.seen[np.nonzero(keep)[0], tokens[keep]] = True

    def __call__(self, logits, step):
        """logits [batch, vocab] float32 of the last position -> next tokens [batch] int64."""
        return self.pick(self.process(logits, step))

    def process(self, logits, step):
        """HF's processors in HF's order (repetition penalty, min_new_tokens; temperature when sampling)."""
        scores = np.array(logits, np.float32)
        if self.seen is not None:
            p = np.float32(self.o.repetition_penalty)
            penalised = np.where(scores < 0, scores * p, scores / p)
            scores = np.where(self.seen, penalised, scores)
        if step < self.o.min_new_tokens and self.eos.size:
            scores[:, self.eos] = -np.inf
        if self.o.do_sample and self.o.temperature != 1.0:
            scores = scores / np.float32(self.o.temperature)
        return scores

    def filtered(self, scores):
        """The scores HF reports with output_scores: when sampling, top-k and top-p leave -inf outside the tokens
        they keep."""
        if not self.o.do_sample or (not self.o.top_k and self.o.top_p >= 1.0):
            return scores
        out = np.full_like(scores, -np.inf)
        for i, row in enumerate(scores):
            cand = self.candidates(row)
            out[i] = row if cand is None else out[i]
            if cand is not None:
                out[i, cand] = row[cand]
        return out

    def pick(self, scores):
        if not self.o.do_sample:
            return scores.argmax(-1).astype(np.int64)
        return np.array([self._sample(row) for row in scores], np.int64)

    def candidates(self, x):
        """The token ids top-k and top-p leave to draw from, for one row of scores (None: all of them)."""
        vocab = x.shape[0]
        cand = None
        k = min(max(self.o.top_k, 1), vocab) if self.o.top_k else 0
        if k and k < vocab:
            kth = np.partition(x, vocab - k)[vocab - k]
            cand = np.flatnonzero(x >= kth)  # ties with the k-th score stay, as in HF
        if self.o.top_p < 1.0:
            cand = self._nucleus(x, cand)
        return cand

    def _sample(self, x):
        cand = self.candidates(x)
        logits = x if cand is None else x[cand]
        finite = np.isfinite(logits)
        if not finite.any():
            raise ValueError("every token has probability 0 after the logits processors (all scores are -inf)")
        probs = np.exp(logits.astype(np.float64) - logits[finite].max())
        cdf = np.cumsum(probs)
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        return i if cand is None else int(cand[i])

    def _nucleus(self, x, cand):
        """HF's top-p: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the
        most probable always. Only the most probable tokens can survive, so a partial sort of enough of
        them to cover top_p replaces the full sort of the vocabulary."""
        support = np.arange(x.shape[0]) if cand is None else cand
        logits = x[support].astype(np.float32)
        shifted = np.exp((logits - logits.max()).astype(np.float64))
        probs = shifted / shifted.sum()
        m = min(256, len(support))
        while True:
            top = np.argpartition(-probs, m - 1)[:m] if m < len(support) else np.arange(len(support))
            mass = probs[top].sum()
            if mass >= self.o.top_p or m == len(support):
                break
            m = min(m * 4, len(support))
        order = top[np.argsort(logits[top], kind="stable")]  # ascending, as HF sorts
        cumulative = (1.0 - mass) + np.cumsum(probs[order])
        remove = cumulative <= 1.0 - self.o.top_p
        remove[-1] = False
        return support[order[~remove]]


# ---------------------------------------------------------------------------------------------- device steps
def decode_kernels(model):
    """The CPU kernels that run a decode step's decoder layer and its head as one operator each
    (cpu_kernels.py, csrc/decode.cc), or None where they do not apply: they come with the "sdpa" attention of
    the CPU backend, compute in float32, and know nothing of tensor parallelism (a rank's layer would have to
    reduce its partial products across the ranks)."""
    if model.tensor_parallel or model.policy.cache_dtype != ms.float32:
        return None
    return layer_kernels(model.policy)


class DecodeOneToken(Step):
    """One token per row, each at its own cache position [B] -> float32 logits [B, V]. Its inputs have the same
    shapes at every step, so GRAPH_MODE compiles it once per (batch rows, cache length): the whole decoder and
    lm_head in one graph (a decode step's workspace is small; its cost is the kernels it launches). Where
    `decode_kernels` gives them, each layer and the head are one operator: 30 kernels a step instead of ~1300 at
    28 layers, compiled in a fraction of the time."""

    def __init__(self, model, cache: StaticCache):
        super().__init__()
        # Plain attributes, not registered sub-cells: every call of a compiled Cell walks its registered
        # sub-cells in Python (Cell.compile_phase), 1.4-1.7 ms per token through the ~290 cells of the 28-layer
        # `overhead` shape. The graph resolves these attributes all the same.
        object.__setattr__(self, "text", model.model)
        object.__setattr__(self, "cache", cache)
        object.__setattr__(self, "lm_head", model.lm_head)
        object.__setattr__(self, "storage", getattr(cache, "cache", cache))  # a CacheView's StaticCache, or cache
        object.__setattr__(self, "kernels", decode_kernels(model))
        self.fused = self.kernels is not None
        # Each layer's Parameters, gathered once: a layer.weights() call in construct is parsed once per layer.
        layers = model.model.layers if self.fused else ()
        object.__setattr__(self, "layer_weights", tuple(tuple(layer.weights()) for layer in layers))
        self.eps = Tensor(np.array([model.config.text_config.rms_norm_eps], np.float32))

    def construct(self, input_ids, cache_position, rope_position):
        """input_ids [B] (each row's last token), cache_position [B] (where it goes in the row's cache),
        rope_position [B] (its rotary position: cache_position + the row's rope delta)."""
        b = input_ids.shape[0]
        # The three M-RoPE axes advance together after the prompt.
        position_ids = ops.broadcast_to(rope_position.reshape(1, b, 1), (3, b, 1))
        text, cache = self.text, self.cache
        x, rows = text.embed_tokens(input_ids), cache.rows(cache_position)
        if self.fused:
            # The kernel reads the positions each row's mask shows and nothing else, so a view of the cache
            # (engine.Worker) is its whole storage with the whole-length mask. Each layer writes its key and value
            # into the storage's Parameters in place, as ScatterUpdate does.
            storage = self.storage
            mask = storage.attention_mask(cache_position)
            cos, sin = text.rotary_emb(position_ids)
            for i, weights in enumerate(self.layer_weights):
                kv = storage.layers[i]
                x = self.kernels.decode_layer(x, cos, sin, mask, rows, kv.key, kv.value, *weights, self.eps)
            return self.kernels.decode_head(x, text.norm.weight, self.lm_head.weight, self.eps)
        mask = cache.attention_mask(cache_position)
        return self.lm_head(text(x, position_ids, mask, cache.layers, rows)).astype(ms.float32)


class TimedStep:
    """A decode step (DecodeOneToken, layerwise.LayerwiseDecode) called with inputs of one shape, and what it
    costs (measured): its first call (compilation in GRAPH_MODE, and one step) and its later steps. Several can
    share one step cell, one per input shape it is called with."""

    def __init__(self, decode):
        self.decode = decode
        self.calls = 0
        self.first_call_s = None  # the first call: compilation (GRAPH_MODE) and one step
        self.step_s = None  # later calls, a running average

    def step(self, *args):
        """One decode step -> logits as numpy, timed."""
        t = time.perf_counter()
        logits = self.decode(*args).asnumpy()
        elapsed = time.perf_counter() - t
        self.calls += 1
        if self.first_call_s is None:
            self.first_call_s = elapsed
        elif self.step_s is None:
            self.step_s = elapsed
        else:
            self.step_s = 0.9 * self.step_s + 0.1 * elapsed
        return logits

    def steps_per_compilation(self):
        """How many of these steps a compilation costs; None until both are measured."""
        if self.first_call_s is None or self.step_s is None:
            return None
        return max(0.0, self.first_call_s - self.step_s) / self.step_s


class Runner(TimedStep):
    """A KV cache of `rows` x `length`, the whole-decoder step over it (this TimedStep), and what the step costs
    (measured). For generate() (layerwise=True), also the layer-by-layer step (`layerwise`, layerwise.py), which
    decodes until `plan` finds that the tokens asked of the bucket make the whole step's compilation worth it."""

    def __init__(self, model, rows, length, layerwise=True):
        self.rows, self.length = rows, length
        self.cache = StaticCache(model.config.text_config, rows, length, model.policy.cache_dtype,
                                 kv_heads=model.model.layers[0].self_attn.num_kv_heads,
                                 input_dtype=model.policy.compute_dtype)
        super().__init__(DecodeOneToken(model, self.cache))
        # Fused layers compile in a fraction of the whole step's time and need no layer-by-layer phase.
        use = layerwise and layerwise_decode.allowed(model) and not self.decode.fused
        self.layerwise = TimedStep(layerwise_decode.LayerwiseDecode(model, self.cache)) if use else None
        self.whole = not use  # whether generate() runs the whole step

    def plan(self, new_tokens, after):
        """Before a generation of up to `new_tokens` tokens: the whole step from now on once the layer-wise steps
        run so far and these reach `after` (Runners.whole_step_after)."""
        if not self.whole and self.layerwise.calls + new_tokens >= after:
            self.whole = True

    def generate_step(self, *args):
        """One decode step of generate() -> logits as numpy: the whole step or the layer-wise one (see plan)."""
        return self.step(*args) if self.whole else self.layerwise.step(*args)


class Runners:
    """The model's decode steps and caches by (batch rows, cache length) bucket, kept for the model's life:
    a workload compiles the buckets it needs once (see the bucket policy above), and memory stops growing once
    they exist."""

    def __init__(self, model):
        self.model = model
        self.by_shape = {}
        self.rented = {}  # (rows, length) not compiled -> steps run for it in longer buckets
        # Layer-wise tokens after which a bucket compiles its whole step; None: measured (whole_step_after).
        # 0: the whole step from the first token.
        self.whole_after = None

    def get(self, batch, needed, new_tokens=SHORT_GENERATION) -> Runner:
        """The runner for `batch` sequences of up to `needed` positions, `new_tokens` of them generated."""
        rows, length = batch_rows(batch), cache_length(needed)
        key = (rows, length)
        if key not in self.by_shape:
            longer = sorted(n for r, n in self.by_shape if r == rows and n > length)
            if longer and self.by_shape[rows, longer[0]].decode.fused:
                # Its kernels read only the positions each row sees: a step costs the same in any bucket that
                # holds the generation, and a tighter one would only cost a compilation and its cache's memory.
                key = (rows, longer[0])
            elif longer:
                holder = self.by_shape[rows, longer[0]]
                budget = holder.steps_per_compilation()
                if budget is None:  # its whole step not measured yet
                    # A bucket that decodes layer by layer: a bucket of its own would cost layer-wise graphs now
                    # and a whole step later. With 64 steps for them, a stream of 32 short requests bought a
                    # second bucket at the 30th.
                    budget = SHORT_GENERATION if holder.layerwise is None else WHOLE_STEP_AFTER
                rented = self.rented.get(key, 0) + new_tokens
                if rented < budget:
                    self.rented[key] = rented
                    key = (rows, longer[0])
            elif new_tokens < SHORT_GENERATION:
                key = (rows, cache_length(max(2 * needed, SHORT_CACHE_POSITIONS // rows)))
        if key not in self.by_shape:
            self.by_shape[key] = Runner(self.model, *key)
        runner = self.by_shape[key]
        runner.plan(new_tokens, self.whole_step_after())
        return runner

    def whole_step_after(self):
        """Layer-wise tokens of a bucket after which its whole step is worth compiling: `whole_after` if set;
        WHOLE_STEP_AFTER until a whole step and a layer-wise one have been measured (in any buckets); then the
        measured compilation over what the whole step saves per token."""
        if self.whole_after is not None:
            return self.whole_after
        whole = [r for r in self.by_shape.values() if r.steps_per_compilation() is not None]
        layerwise = [r.layerwise for r in self.by_shape.values() if r.layerwise and r.layerwise.step_s]
        if not whole or not layerwise:
            return WHOLE_STEP_AFTER
        saved = layerwise[0].step_s - whole[0].step_s
        return float("inf") if saved <= 0 else (whole[0].first_call_s - whole[0].step_s) / saved

    def steps_rented(self):
        """{(rows, length) not compiled: decode steps run for it in longer buckets so far}."""
        return dict(self.rented)

    def graphs(self):
        steps = {}
        for (rows, length), runner in sorted(self.by_shape.items()):
            steps[f"decode.{rows}x{length}"] = runner.decode
            if runner.layerwise is not None:
                steps[f"decode_layers.{rows}x{length}"] = runner.layerwise.decode
            steps[f"write.{rows}x{length}"] = runner.cache.write_prompt
        return steps

    def nbytes(self):
        return sum(r.cache.nbytes() for r in self.by_shape.values())


# ---------------------------------------------------------------------------------------------- generate
class GenerateOutput(dict):
    """generate(return_dict_in_generate=True): `sequences` [batch * num_return_sequences, prompt + new], and with
    output_scores / output_logits a tuple of [rows, vocab] float32 arrays per step (`scores`: after the logits
    processors, as HF reports them; `logits`: as the model gave them). Keys and attributes both work, as HF's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# HF options this generate does not implement, accepted at the value that asks for none of it (HF's default), so
# that calls written for HF (`num_beams=1`, ...) run unchanged; any other value is refused by name.
NOTHING_ASKED = {"num_beams": 1, "num_beam_groups": 1, "output_attentions": False, "output_hidden_states": False}


def asks_nothing(name, value):
    if name not in NOTHING_ASKED:
        return False
    if value is None:
        return True
    default = NOTHING_ASKED[name]
    if isinstance(default, bool):
        return value is False or (isinstance(value, np.bool_) and not value)
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer)) and value == default


def stop_string_rows(tokenizer, stop_strings, rows):
    """Rows (lists of token ids) whose text now holds a stop string that ends in their last token, HF's rule (a
    stop string seen earlier does not count again). -> bool array."""
    done = np.zeros(len(rows), bool)
    for i, row in enumerate(rows):
        before = tokenizer.decode(row[:-1])
        text = tokenizer.decode(row)
        for stop in stop_strings:
            at = text.find(stop, max(0, len(before) - len(stop) + 1))
            if at >= 0 and at + len(stop) > len(before):
                done[i] = True
                break
    return done


def generate(model, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *, max_new_tokens=None,
             min_new_tokens=None, max_length=None, do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
             eos_token_id=None, pad_token_id=None, num_return_sequences=None, stop_strings=None, tokenizer=None,
             return_dict_in_generate=False, output_scores=False, output_logits=False, streamer=None,
             progress=False, use_cache=True, inputs_embeds=None, **unknown):
    """Generate after the prompt, like HF's `generate` for greedy search and sampling.

    Takes the processor's dict (numpy or ms.Tensor): `model.generate(**inputs, max_new_tokens=128)`.
    Options left as None come from the checkpoint's generation_config.json, then HF's defaults (greedy unless
    the checkpoint says do_sample; eos from generation_config.json, else config.eos_token_id; pad from them,
    else the first eos id). `eos_token_id` may be one id or a list. Rows that finish (emit an eos id) are
    filled with pad_token_id; generation stops when every row has finished or after max_new_tokens.
    `streamer` gets HF's calls: `put(prompt ids [B, S])`, `put(new ids [B])` per step, then `end()`
    (`transformers.TextStreamer` / `TextIteratorStreamer` work). Sampling runs on the host, seeded from numpy's
    global RNG, which `ms.set_seed(n)` seeds: it makes sampling repeatable on any device. `progress=True` shows a tqdm bar of the new tokens.
    `num_return_sequences=n` (sampling) gives n rows per prompt, the prompt (and its images) computed once.
    `stop_strings` (with `tokenizer=`) end a row as HF's StopStringCriteria does (the text kept, as HF does).
    `return_dict_in_generate=True` returns a GenerateOutput (sequences, and scores / logits when asked).
    Generation from `inputs_embeds` alone is not supported: pass input_ids (and the vision inputs).
    Other HF options raise a TypeError naming them, except `num_beams=1`, `num_beam_groups=1`,
    `output_attentions=False` and `output_hidden_states=False`, which ask for nothing more (HF's defaults).
    `second_per_grid_ts` (Qwen2.5-VL, from its processor): seconds per temporal grid step of each video, as HF.

    Returns the ids with the prompt first, [batch, prompt + new] int64, like HF: a numpy array, or an
    ms.Tensor when input_ids was one (so `out[:, inputs["input_ids"].shape[1]:]` and
    `processor.batch_decode` work as with HF).
    """
    unsupported = [f"{k}={v!r}" if k in NOTHING_ASKED else k for k, v in sorted(unknown.items())
                   if not asks_nothing(k, v)]
    if unsupported:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(unsupported)} (greedy search and "
                        "sampling only: no beam search, no attentions or hidden states in the output)")
    if inputs_embeds is not None:
        raise ValueError("generate from inputs_embeds is not supported: pass input_ids and the vision inputs")
    if not use_cache:
        raise ValueError("use_cache=False is not supported: generation always uses the static KV cache")
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise TypeError(f"streamer must have put() and end() methods, as transformers' streamers do; got "
                        f"{type(streamer).__name__}")
    ids, mask, images, videos = check_inputs(model.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                             pixel_values_videos, video_grid_thw)
    pixel_values, image_grid_thw = images or (None, None)
    pixel_values_videos, video_grid_thw = videos or (None, None)
    prompts, seq = ids.shape
    options = resolve_options(model, seq, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              max_length=max_length, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    pad = options.pad_token_id
    if attention_mask is None and pad is not None and pad not in options.eos_token_id and (ids == pad).any():
        # As HF's generate: without a mask, the pad token marks the padding (unless it is also an end token).
        mask = (ids != pad).astype(mask.dtype)
        if not mask.any(-1).all():
            raise ValueError(f"input_ids rows {np.nonzero(~mask.any(-1))[0].tolist()} hold only the pad token {pad}")
    if not mask[:, -1].all():
        rows = np.nonzero(mask[:, -1] == 0)[0].tolist()
        raise ValueError(f"rows {rows} of the batch end in padding: generation needs left padding "
                         "(processor/tokenizer padding_side='left')")
    copies = 1 if num_return_sequences is None else num_return_sequences
    if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 1:
        raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences!r}")
    if copies > 1 and not options.do_sample:
        raise ValueError(f"greedy search gives one sequence per prompt: num_return_sequences={copies} needs "
                         "do_sample=True (beam search is not supported)")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= (e.g. processor.tokenizer)")
    if any(not isinstance(x, str) or not x for x in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    batch = prompts * copies  # HF's order: the copies of a prompt side by side

    check_second_per_grid_ts(second_per_grid_ts, video_grid_thw)  # before the vision tower's work
    embeds = model.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    position_ids, rope_deltas = model.get_rope_index(ids, image_grid_thw, video_grid_thw, mask, second_per_grid_ts)
    lengths = np.repeat(mask.sum(-1), copies)
    runner = model.runners.get(batch, int(lengths.max()) + options.max_new_tokens, options.max_new_tokens)
    # Each row's sequence starts at position 0 of its cache row, its padding left out; the rope delta moves
    # from the padded index to that position. Rows past the batch are idle: a pad token at position 0.
    deltas = np.zeros(runner.rows, np.int64)
    deltas[:batch] = np.repeat(rope_deltas[:, 0], copies) + seq - lengths
    rows_ids = np.repeat(ids, copies, axis=0)

    rng = None
    if options.do_sample:
        # On the host, from numpy's global RNG: `ms.set_seed(n)` seeds it (MindSpore documents this), on every
        # device, whereas the seed of MindSpore's random ops is documented to have no effect on Ascend.
        seed = int(np.random.randint(0, 2 ** 31 - 1))
        if model.tensor_parallel:
            from .parallel import same_on_all_ranks

            seed = same_on_all_ranks(seed)  # every rank must draw the same tokens
        rng = np.random.default_rng(seed)
    chooser = TokenChooser(options, rows_ids, model.config.text_config.vocab_size, rng)
    scores, raw = [], []
    eos = np.array(options.eos_token_id, np.int64)
    new = np.empty((batch, options.max_new_tokens), np.int64)
    unfinished = np.ones(batch, bool)
    steps = 0
    bar = tqdm(total=options.max_new_tokens, desc="Generating", unit="token", disable=not progress)
    try:
        if streamer is not None:
            streamer.put(rows_ids.copy())
        last = []
        for prompt, hidden, kv in model.prompt_rows(embeds, position_ids, mask, keep_last=1, keep_kv=True):
            for row in range(prompt * copies, (prompt + 1) * copies):  # written once per copy, computed once
                runner.cache.write_prompt(Tensor(runner.cache.prompt_rows(row, int(lengths[row]))), *kv)
                last.append(hidden)
        logits = model.head(ops.cat(last, 0)).asnumpy()
        tokens_in = np.zeros(runner.rows, np.int32)
        position = np.zeros(runner.rows, np.int64)
        for step in range(options.max_new_tokens):
            processed = chooser.process(logits[:batch], step)
            if output_logits:
                raw.append(np.array(logits[:batch], np.float32))
            if output_scores:
                scores.append(chooser.filtered(processed))
            tokens = chooser.pick(processed)
            if eos.size and options.pad_token_id is not None:
                tokens = np.where(unfinished, tokens, options.pad_token_id)
            new[:, step] = tokens
            steps += 1
            chooser.observe(tokens)
            if streamer is not None:
                streamer.put(tokens.copy())
            bar.update(1)
            if eos.size:
                unfinished &= ~np.isin(tokens, eos)
            if stops:
                generated = [list(rows_ids[r, mask[r // copies] == 1]) + new[r, :steps].tolist() for r in range(batch)]
                unfinished &= ~stop_string_rows(tokenizer, stops, generated)
            if not unfinished.any() or step + 1 == options.max_new_tokens:
                break
            tokens_in[:batch] = tokens
            position[:batch] = lengths + step
            logits = runner.generate_step(Tensor(tokens_in), Tensor(position.astype(np.int32)),
                                 Tensor((position + deltas).astype(np.int32)))
    finally:
        bar.close()
        if streamer is not None:
            streamer.end()
    out = np.concatenate([rows_ids, new[:, :steps]], axis=1)
    out = Tensor(out, ms.int64) if isinstance(input_ids, Tensor) else out
    if not return_dict_in_generate:
        return out
    result = GenerateOutput(sequences=out)
    if output_scores:
        result["scores"] = tuple(scores)
    if output_logits:
        result["logits"] = tuple(raw)
    return result
