"""An OpenAI-compatible HTTP server over the engine (engine.py): FastAPI + uvicorn, Server-Sent Events for
streaming, Prometheus metrics.

    python scripts/serve.py [--model_name_or_path DIR] [--port 8000] [--max_batch 8] ...

The HTTP layer only translates: OpenAI chat messages become the processor's conversation (media fetched and
checked on the request's own thread, before anything is queued), options become the engine's, and the engine's
events become OpenAI responses or `chat.completion.chunk` events. Errors use OpenAI's format.
"""
import argparse
import asyncio
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cli_args import PIXEL_CEILING
from .qwen_vl_utils.image_io import load_image

MAX_CHOICES = 4


# ---------------------------------------------------------------------------------------------- request schema
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, List[Dict[str, Any]], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: List[ChatMessage]
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = Field(default=None, ge=0, le=2 ** 63 - 1)  # numpy's generators take no negative seed
    stop: Union[str, List[str], None] = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # extensions, as vLLM accepts them in the body
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_pixels: Optional[int] = Field(default=None, ge=1, le=PIXEL_CEILING)
    max_pixels: Optional[int] = Field(default=None, ge=1, le=PIXEL_CEILING)
    fps: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False)


UNSUPPORTED = ("tools", "tool_choice", "functions", "logprobs", "top_logprobs", "response_format", "logit_bias")


class RequestError(Exception):
    """A client error: HTTP status, OpenAI error type, the parameter it concerns, a message naming it."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- messages
def media_source(url, where, kind, allowed_local):
    """The URL of an image or video part, checked: http(s), data URLs for images, and local files only under
    `allowed_local` (a server must not read any file a client names)."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: expected a non-empty URL string", param="messages")
    if url.startswith(("http://", "https://")):
        return url
    if url.startswith("data:"):
        if kind == "image" and url.startswith("data:image/"):
            return url
        raise RequestError(400, f"{where}: only data:image/... URLs are accepted (for images)", param="messages")
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path:
        raise RequestError(400, f"{where}: unsupported URL scheme in {url[:40]!r}", param="messages")
    if not allowed_local:
        raise RequestError(400, f"{where}: local files are not served (start the server with "
                                "--allowed_local_media_path to allow a folder)", param="messages")
    real, root = os.path.realpath(path), os.path.realpath(allowed_local)
    if os.path.commonpath([real, root]) != root:
        raise RequestError(400, f"{where}: {path!r} is outside --allowed_local_media_path", param="messages")
    return real


def to_conversation(messages, body, allowed_local, image_defaults=None, video_defaults=None):
    """OpenAI messages -> the processor's conversation; every part checked, each problem named. The request's
    pixel limits and fps override the server's defaults (its preset's)."""
    given = {k: getattr(body, k) for k in ("min_pixels", "max_pixels") if getattr(body, k) is not None}
    image_limits = dict(image_defaults or {}, **given)
    video_limits = dict(video_defaults or {}, **given, **({"fps": body.fps} if body.fps is not None else {}))
    for limits in (image_limits, video_limits):
        low, high = limits.get("min_pixels"), limits.get("max_pixels")
        if low is not None and high is not None and low > high:
            said = {k: f"{limits[k]}" + ("" if k in given else " (the server's default)")
                    for k in ("min_pixels", "max_pixels")}
            raise RequestError(400, f"min_pixels {said['min_pixels']} is larger than max_pixels {said['max_pixels']}",
                               param="min_pixels")
    conversation = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role not in ("system", "user", "assistant"):
            raise RequestError(400, f"{where}.role: {message.role!r} is not system, user or assistant",
                               param="messages")
        if message.content is None and message.role != "assistant":
            raise RequestError(400, f"{where}.content: a {message.role} message needs content", param="messages")
        if message.content is None or isinstance(message.content, str):
            conversation.append({"role": message.role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            at = f"{where}.content[{j}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{at}: a text part needs a 'text' string", param="messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url"):
                media = "image" if kind == "image_url" else "video"
                value = part.get(kind)
                url = value.get("url") if isinstance(value, dict) else value
                source = media_source(url, at, media, allowed_local)
                if media == "image":  # decoded here, so that one that does not load is named by its part
                    try:
                        source = load_image(source)
                    except (ValueError, OSError) as error:
                        raise RequestError(400, f"{at}: {error}", param="messages") from None
                parts.append({"type": media, media: source, **(image_limits if media == "image" else video_limits)})
            else:
                raise RequestError(400, f"{at}: unknown content type {kind!r} (text, image_url or video_url)",
                                   param="messages")
        conversation.append({"role": message.role, "content": parts})
    if not conversation or conversation[-1]["role"] == "assistant":
        raise RequestError(400, "messages must end with a user or system message", param="messages")
    return conversation


def answer_room(body, max_new_tokens, prompt_tokens, max_len):
    """The answer's length for a prompt of `prompt_tokens`: the request's max_tokens (a 400 naming it when prompt
    and answer exceed --max_len), else the default cut to what --max_len leaves, as vLLM does."""
    room = max_len - prompt_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if room < 1:
        raise RequestError(400, f"the prompt is {prompt_tokens} tokens: no room for an answer in the server's "
                                f"{max_len} positions per request (--max_len)", param="messages")
    if body.max_completion_tokens or body.max_tokens:
        if max_new_tokens > room:
            raise RequestError(400, f"{field} {max_new_tokens}: with the prompt's {prompt_tokens} tokens that is more "
                                    f"than the server's {max_len} positions per request (--max_len)", param=field)
        return max_new_tokens
    return min(max_new_tokens, room)


def engine_options(body, max_new_tokens_default):
    options = {"max_new_tokens": body.max_completion_tokens or body.max_tokens or max_new_tokens_default}
    if body.temperature is not None and body.temperature > 0:
        options.update(do_sample=True, temperature=body.temperature)
        if body.top_p is not None:
            options["top_p"] = body.top_p
        options["top_k"] = body.top_k if body.top_k is not None else 0
    else:
        options["do_sample"] = False  # temperature 0 (or none given): greedy
    if body.repetition_penalty is not None:
        options["repetition_penalty"] = body.repetition_penalty
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise RequestError(400, "stop: expected non-empty strings", param="stop")
    return options, stop


# ---------------------------------------------------------------------------------------------- server state
class Metrics:
    def __init__(self, engine_stats):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        prefix = "mindone_qwen2vl"
        self.running = Gauge(f"{prefix}_requests_running", "Requests holding a slot", registry=self.registry)
        self.waiting = Gauge(f"{prefix}_requests_waiting", "Requests queued for a slot", registry=self.registry)
        self.running.set_function(lambda: engine_stats().get("running", 0))
        self.waiting.set_function(lambda: engine_stats().get("waiting", 0))
        self.finished = Counter(f"{prefix}_requests_finished", "Finished requests", ["finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generated = Counter(f"{prefix}_generation_tokens", "Generated tokens", registry=self.registry)
        self.graphs = Gauge(f"{prefix}_graphs_compiled", "Graphs compiled so far (graph mode)", registry=self.registry)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=self.registry)
        self.tpot = Histogram(f"{prefix}_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5), registry=self.registry)


class Server:
    """What the app serves: set up by `load()` (in the background), then `ready`."""

    def __init__(self, args):
        self.args = args
        self.ready = False
        self.failed = None
        self.engine = self.processor = None
        self.name = args.served_model_name
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else {})
        self.metrics.graphs.set_function(lambda: self.graphs_compiled() if self.engine else 0)
        self.main = True  # False on the msrun workers other than rank 0 (tensor parallelism): no HTTP, no engine
        self.stopping = False  # set by Ctrl-C / SIGTERM: a load still under way starts no engine

    def load(self):
        import mindspore as ms

        from .engine import Engine
        from .models import classes_of
        from .precision import resolve_policy

        args = self.args
        model_cls, processor_cls = classes_of(args.folder)  # by config.json's model_type
        ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
        policy = resolve_policy(args.dtype, args.attn_implementation, args.conv_dtype)
        model = model_cls.from_pretrained(args.folder, policy=policy, progress=False,
                                          tensor_parallel_size=args.tensor_parallel if args.tensor_parallel > 1 else None)
        if not self.main:
            return model
        if self.stopping:
            return None
        self.processor = processor_cls.from_pretrained(args.folder)
        self.engine = Engine(model, tokenizer=self.processor.tokenizer, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_len=args.max_len, launch_nice=args.launch_nice).start()
        if args.warmup and args.mode == "graph" and not self.warm_up():  # pynative compiles nothing
            return None
        self.ready = True

    def graphs_compiled(self):
        """Graphs compiled so far by the model and the engine's decode steps (0 in pynative mode)."""
        return sum(self.engine.model.compiled_graphs().values()) + self.engine.worker.decode_graphs()

    def warm_up(self):
        """One small image question through the engine before the server reports ready: in graph mode it
        compiles the graphs an ordinary first request needs (vision, prompt, head, a one-row decode step), so
        that the first client does not wait for them; startup takes that time instead, and says how long.
        False if the engine stopped meanwhile (Ctrl-C or SIGTERM during startup)."""
        from PIL import Image

        from .engine import EngineStopped

        started, before = time.perf_counter(), self.graphs_compiled()
        image = Image.new("RGB", (56, 56), (128, 128, 128))
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "What is this?"}]}]
        inputs = self.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)
        try:
            self.engine.submit(**inputs, max_new_tokens=2, do_sample=False).result()
        except EngineStopped:  # the server is stopping: nothing to report
            return False
        print(f"warm-up: {self.graphs_compiled() - before} graphs compiled in {time.perf_counter() - started:.1f} s",
              flush=True)
        return True

    def inputs(self, body):
        args = self.args
        conversation = to_conversation(body.messages, body, args.allowed_local_media_path, args.image_defaults,
                                       args.video_defaults)
        try:
            return self.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)
        except (ValueError, OSError) as error:  # a media file or URL that does not load: the client's
            raise RequestError(400, _placed(str(error), conversation), param="messages") from None


def _placed(message, conversation):
    """An error about a video, prefixed with the place of the part whose source it names (images load in
    to_conversation, where their place is known)."""
    for i, entry in enumerate(conversation):
        for j, part in enumerate(entry["content"] if isinstance(entry["content"], list) else ()):
            source = part.get("video")
            if isinstance(source, str) and source in message:
                return f"messages[{i}].content[{j}]: {message}"
    return message


# ---------------------------------------------------------------------------------------------- the app
def create_app(server: Server):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from .engine import EngineFull, EngineStopped

    app = FastAPI(title="mindone-qwen2vl")

    def error(status, message, **kw):
        return JSONResponse(error_body(message, **kw), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)

    @app.get("/health")
    async def health():
        if server.failed:
            return PlainTextResponse(f"failed: {server.failed}", status_code=503)
        return PlainTextResponse("ok" if server.ready else "loading", status_code=200 if server.ready else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "mindone-qwen2vl"}]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(server.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(raw: HTTPRequest):
        if not server.ready:
            return error(503, "the model is still loading", kind="service_unavailable")
        try:
            payload = await raw.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "the body is not JSON")
        try:
            body = ChatRequest.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return error(400, f"{where}: {first['msg']}", param=where)
        if body.model != server.name:
            return error(404, f"model {body.model!r} is not served here (this server serves {server.name!r})",
                         kind="invalid_request_error", param="model", code="model_not_found")
        extra = sorted(k for k in (body.model_extra or {}) if k in UNSUPPORTED and payload.get(k) not in (None, False))
        if extra:
            return error(400, f"{extra[0]} is not supported by this server", param=extra[0])
        try:
            options, stop = engine_options(body, server.args.default_max_tokens)
            inputs = await asyncio.to_thread(server.inputs, body)
            options["max_new_tokens"] = answer_room(body, options["max_new_tokens"],
                                                    np.shape(inputs["input_ids"])[-1], server.args.max_len)
            requests = []
            try:
                for i in range(body.n):
                    seed = None if body.seed is None else body.seed + i
                    requests.append(server.engine.submit(**inputs, stop=stop or None, seed=seed, **options))
            except BaseException:
                for r in requests:
                    r.cancel()
                raise
        except RequestError as e:
            return error(e.status, e.message, kind=e.kind, param=e.param, code=e.code)
        except EngineFull as e:
            return error(429, f"the server is busy: {e}", kind="rate_limit_exceeded")
        except EngineStopped as e:
            return error(503, str(e), kind="service_unavailable")
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        started = time.perf_counter()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        for r in requests:
            server.metrics.prompt_tokens.inc(r.prompt_tokens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(server, requests, rid, created, started, include_usage),
                                     media_type="text/event-stream")
        results = await _unless_disconnected(raw, asyncio.to_thread(collect, server, requests, started), requests)
        if results is None:
            return error(499, "the client closed the request", kind="client_closed")
        failed = [r for r in results if r[0] == "error"]
        if failed:
            return error(503 if isinstance(failed[0][1], EngineStopped) else 500, str(failed[0][1]),
                         kind="server_error")
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (_, text, reason) in enumerate(results)]
        usage = _usage(requests)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": choices, "usage": usage}

    return app


async def _unless_disconnected(raw, work, requests, every=0.5):
    """The result of `work` (awaitable), or None when the client goes away first: its requests are then cancelled
    (their slots free at the next step), as a stream's are."""
    work = asyncio.ensure_future(work)
    while not work.done():
        await asyncio.wait({work}, timeout=every)
        if not work.done() and await raw.is_disconnected():
            for request in requests:
                request.cancel()
            await work
            return None
    return work.result()


def _observe(server, request, started, first_at, last_at, count):
    if first_at is not None:
        server.metrics.ttft.observe(first_at - started)
        if count > 1:
            server.metrics.tpot.observe((last_at - first_at) / (count - 1))
    server.metrics.generated.inc(len(request.tokens))
    server.metrics.finished.labels(finish_reason=request.finish_reason or "error").inc()


def collect(server, requests, started):
    results = []
    for request in requests:
        first_at = last_at = None
        count = 0
        outcome = None
        for event in request.events():
            if event[0] == "token":
                last_at = time.perf_counter()
                first_at = first_at or last_at
                count += 1
            elif event[0] == "error":
                outcome = ("error", event[1], None)
        _observe(server, request, started, first_at, last_at, count)
        results.append(outcome or ("ok", request.text, request.finish_reason))
    return results


def _usage(requests):
    prompt = requests[0].prompt_tokens
    completion = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream(server, requests, rid, created, started, include_usage):
    """chat.completion.chunk events of every choice as their tokens come, then usage (if asked) and [DONE]. A
    client that goes away cancels its requests (their slots free at the next step)."""
    events = queue.Queue()

    def pump(index, request):
        first_at = last_at = None
        count = 0
        for event in request.events():
            if event[0] == "token":
                last_at = time.perf_counter()
                first_at = first_at or last_at
                count += 1
            events.put((index, event))
        _observe(server, request, started, first_at, last_at, count)

    threads = [threading.Thread(target=pump, args=(i, r), daemon=True) for i, r in enumerate(requests)]
    for t in threads:
        t.start()

    def chunk(choices, usage=None):
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    open_choices = len(requests)
    try:
        for i in range(len(requests)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while open_choices:
            index, event = await asyncio.to_thread(events.get)
            if event[0] == "token":
                if event[2]:
                    yield chunk([{"index": index, "delta": {"content": event[2]}, "finish_reason": None}])
            elif event[0] == "done":
                open_choices -= 1
                yield chunk([{"index": index, "delta": {}, "finish_reason": event[1]}])
            else:
                open_choices -= 1
                yield f"data: {json.dumps(error_body(str(event[1]), kind='server_error'))}\n\n"
        if include_usage:
            yield chunk([], _usage(requests))
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:  # the client went away (or the stream ended): free the slots
            request.cancel()


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="serve.py",
                                description="An OpenAI-compatible server for Qwen2-VL and Qwen2.5-VL on MindSpore.")
    p.add_argument("--model_name_or_path", help="HF or converted folder, or hub id; absent: the tiny random-weight "
                                                "default model")
    p.add_argument("--served_model_name", help="the model name clients use (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=8, help="requests decoded together (slots)")
    p.add_argument("--max_queue", type=int, default=64, help="waiting requests before new ones are refused (429)")
    p.add_argument("--max_len", type=int, default=4096, help="positions per request: prompt plus max_tokens")
    p.add_argument("--default_max_tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default: the preset's max_new_tokens, else 256)")
    p.add_argument("--config", help="a preset from configs/ by name or a YAML file; flags override it")
    p.add_argument("--allowed_local_media_path", default=None,
                   help="a folder whose files requests may name (file:// or paths); default: none")
    p.add_argument("--mode", choices=["graph", "pynative"], default=None, help="default: the preset's, else graph")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: the preset's, else fp32")
    p.add_argument("--attn_implementation", default=None, choices=["eager", "flash_attention_2", "sdpa"])
    p.add_argument("--tensor_parallel", type=int, default=None,
                   help="cards the decoder is split over, one msrun worker each (rank 0 serves HTTP)")
    p.add_argument("--no_warmup", dest="warmup", action="store_false",
                   help="report ready without first running one small request (in graph mode the first client "
                        "then waits for the graphs to compile)")
    p.add_argument("--launch_nice", type=int, default=0, metavar="N",
                   help="CPU only, opt-in: the engine's thread runs the model at nice N (1-19; 10 is a good value) so "
                        "that MindSpore's kernel threads get the cores; default 0: off")
    args = p.parse_args(argv)
    preset = {}
    if args.config:
        from .presets import load_preset

        try:
            preset = load_preset(args.config)
        except (OSError, ValueError) as e:
            p.error(f"--config: {e}")
    args.model_name_or_path = args.model_name_or_path or preset.get("model_name_or_path")
    args.mode = args.mode or preset.get("mode", "graph")
    args.dtype = args.dtype or preset.get("mindspore_dtype", "fp32")
    args.conv_dtype = preset.get("conv_dtype")
    args.attn_implementation = args.attn_implementation or preset.get("attn_implementation")
    args.default_max_tokens = args.default_max_tokens or preset.get("max_new_tokens", 256)
    args.tensor_parallel = args.tensor_parallel or preset.get("tensor_parallel_size", 1)
    args.image_defaults = {k: preset[k] for k in ("min_pixels", "max_pixels") if k in preset}
    args.video_defaults = {k: preset[p_key] for k, p_key in (("max_pixels", "video_max_pixels"),
                                                              ("total_pixels", "video_total_pixels"),
                                                              ("fps", "fps")) if p_key in preset}
    for name in ("port", "max_batch", "max_queue", "max_len", "default_max_tokens"):
        if getattr(args, name) < 1 or (name == "port" and args.port > 65535):
            p.error(f"--{name} {getattr(args, name)}: out of range")
    if args.tensor_parallel < 1:
        p.error(f"--tensor_parallel {args.tensor_parallel}: out of range")
    from .cli_args import number_problem  # the scripts' rule for the same flag

    problem = number_problem("launch_nice", args.launch_nice)
    if problem:
        p.error(f"--launch_nice {args.launch_nice}: {problem}")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        p.error(f"--allowed_local_media_path {args.allowed_local_media_path!r}: not a folder")
    return args


def follow_rank(server):
    """A tensor-parallel rank other than 0: load this rank's shard, then run the device calls of rank 0's engine
    (engine.follow) until it stops."""
    from .engine import follow

    args = server.args
    server.main = False
    # This rank stops when rank 0's engine stops (SIGTERM to rank 0 drains it, then STOP reaches here). A SIGINT
    # to this rank alone would leave rank 0 waiting in a collective. (msrun itself answers Ctrl-C by killing
    # every worker at once.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = server.load()
    except Exception as e:
        print(f"serve.py: error: the model did not load: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    if args.launch_nice:  # this rank's main thread runs its share of every step, as rank 0's engine thread does
        from .launch_priority import lower_launch_priority

        lower_launch_priority(args.launch_nice)
    follow(model, max_batch=args.max_batch, max_len=args.max_len)
    return 0


def main(argv=None, received=None):
    """The server's command line; `received`: the list cli_interrupt.record_stop_signals keeps, when the caller
    set it up before its imports (scripts/serve.py)."""
    from .cli_interrupt import record_stop_signals

    # uvicorn handles SIGINT and SIGTERM while it runs, then raises the signal again for the handlers it found.
    # Those are these, so that the process goes on to stop the engine and exit 0. (On the CPU backend MindSpore
    # turns Ctrl-C into SIGTERM, which is why both count.)
    if received is None:
        received = record_stop_signals()
    args = parse_args(argv)
    from .default_model import RANDOM_WEIGHTS_NOTICE, default_checkpoint
    from .loading import resolve_folder

    if args.model_name_or_path:
        try:
            args.folder = resolve_folder(args.model_name_or_path)
        except (OSError, ValueError) as e:
            print(f"serve.py: error: --model_name_or_path: {e}", file=sys.stderr)
            return 2
    else:
        print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
        args.folder = default_checkpoint()
    args.served_model_name = args.served_model_name or os.path.basename(os.path.normpath(args.folder))
    server = Server(args)
    if args.tensor_parallel > 1:
        from .parallel import init_tensor_parallel

        try:
            rank, _ = init_tensor_parallel(args.tensor_parallel)
        except (RuntimeError, ValueError) as e:
            print(f"serve.py: error: --tensor_parallel {args.tensor_parallel}: {e}", file=sys.stderr)
            return 2
        if rank != 0:
            return follow_rank(server)

    import uvicorn

    app = create_app(server)

    def load():
        try:
            server.load()
            if server.ready and not received:
                print(f"serving {server.name} at http://{args.host}:{args.port}/v1 (ready)", flush=True)
        except Exception as e:  # reported by /health and on stderr; the server keeps answering 503
            server.failed = f"{type(e).__name__}: {e}"
            print(f"serve.py: error: the model did not load: {server.failed}", file=sys.stderr, flush=True)

    class Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if received:  # a signal came before uvicorn took the handlers over (it starts late while the model loads)
                self.handle_exit(received[0], None)

        def handle_exit(self, sig, frame):
            # Ctrl-C / SIGTERM: stop the engine first, so that requests in flight end (their streams with an
            # error chunk) and uvicorn's graceful shutdown has nothing left to wait for.
            server.stopping = True
            if server.engine is not None:
                threading.Thread(target=server.engine.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    if received:  # stopped before anything was loaded
        print("serve.py: stopped", file=sys.stderr)
        return 0
    threading.Thread(target=load, daemon=True).start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    Uvicorn(config).run()
    if server.engine is not None:
        server.engine.stop(timeout=30)
    print("serve.py: stopped", file=sys.stderr)
    return 0
