"""The engine: requests from any thread, one thread running the model, continuous batching.

The engine holds a KV cache of `max_batch` rows ("slots") of `max_len` positions and loops:
  admit  a waiting request takes a free slot: its prompt (vision tower included) runs through the prompt steps
         and its keys and values are written to the slot's cache rows; its first token comes from that
  step   one decode step for every slot at once (idle slots decode a pad token at position 0 of their own row);
         each request picks its next token with its own options; a finished or cancelled request frees its
         slot at once, and a waiting one can take it before the next step
Each slot has its own position and rope delta, so requests join and leave the running batch at any step; the
decode step keeps its shapes and is compiled once for the engine (GRAPH_MODE). A request's greedy tokens do not
depend on what else runs: every row of a step is computed alone.

Requests yield events (`Request.events()`): ("token", id, text added) as tokens come, then ("done", finish
reason, usage) or ("error", exception). Nothing here knows HTTP; serving.py is a thin layer over it.

The device work (a prefill into a slot, a decode step) goes through a `Worker`. Under tensor parallelism every
rank of the msrun job must run the same graphs in the same order (their collectives wait for each other): rank 0
runs the engine with a `LockstepWorker`, which broadcasts each call and its inputs before running it, and the
other ranks run `follow()`, which receives the calls and runs them, until the engine stops.
"""
import collections
import itertools
import sys
import threading

import numpy as np
from mindspore import Tensor

from . import host_memory
from .generation import DecodeOneToken, Runner, TimedStep, TokenChooser, asks_nothing, batch_rows, resolve_options
from .inputs import check_inputs, check_second_per_grid_ts

DEFAULT_MAX_LEN = 4096


class EngineFull(RuntimeError):
    """The engine's queue of waiting requests is full."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class Request:
    """One submitted generation: iterate `events()` (or call `result()`) from any thread; `cancel()` frees its
    slot at the next step."""

    _ids = itertools.count(1)

    def __init__(self, ids, images, videos, options, stop, seed):
        self.id = next(self._ids)
        self.ids, self.images, self.videos = ids, images, videos
        self.options, self.stop, self.seed = options, tuple(stop or ()), seed
        self.second_per_grid_ts = None  # Qwen2.5-VL videos: seconds per temporal grid step (submit's argument)
        self.tokens = []
        self.text = ""
        self.finish_reason = None
        self.cancelled = False
        self._events = collections.deque()
        self._cond = threading.Condition()

    @property
    def prompt_tokens(self):
        return int(self.ids.shape[1])

    def cancel(self):
        self.cancelled = True

    def _put(self, event):
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def events(self, timeout=None):
        """("token", id, text added), then ("done", finish_reason, usage) or ("error", exception)."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"request {self.id}: no event in {timeout} s")
                event = self._events.popleft()
            yield event
            if event[0] in ("done", "error"):
                return

    def result(self, timeout=None):
        """-> (generated token ids, text, finish reason); raises the request's error."""
        for event in self.events(timeout):
            if event[0] == "error":
                raise event[1]
        return list(self.tokens), self.text, self.finish_reason


class _Call:
    """A call of the model's generate/forward handed to the engine's thread by another thread."""

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Event()
        self.ran, self.result, self.error = False, None, None

    def run(self):
        try:
            self.result, self.ran = self.fn(), True
        except Exception as error:  # the caller's, raised on its thread
            self.error = error
        finally:
            self.done.set()


class _Slot:
    """What the engine keeps for a request while it holds a slot."""

    def __init__(self, request, chooser, position, delta, eos):
        self.request, self.chooser = request, chooser
        self.position, self.delta, self.eos = position, delta, eos
        self.step = 0
        self.last = 0
        self.emitted = 0  # characters of the decoded text already sent
        self.fixed = ""  # text of tokens[:anchor], which ends on a whole character and cannot change
        self.anchor = 0
        self.searched = 0  # characters already searched for stop strings (all of `fixed`)


PREFILL, DECODE, STOP = 1, 2, 3
# A decode step attends over the first `length` positions of the cache, the shortest of VIEW_LENGTH, 2 x VIEW_LENGTH,
# 4 x ... and the whole cache that holds every busy row, and runs one row when only the first slot is busy.
# Measured at the 2b-slice shape (graph mode, AMD EPYC, 2 cores), a step of 8 rows over 4096 positions took
# 133-141 ms, 8 x 2048 119 ms, 8 x 1024 103 ms, 8 x 512 103 ms; one row 79-83 ms at any length (so one row has the
# first and the whole length only). A view's graph is compiled when renting a longer one has cost as much as its
# compilation (Worker.decode_shape).
VIEW_LENGTH = 512


class Worker:
    """The device side of the engine: the model, the cache of `rows` x `max_len`, the prefill and decode calls."""

    def __init__(self, model, rows, max_len):
        self.model = model
        self.runner = Runner(model, rows, max_len, layerwise=False)  # the engine decodes with whole steps
        # Fused kernels read only the positions a row sees: a view would save nothing.
        views = () if self.runner.decode.fused else (VIEW_LENGTH * 2 ** k for k in range(32))
        shorter = [n for n in views if n < max_len]
        self.lengths = shorter + [max_len]
        self.views = {}  # length -> DecodeOneToken over the cache's first rows and first `length` positions
        self.steps = {(rows, max_len): self.runner}  # (rows, length) -> TimedStep, once called
        self.rented = collections.Counter()  # (rows, length) not compiled: steps run for it in a longer view

    def decode_shape(self, busy, positions):
        """(rows, length) of the decode step for the busy slots (indices) at their cache positions: the shortest
        view that holds them, or, while its graph is not compiled, the shortest compiled one that does, until
        the steps run that way add up to what that one's compilation cost (ski rental: at most twice the best
        choice made in hindsight)."""
        rows = 1 if max(busy) == 0 else self.runner.rows
        # One row costs about the same at any length (it reads one row's positions), so it has two views only.
        lengths = self.lengths if rows > 1 else sorted({self.lengths[0], self.lengths[-1]})
        fits = [n for n in lengths if n > max(positions)]
        want = (rows, fits[0])
        if self.compiled(want):
            return want
        longer = [(rows, n) for n in fits[1:] if self.compiled((rows, n))]
        if longer:
            budget = self.steps[longer[0]].steps_per_compilation()
            if budget is not None and self.rented[want] < budget:
                self.rented[want] += 1
                return longer[0]
        return want

    def compiled(self, key):
        step = self.steps.get(key)
        return step is not None and step.first_call_s is not None

    def decode_graphs(self):
        """Compiled decode graphs, every view counted."""
        return self.runner.decode.compiled() + sum(step.compiled() for step in list(self.views.values()))

    def prefill(self, slot, ids, images, videos, second_per_grid_ts):
        """A prompt (ids [1, S], no padding) into cache row `slot` -> (logits of its last position [V], its rope
        delta)."""
        model = self.model
        (pixels, grid), (vpixels, vgrid) = images or (None, None), videos or (None, None)
        mask = np.ones_like(ids)
        with model.lock:
            embeds = model.embed(ids, pixels, grid, vpixels, vgrid)
            positions, deltas = model.get_rope_index(ids, grid, vgrid, mask, second_per_grid_ts)
            (_, hidden, kv), = model.prompt_rows(embeds, positions, mask, keep_last=1, keep_kv=True)
            cache = self.runner.cache
            cache.write_prompt(Tensor(cache.prompt_rows(slot, ids.shape[1])), *kv)
            logits = model.head(hidden).asnumpy()
        return logits[0], int(deltas[0, 0])

    def decode(self, tokens, position, delta, length):
        """One decode step for the first len(tokens) rows over the cache's first `length` positions -> logits
        [rows, V]."""
        args = (Tensor(tokens.astype(np.int32)), Tensor(position.astype(np.int32)),
                Tensor((position + delta).astype(np.int32)))
        key = (len(tokens), length)
        with self.model.lock:
            if key not in self.steps:
                if length not in self.views:
                    self.views[length] = DecodeOneToken(self.model, self.runner.cache.view(length))
                self.steps[key] = TimedStep(self.views[length])
            return self.steps[key].step(*args)

    def close(self):
        pass


def _media(pair):
    return (None, None) if pair is None else (np.asarray(pair[0], np.float32), np.asarray(pair[1], np.int64))


class LockstepWorker(Worker):
    """Rank 0's worker under tensor parallelism: every call is broadcast (parallel.broadcast_arrays) before it
    runs, so the other ranks (`follow`) run it too."""

    def prefill(self, slot, ids, images, videos, second_per_grid_ts):
        from .parallel import broadcast_arrays

        seconds = None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64)
        broadcast_arrays([np.array([PREFILL, slot], np.int64), np.asarray(ids, np.int64), *_media(images),
                          *_media(videos), seconds])
        return super().prefill(slot, ids, images, videos, second_per_grid_ts)

    def decode(self, tokens, position, delta, length):
        from .parallel import broadcast_arrays

        broadcast_arrays([np.array([DECODE, length], np.int64), tokens.astype(np.int64), position, delta])
        return super().decode(tokens, position, delta, length)

    def close(self):
        from .parallel import broadcast_arrays

        broadcast_arrays([np.array([STOP, 0], np.int64)])


def follow(model, max_batch=8, max_len=DEFAULT_MAX_LEN):
    """The loop of the ranks other than 0 in a tensor-parallel server: run the prefills and decode steps rank 0's
    engine broadcasts (with the same max_batch and max_len as its engine), until it stops."""
    from .parallel import broadcast_arrays

    worker = Worker(model, batch_rows(max_batch), max_len)
    while True:
        (kind, arg), *arrays = broadcast_arrays()  # arg: the slot of a PREFILL, the length of a DECODE
        if kind == STOP:
            return
        try:
            if kind == PREFILL:
                ids, pixels, grid, vpixels, vgrid, seconds = arrays
                worker.prefill(int(arg), ids, None if pixels is None else (pixels, grid),
                               None if vpixels is None else (vpixels, vgrid), seconds)
            else:
                worker.decode(*arrays, int(arg))
        except Exception as error:  # rank 0 runs the same call on the same inputs and reports it to the client
            print(f"rank follower: {'prefill' if kind == PREFILL else 'decode'} failed: {type(error).__name__}: "
                  f"{error}", file=sys.stderr, flush=True)


class Engine:
    """Continuous batching over `max_batch` slots of `max_len` positions on one model thread.

    tokenizer: to decode text for the events and to apply stop strings (None: token ids only).
    launch_nice: 0, or the nice value (1-19) the engine's thread takes when it starts, CPU backend only
        (launch_priority.py: an opt-in that gives MindSpore's kernel threads the cores).
    """

    def __init__(self, model, tokenizer=None, max_batch=8, max_queue=64, max_len=DEFAULT_MAX_LEN, launch_nice=0):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(launch_nice, bool) or not isinstance(launch_nice, int) or not 0 <= launch_nice <= 19:
            raise ValueError(f"launch_nice must be an integer from 0 to 19, got {launch_nice!r}")
        self.launch_nice = launch_nice
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.rows = batch_rows(max_batch)
        parallel = model.tensor_parallel is not None and model.tensor_parallel[1] > 1
        self.worker = (LockstepWorker if parallel else Worker)(model, self.rows, max_len)
        self.runner = self.worker.runner
        self.slots = [None] * self.max_batch
        self.waiting = collections.deque()
        self.calls = collections.deque()  # _Call: generate/forward from other threads, run between steps
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = None
        self.counters = collections.Counter()  # finished requests by reason, prompt and generated tokens

    # ------------------------------------------------------------------------------------------------ callers
    def start(self):
        """Start the loop. From then until it stops, the model's generate() and forward() called from any
        thread run on the engine's thread between its steps (modeling_qwen2_vl.serialized)."""
        if self.thread is None:
            with self.model.lock:
                other = self.model.engine
                if other is not None and other is not self and other.running():
                    raise RuntimeError("this model is already served by another engine: stop it first")
                self.thread = threading.Thread(target=self._loop, name="mindone-qwen2vl-engine", daemon=True)
                object.__setattr__(self.model, "engine", self)
            self.thread.start()
        return self

    def running(self):
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    def call(self, fn):
        """fn() run on the engine's thread before its next step -> (True, its result), its exception raised
        here; (False, None) if the engine stopped before running it (the caller then runs it itself). Such a
        call holds the engine for its whole length: the requests being served wait, as they would for a lock."""
        call = _Call(fn)
        with self.cond:
            if self.stopping or self.thread is None or not self.thread.is_alive():
                return False, None
            self.calls.append(call)
            self.cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.ran, call.result

    def stop(self, timeout=None):
        """Stop the loop; requests still running or waiting end with an EngineStopped error."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *, stop=None, seed=None,
               **options) -> Request:
        """One conversation (the processor's output for one row) and generate()'s options (max_new_tokens,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, min_new_tokens) plus `stop`
        (strings; needs the tokenizer) and `seed`. `second_per_grid_ts`: Qwen2.5-VL's seconds per temporal grid
        step of each video (the processor's output), as in HF. Checked here, on the caller's thread: a bad request
        raises ValueError before it is queued; a full queue raises EngineFull."""
        ids, mask, images, videos = check_inputs(self.model.config, input_ids, attention_mask, pixel_values,
                                                 image_grid_thw, pixel_values_videos, video_grid_thw)
        if ids.shape[0] != 1:
            raise ValueError(f"submit takes one conversation, got a batch of {ids.shape[0]}")
        if not mask.all():
            ids = ids[:, mask[0] == 1]
        options = {k: v for k, v in options.items() if not asks_nothing(k, v)}  # HF's defaults, e.g. num_beams=1
        unknown = set(options) - {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                  "repetition_penalty", "eos_token_id"}
        if unknown:
            raise TypeError(f"submit() got unsupported options: {', '.join(sorted(unknown))}")
        resolved = resolve_options(self.model, ids.shape[1], pad_token_id=None, max_length=None, **options)
        if ids.shape[1] + resolved.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt is {ids.shape[1]} tokens and max_new_tokens {resolved.max_new_tokens}: more "
                             f"than the engine's {self.max_len} positions per request")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        check_second_per_grid_ts(second_per_grid_ts, None if videos is None else videos[1])
        request = Request(ids, images, videos, resolved, stop, seed)
        request.second_per_grid_ts = second_per_grid_ts
        with self.cond:
            if self.stopping:
                raise EngineStopped("the engine is stopped")
            if len(self.waiting) >= self.max_queue:
                raise EngineFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(request)
            self.cond.notify_all()
        return request

    def stats(self):
        with self.cond:
            return dict(running=sum(s is not None for s in self.slots), waiting=len(self.waiting),
                        **dict(self.counters))

    # ------------------------------------------------------------------------------------------------ loop
    def _loop(self):
        try:
            if self.launch_nice:
                from .launch_priority import lower_launch_priority

                lower_launch_priority(self.launch_nice)
            worked = False
            while True:
                if worked:
                    with self.cond:
                        idle = not (self.calls or self.waiting or any(self.slots))
                    if idle:
                        host_memory.release_freed()  # the finished requests' freed host memory back
                        worked = False
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or self.calls or self.waiting or any(self.slots))
                    if self.stopping:
                        break
                    calls = list(self.calls)
                    self.calls.clear()
                    admitted = []
                    while self.waiting and None in self.slots:
                        request = self.waiting.popleft()
                        if request.cancelled:
                            self._end(request, "cancelled")
                            continue
                        slot = self.slots.index(None)
                        self.slots[slot] = request  # reserved; its state comes with the prefill
                        admitted.append((slot, request))
                worked = True
                for call in calls:
                    call.run()
                    self.counters["calls"] += 1
                for slot, request in admitted:
                    self._run(slot, request, self._prefill)
                if any(isinstance(s, _Slot) for s in self.slots):
                    self._decode()
        finally:
            self.worker.close()
            with self.cond:
                self.stopping = True
                if self.model.engine is self:
                    object.__setattr__(self.model, "engine", None)
                pending = list(self.waiting) + [s.request if isinstance(s, _Slot) else s for s in self.slots if s]
                self.waiting.clear()
                self.slots = [None] * self.max_batch
                calls = list(self.calls)
                self.calls.clear()
            for call in calls:  # not run: their callers run them (call() returns ran=False)
                call.done.set()
            for request in pending:
                request._put(("error", EngineStopped("the engine stopped before the request finished")))

    def _run(self, slot, request, fn):
        try:
            fn(slot, request)
        except Exception as error:  # this request's failure, not the engine's: free its slot and report it
            self.slots[slot] = None
            request._put(("error", error))

    def _prefill(self, slot, request):
        model, options = self.model, request.options
        logits, delta = self.worker.prefill(slot, request.ids, request.images, request.videos,
                                            request.second_per_grid_ts)
        rng = np.random.default_rng(request.seed) if options.do_sample else None
        chooser = TokenChooser(options, request.ids, model.config.text_config.vocab_size, rng)
        state = _Slot(request, chooser, request.prompt_tokens, delta, set(options.eos_token_id))
        self.slots[slot] = state
        self.counters["prompt_tokens"] += request.prompt_tokens
        self._take(slot, state, logits)

    def _decode(self):
        busy = [i for i, state in enumerate(self.slots) if isinstance(state, _Slot)]
        rows, length = self.worker.decode_shape(busy, [self.slots[i].position for i in busy])
        tokens = np.zeros(rows, np.int32)
        position = np.zeros(rows, np.int64)
        delta = np.zeros(rows, np.int64)
        for i in busy:
            state = self.slots[i]
            tokens[i], position[i], delta[i] = state.last, state.position, state.delta
        logits = self.worker.decode(tokens, position, delta, length)
        for i, state in enumerate(self.slots):
            if isinstance(state, _Slot):
                state.position += 1
                self._run(i, state.request, lambda slot, _: self._take(slot, state, logits[slot]))

    def _take(self, slot, state, logits):
        """The request's next token from its logits row: record it, send it, and end the request if it is done."""
        request = state.request
        if request.cancelled:
            return self._finish(slot, state, "cancelled")
        token = int(state.chooser(logits[None], state.step)[0])
        state.chooser.observe(np.array([token]))
        state.step += 1
        state.last = token
        request.tokens.append(token)
        self.counters["generated_tokens"] += 1
        reason = None
        if token in state.eos:
            reason = "stop"
        elif state.step >= request.options.max_new_tokens:
            reason = "length"
        added, stopped = self._text(state, final=reason is not None)
        request._put(("token", token, added))
        if stopped:
            reason = "stop"
        if reason:
            self._finish(slot, state, reason)

    def _text(self, state, final):
        """Text added by the latest token, held back while it could still be the start of a stop string or an
        incomplete character. -> (text to send, whether a stop string ended the request).

        Incremental: only the tokens since the last whole character are decoded again (Qwen's byte-level BPE
        decodes a run of tokens that ends on a character boundary to the same text alone as in context), and stop
        strings are looked for only where the new text could complete one."""
        request = state.request
        if self.tokenizer is None:
            return "", False
        piece = self.tokenizer.decode(request.tokens[state.anchor:], skip_special_tokens=True)
        text = state.fixed + piece
        longest = max((len(s) for s in request.stop), default=0)
        start = max(0, state.searched - longest + 1)
        cut = min((i for i in (text.find(s, start) for s in request.stop) if i >= 0), default=-1)
        if not piece.endswith("\ufffd"):
            state.fixed, state.anchor = text, len(request.tokens)
        state.searched = len(state.fixed)
        if cut >= 0:
            text, final = text[:cut], True
        safe = len(text)
        if not final:
            safe = len(text.rstrip("\ufffd")) - max(0, longest - 1)
        added = text[state.emitted:max(safe, state.emitted)]
        state.emitted += len(added)
        request.text += added
        return added, cut >= 0

    def _finish(self, slot, state, reason):
        self.slots[slot] = None
        self._end(state.request, reason)

    def _end(self, request, reason):
        request.finish_reason = reason
        self.counters[f"finished_{reason}"] += 1
        usage = dict(prompt_tokens=request.prompt_tokens, completion_tokens=len(request.tokens),
                     total_tokens=request.prompt_tokens + len(request.tokens))
        request._put(("done", reason, usage))
