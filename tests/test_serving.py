"""scripts/serve.py for real: the server in a subprocess on a free loopback port with the tiny default model,
talked to with the official `openai` client (and raw HTTP where the client hides what is checked)."""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets")
MODEL = "tiny-random-qwen2-vl"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, base, logs, timeout=300):
    """Poll /health until the server answers 200; fail with its logs (`logs()`) if it exits or times out."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, logs()
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline, "the server did not get ready\n" + logs()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, MINDONE_QWEN2VL_CACHE=str(tmp_path_factory.mktemp("cache")))
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--port", str(port),
                             "--max_batch", "4", "--max_queue", "6", "--max_len", "1024",
                             "--allowed_local_media_path", ASSETS], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, lambda: open(log.name).read()[-3000:])
    yield dict(proc=proc, base=base, log=log.name, env=env,
               client=openai.OpenAI(base_url=base + "/v1", api_key="none"))
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def image_part(name="1.jpg"):
    return {"type": "image_url", "image_url": {"url": "file://" + os.path.join(ASSETS, name)}}


def ask(client, content, **kw):
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_ready_line_models_and_health(server):
    assert f"serving {MODEL} at {server['base']}/v1 (ready)" in open(server["log"]).read()
    assert [m.id for m in server["client"].models.list().data] == [MODEL]


def test_the_warm_up_compiles_what_a_first_request_needs(server):
    """Before the ready line the server ran one small image question through the engine; an image question
    afterwards compiles no further graph (the metric counts the model's and the engine's graphs)."""
    log = open(server["log"]).read()
    warm = re.search(r"warm-up: (\d+) graphs compiled in [\d.]+ s", log)
    assert warm and int(warm.group(1)) > 0 and log.index("warm-up:") < log.index("(ready)")
    before = metric(server, "mindone_qwen2vl_graphs_compiled")
    assert before >= int(warm.group(1))
    ask(server["client"], [image_part("2.jpg"), {"type": "text", "text": "What is in the picture?"}])
    assert metric(server, "mindone_qwen2vl_graphs_compiled") == before


def test_image_question_plain_and_streamed(server):
    client = server["client"]
    content = [image_part(), {"type": "text", "text": "What is in this picture?"}]
    reply = ask(client, content)
    choice = reply.choices[0]
    assert reply.model == MODEL and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert isinstance(choice.message.content, str) and choice.message.content and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 50  # the image's tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    chunks = list(ask(client, content, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    # A data URL and a system message, several images, a second turn.
    data = base64.b64encode(open(os.path.join(ASSETS, "2.jpg"), "rb").read()).decode()
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image_part(), {"type": "image_url",
                                                              "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
                                             {"type": "text", "text": "Compare them."}]},
                {"role": "assistant", "content": "They differ."}, {"role": "user", "content": "How?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens > reply.usage.completion_tokens


def test_video_n_and_stop_strings(server):
    client = server["client"]
    video = [{"type": "video_url", "video_url": {"url": os.path.join(ASSETS, "4.mp4")}},
             {"type": "text", "text": "What happens?"}]
    reply = ask(client, video, extra_body={"fps": 1.0, "max_pixels": 64 * 28 * 28})
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 20
    sampled = ask(client, "Tell me a story.", n=2, temperature=1.0, seed=3)
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens == 16
    again = ask(client, "Tell me a story.", n=2, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]
    plain = ask(client, "Tell me a story.", max_tokens=12).choices[0].message.content
    stop = plain[len(plain) // 2:len(plain) // 2 + 3]
    stopped = ask(client, "Tell me a story.", max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == plain[:plain.find(stop)]


ERRORS = [
    (dict(model="no-such-model"), 404, "model 'no-such-model' is not served here"),
    (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400,
     "messages[0].content[0]: unknown content type 'audio'"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.jpg"}}]}]),
     400, "messages[0].content[0]: could not download image from http://127.0.0.1:9/a.jpg"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]),
     400, "messages[0].content[1]: cannot decode image data:image/png;base64,"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]),
     400, "is outside --allowed_local_media_path"),
    (dict(messages=[{"role": "user", "content": [image_part("missing.jpg")]}]), 400, "missing.jpg"),
    (dict(max_tokens=5000), 400, "max_tokens 5000: with the prompt's 20 tokens that is more than the server's 1024 "
                                 "positions per request (--max_len)"),
    (dict(max_tokens=10 ** 9), 400, "max_tokens 1000000000: with the prompt's"),
    (dict(temperature=3.0), 400, "temperature"),
    (dict(top_p=0.0), 400, "top_p"),
    (dict(seed=-1, temperature=1.0), 400, "seed"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "video_url", "video_url": {
        "url": os.path.join(ASSETS, "1.jpg")}}]}]), 400, "messages[0].content[1]: video"),
    (dict(max_pixels=10 ** 12), 400, "max_pixels: Input should be less than or equal to 25690112"),
    (dict(min_pixels=5000, max_pixels=4000), 400, "min_pixels 5000 is larger than max_pixels 4000"),
    (dict(messages=[{"role": "user"}]), 400, "messages[0].content: a user message needs content"),
    (dict(n=9), 400, "n"),
    (dict(logprobs=True), 400, "logprobs is not supported"),
    (dict(messages=[]), 400, "messages must end with a user or system message"),
]


@pytest.mark.parametrize("change,status,message", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_errors_in_openai_format(server, change, status, message):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    body.update(change)
    r = httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    # The server goes on serving.
    assert ask(server["client"], "hi", max_tokens=2).usage.completion_tokens == 2


def test_without_max_tokens_a_long_prompt_gets_the_room_left(server):
    """No max_tokens: the default (256) is cut to what --max_len (1024 here) leaves after the prompt, as vLLM does;
    such a prompt used to be refused."""
    body = dict(model=MODEL, messages=[{"role": "user", "content": "word " * 880}])
    r = httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + 256 > 1024
    assert usage["completion_tokens"] <= 1024 - usage["prompt_tokens"]
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 1024 - usage["prompt_tokens"]


def test_bad_body_is_a_400(server):
    r = httpx.post(server["base"] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_eight_concurrent_clients_get_their_sequential_answers(server):
    client = server["client"]
    prompts = [[image_part("1.jpg"), {"type": "text", "text": "One?"}], "Two words.",
               [image_part("2.jpg"), {"type": "text", "text": "Three?"}], "Four, five, six."]
    expected = [ask(client, p).choices[0].message.content for p in prompts]
    results = {}

    def call(i):
        results[i] = ask(client, prompts[i % 4]).choices[0].message.content

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]  # 4 slots, 4 waiting: all served
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {i: expected[i % 4] for i in range(8)}


def metric(server, name):
    text = httpx.get(server["base"] + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_and_a_client_that_disconnects(server):
    text = httpx.get(server["base"] + "/metrics", timeout=30).text
    for name in ("mindone_qwen2vl_requests_running", "mindone_qwen2vl_requests_waiting",
                 "mindone_qwen2vl_requests_finished_total", "mindone_qwen2vl_prompt_tokens_total",
                 "mindone_qwen2vl_generation_tokens_total", "mindone_qwen2vl_time_to_first_token_seconds_bucket",
                 "mindone_qwen2vl_time_per_output_token_seconds_bucket"):
        assert name in text, name
    cancelled = metric(server, 'mindone_qwen2vl_requests_finished_total{finish_reason="cancelled"}')
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Go on and on."}], max_tokens=900, stream=True)
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming has begun; then the client goes away
    deadline = time.time() + 60
    while metric(server, 'mindone_qwen2vl_requests_finished_total{finish_reason="cancelled"}') < cancelled + 1:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.2)
    assert metric(server, "mindone_qwen2vl_requests_running") == 0


def test_a_non_streaming_client_that_disconnects_frees_its_slot(server):
    """A non-streaming request whose client goes away (here a 1 s read timeout) is cancelled as a stream's is: it
    used to run on to max_tokens, holding its slot."""
    cancelled = metric(server, 'mindone_qwen2vl_requests_finished_total{finish_reason="cancelled"}')
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Go on and on."}], max_tokens=900)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    deadline = time.time() + 60
    while metric(server, 'mindone_qwen2vl_requests_finished_total{finish_reason="cancelled"}') < cancelled + 1:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.2)
    assert metric(server, "mindone_qwen2vl_requests_running") == 0
    assert ask(server["client"], "hi", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_is_a_429(server):
    # Answers as long as the server's --max_len allows, and twice the requests the 4 slots and 6 places in the
    # queue hold: in one fresh-clone CI run 14 requests of 600 tokens all got 200 (the first ones finished
    # while the HTTP thread, short of CPU beside the engine, was still taking the last ones in).
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Long."}], max_tokens=990)
    statuses = []

    def call():
        statuses.append(httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=300).status_code)

    threads = [threading.Thread(target=call) for _ in range(20)]  # 4 slots + 6 waiting < 20
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 10, statuses


def worker_pid(port, rank):
    """The pid of the msrun worker of `rank` serving on `port` (msrun starts each worker in a session of its own)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if b"--port" in cmd and cmd[cmd.index(b"--port") + 1] == str(port).encode() and \
                b"MS_ROLE=MS_WORKER" in env and f"RANK_ID={rank}".encode() in env and cmd[0] != b"/usr/bin/tail":
            return int(pid)
    raise AssertionError(f"no rank {rank} worker serving port {port}")


def test_tensor_parallel_server_answers_as_one_card(server, tmp_path):
    """serve.py under msrun with 2 CPU workers: rank 0 serves HTTP and broadcasts each prefill and decode step,
    rank 1 follows; concurrent requests (an image, text) get the one-card server's greedy answers, and SIGTERM
    to the job stops both ranks."""
    from test_parallel import msrun_executable

    client = server["client"]
    prompts = [[image_part("1.jpg"), {"type": "text", "text": "One?"}], "Two words.",
               [image_part("2.jpg"), {"type": "text", "text": "Three?"}]]
    expected = [ask(client, p).choices[0].message.content for p in prompts]
    port = free_port()
    # The one-card server's tiny checkpoint (its cache folder); msrun starts `python` from PATH: this one.
    env = dict(server["env"], PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    job = subprocess.Popen(
        [msrun_executable(), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
         f"--log_dir={tmp_path}", "--cluster_time_out=120", os.path.join(ROOT, "scripts", "serve.py"),
         "--port", str(port), "--tensor_parallel", "2", "--max_batch", "2", "--max_len", "1024",
         "--allowed_local_media_path", ASSETS],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def logs():
        return "".join(f"--- {name}\n" + "".join(l for l in open(tmp_path / name, errors="replace")
                                                 if "[WARNING]" not in l and "[INFO]" not in l)[-2000:]
                       for name in sorted(os.listdir(tmp_path)) if name.startswith("worker_"))

    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(job, base, logs, timeout=400)
        tp_client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        results = {}

        def call(i):
            results[i] = ask(tp_client, prompts[i]).choices[0].message.content

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]  # 2 slots, one request waits
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results == dict(enumerate(expected)), logs()
        # SIGTERM to rank 0's process drains the server: its engine stops and tells rank 1, both exit, and msrun
        # with them. (msrun answers Ctrl-C by killing every worker at once.)
        os.kill(worker_pid(port, rank=0), signal.SIGTERM)
        assert job.wait(timeout=120) == 0, logs()
        assert "serve.py: stopped" in logs()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def test_ctrl_c_stops_cleanly_mid_stream(server):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Go on."}], max_tokens=900, stream=True)
    got = []
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                continue
            got.append(line)
            if len(got) == 3:
                server["proc"].send_signal(signal.SIGINT)
    assert server["proc"].wait(timeout=60) == 0
    # The stream ended with an error chunk (the engine stopped), not by hanging.
    payloads = [json.loads(line[6:]) for line in got if line.startswith("data: {")]
    assert any("error" in p for p in payloads), got[-3:]
    assert "serve.py: stopped" in open(server["log"]).read()


def launch(tmp_path, *flags):
    """A server of its own (the tiny default model) -> (process, its log file, base URL)."""
    port = free_port()
    env = dict(os.environ, MINDONE_QWEN2VL_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--port", str(port),
                                 *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log, f"http://127.0.0.1:{port}"


def test_no_warmup_leaves_the_compiling_to_the_first_request(tmp_path):
    proc, log, base = launch(tmp_path, "--no_warmup", "--allowed_local_media_path", ASSETS)
    try:
        wait_ready(proc, base, lambda: log.read_text()[-3000:])
        here = dict(base=base, client=openai.OpenAI(base_url=base + "/v1", api_key="none"))
        assert "warm-up:" not in log.read_text()
        assert metric(here, "mindone_qwen2vl_graphs_compiled") == 0
        ask(here["client"], [image_part("2.jpg"), {"type": "text", "text": "What is in the picture?"}])
        assert metric(here, "mindone_qwen2vl_graphs_compiled") > 0
    finally:
        proc.kill()
        proc.wait()


def test_launch_nice_lowers_the_engine_thread_only(tmp_path):
    """--launch_nice 10: one thread of the server (the engine's, which runs the model) at nice 10, MindSpore's
    kernel threads and the HTTP thread at the server's own priority; answers as usual."""
    proc, log, base = launch(tmp_path, "--launch_nice", "10", "--no_warmup", "--allowed_local_media_path", ASSETS)
    try:
        wait_ready(proc, base, lambda: log.read_text()[-3000:])
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        assert ask(client, "Say something.").choices[0].message.content
        assert ask(client, [image_part("2.jpg"), {"type": "text", "text": "What is this?"}]).choices[0].message.content
        from test_launch_priority import threads

        nices = {}
        for _, name, nice in threads(proc.pid):
            nices.setdefault(nice, []).append(name)
        base = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits this process's priority
        assert len(nices.get(10, [])) == 1, nices
        assert set(nices) == {base, 10}, nices
        assert any(n.startswith("KernelThread") for n in nices[base]) and "python" in nices[base], nices
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_while_loading_stops_the_server(tmp_path):
    """A SIGTERM soon after the start, while the model loads and warms up, stops the server cleanly (exit 0).
    With the tiny model uvicorn has usually taken the handlers over by then; the window before it does (a
    28-layer load and warm-up leave uvicorn no time to start for seconds, and such a signal used to be forgotten)
    was checked by hand at the `overhead` benchmark shape, not here."""
    proc, log, _ = launch(tmp_path)
    try:
        deadline = time.time() + 120
        while "RANDOM weights" not in log.read_text():  # printed just before the handlers are installed
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "serve.py: stopped" in log.read_text()


@pytest.mark.parametrize("after", [0.3, 0.8])
def test_ctrl_c_while_the_server_starts_stops_it_cleanly(tmp_path, after):
    """SIGINT while serve.py still imports MindSpore and FastAPI (its first second or so): noted, and the server
    stops once it can, exit 0 with "stopped" and no traceback. It used to break the import halfway: a traceback
    of a partially initialised module, exit by SIGINT."""
    proc, log, _ = launch(tmp_path)
    try:
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "serve.py: stopped" in text and "Traceback" not in text and "(ready)" not in text, text[-3000:]


def test_presets_and_flags():
    from mindone_qwen2vl.serving import parse_args

    args = parse_args(["--config", "qwen2-vl-7b-instruct", "--mode", "pynative"])
    assert (args.model_name_or_path, args.dtype, args.attn_implementation) == \
        ("Qwen/Qwen2-VL-7B-Instruct", "bf16", "flash_attention_2")
    assert args.mode == "pynative" and args.default_max_tokens == 128  # the flag over the preset
    assert args.image_defaults == {"min_pixels": 200704, "max_pixels": 1003520}
    assert args.video_defaults == {"max_pixels": 602112, "total_pixels": 19267584, "fps": 2.0}
    for argv, message in ((["--tensor_parallel", "2"], "--tensor_parallel 2: tensor_parallel_size=2 needs 2 processes"),
                          (["--config", "no-such-preset"], "--config: no preset 'no-such-preset'"),
                          (["--max_batch", "0"], "--max_batch 0: out of range"),
                          (["--launch_nice", "25"], "--launch_nice 25: expected an integer from 0 to 19")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), *argv], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr[-500:])
