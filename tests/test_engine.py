"""engine.py: continuous batching on one model thread. A request's greedy tokens are those of generate() for it
alone, whether it runs alone, in a full batch, or joins one mid-way; options, stop strings, cancellation, a full
queue and errors stay per request."""
import os
import threading

import mindspore as ms
import numpy as np
import pytest

from test_generation import case_inputs

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindone_qwen2vl", "assets",
                      "qwen2-vl-2b-instruct")
N = 6


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS)


def rows():
    """Single conversations: the cases' rows, and the mixed batch's rows without their padding."""
    out = [case_inputs(c) for c in ("image", "video", "text_only")]
    batch = case_inputs("mixed_left_padded_batch")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out.append(dict(input_ids=ids[2:3, mask[2] == 1]))  # the text-only row
    return out


def alone(model, inputs, n=N):
    ids = model.generate(**inputs, max_new_tokens=n, eos_token_id=[])
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(params=["graph"])
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_greedy_tokens_alone_batched_and_joining(tiny_ours, graph_mode):
    from mindone_qwen2vl.engine import Engine

    conversations = rows() * 2  # 8 requests on 3 slots: most wait, and join a running batch mid-way
    expected = [alone(tiny_ours, c) for c in conversations]
    engine = Engine(tiny_ours, max_batch=3, max_len=512).start()
    try:
        requests = [engine.submit(**c, max_new_tokens=N, eos_token_id=[]) for c in conversations]
        for request, want in zip(requests, expected):
            tokens, _, reason = request.result(timeout=300)
            assert tokens == want and reason == "length"
        # Alone in the engine: the same again.
        assert engine.submit(**conversations[0], max_new_tokens=N, eos_token_id=[]).result(300)[0] == expected[0]
        stats = engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["finished_length"] == 9
        # Decode graphs: (one row | all rows) x (the first VIEW_LENGTH positions | all), whatever the mix of requests.
        assert 1 <= engine.worker.decode_graphs() <= 4
    finally:
        engine.stop()


def test_decode_views_of_the_cache_give_the_same_tokens(tiny_eager, graph_mode):
    """The engine decodes one row while only the first slot is busy and attends over the first VIEW_LENGTH
    positions while every busy row is below it; a request that crosses VIEW_LENGTH mid-way, and one that
    joins a busy engine, still get generate()'s tokens alone, and the views add at most 3 graphs. (Eager: under
    sdpa the decode kernels read only the positions a row sees, and there are no shorter views.)"""
    from mindone_qwen2vl import engine as engine_module
    from mindone_qwen2vl.engine import Engine

    rng = np.random.default_rng(5)
    length = engine_module.VIEW_LENGTH
    crossing = dict(input_ids=rng.integers(1000, 5000, (1, length - 3)))  # positions 509.. cross 512
    short = rows()[0]  # an image question
    n = 8
    expected = [alone(tiny_eager, c, n) for c in (crossing, short)]
    engine = Engine(tiny_eager, max_batch=2, max_len=2 * length).start()
    try:
        # Alone: one row, over the first VIEW_LENGTH positions, then (crossed) over all of them.
        assert engine.submit(**crossing, max_new_tokens=n, eos_token_id=[]).result(300)[0] == expected[0]
        assert sorted(engine.worker.views) == [length, 2 * length]
        # Together: both rows, crossing while the other request runs.
        first = engine.submit(**crossing, max_new_tokens=n, eos_token_id=[])
        second = engine.submit(**short, max_new_tokens=n, eos_token_id=[])
        assert [first.result(300)[0], second.result(300)[0]] == expected
        assert engine.worker.decode_graphs() <= 4
    finally:
        engine.stop()


def test_fused_decode_runs_over_the_whole_cache(tiny_ours, graph_mode):
    """Under sdpa the decode step's kernels read only the positions each row sees: the engine keeps the whole
    cache's length only (one row's step and all rows'), and a request crossing VIEW_LENGTH beside another gets
    generate()'s tokens alone."""
    from mindone_qwen2vl import engine as engine_module
    from mindone_qwen2vl.engine import Engine

    rng = np.random.default_rng(5)
    length = engine_module.VIEW_LENGTH
    crossing = dict(input_ids=rng.integers(1000, 5000, (1, length - 3)))
    short = rows()[0]
    n = 8
    expected = [alone(tiny_ours, c, n) for c in (crossing, short)]
    engine = Engine(tiny_ours, max_batch=2, max_len=2 * length).start()
    try:
        assert engine.worker.runner.decode.fused and engine.worker.lengths == [2 * length]
        assert engine.submit(**crossing, max_new_tokens=n, eos_token_id=[]).result(300)[0] == expected[0]
        first = engine.submit(**crossing, max_new_tokens=n, eos_token_id=[])
        second = engine.submit(**short, max_new_tokens=n, eos_token_id=[])
        assert [first.result(300)[0], second.result(300)[0]] == expected
        assert sorted(engine.worker.views) == [2 * length] and engine.worker.decode_graphs() <= 2
    finally:
        engine.stop()


def test_views_double_and_are_bought_after_renting_what_they_cost(tiny_eager, graph_mode):
    """Views of all rows double from VIEW_LENGTH up to the whole cache (one row has VIEW_LENGTH and the whole
    cache only): a request beyond VIEW_LENGTH beside another compiles the view that holds them, not the whole
    cache. Then a short request alone runs in the compiled whole-cache one-row view (renting) while the steps
    rented cost less than a compilation, and the short view is compiled after; every request gets generate()'s
    tokens."""
    from mindone_qwen2vl import engine as engine_module
    from mindone_qwen2vl.engine import Engine

    length = engine_module.VIEW_LENGTH
    rng = np.random.default_rng(6)
    long = dict(input_ids=rng.integers(1000, 5000, (1, length + 100)))  # positions 612.. : the 1024 view
    short = rows()[2]  # text only
    n = 6
    expected = [alone(tiny_eager, c, n) for c in (long, short)]
    engine = Engine(tiny_eager, max_batch=2, max_len=4 * length).start()
    worker = engine.worker
    try:
        assert worker.lengths == [length, 2 * length, 4 * length]
        # Alone: one row, past 512 positions: the whole cache's one-row view.
        assert engine.submit(**long, max_new_tokens=n, eos_token_id=[]).result(300)[0] == expected[0]
        assert sorted(worker.views) == [4 * length]
        # Two rows, one past 512: the 1024 view of all rows, not the whole cache.
        both = [engine.submit(**c, max_new_tokens=n, eos_token_id=[]) for c in (long, short)]
        assert [r.result(300)[0] for r in both] == expected
        assert sorted(worker.views) == [2 * length, 4 * length] and not worker.compiled((2, 4 * length))
        # Renting: the compiled one-row view of the whole cache runs a short request alone; its compilation
        # cost far more than 5 steps.
        assert worker.steps[1, 4 * length].steps_per_compilation() > n
        assert engine.submit(**short, max_new_tokens=n, eos_token_id=[]).result(300)[0] == expected[1]
        assert not worker.compiled((1, length)) and worker.rented[1, length] == n - 1
        # As if compiling had cost 3 steps: the next short request buys the one-row 512 view.
        rented = worker.steps[1, 4 * length]
        rented.first_call_s = 4 * rented.step_s
        assert engine.submit(**short, max_new_tokens=n, eos_token_id=[]).result(300)[0] == expected[1]
        assert worker.compiled((1, length)) and sorted(worker.views) == [length, 2 * length, 4 * length]
        assert engine.worker.decode_graphs() == 3
    finally:
        engine.stop()


def test_threads_submit_and_get_their_answers(tiny_ours, graph_mode):
    from mindone_qwen2vl.engine import Engine

    conversations = rows()
    expected = [alone(tiny_ours, c) for c in conversations]
    engine = Engine(tiny_ours, max_batch=4, max_len=512).start()
    results = {}
    try:
        def client(i):
            results[i] = engine.submit(**conversations[i % 4], max_new_tokens=N, eos_token_id=[]).result(300)[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert {i: results[i] for i in range(8)} == {i: expected[i % 4] for i in range(8)}
    finally:
        engine.stop()


def test_stop_strings_cancel_eos_and_sampling(tiny_ours, tokenizer, graph_mode):
    from mindone_qwen2vl.engine import Engine

    conversation = rows()[0]
    engine = Engine(tiny_ours, tokenizer=tokenizer, max_batch=2, max_len=512).start()
    try:
        tokens, text, reason = engine.submit(**conversation, max_new_tokens=12, eos_token_id=[]).result(300)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True) and reason == "length"
        # A stop string: the text ends before it, the request ends there.
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert stop.strip()
        _, stopped, reason = engine.submit(**conversation, max_new_tokens=12, eos_token_id=[], stop=[stop]).result(300)
        assert reason == "stop" and stopped == text[:text.find(stop)]
        # The streamed pieces add up to the text.
        request = engine.submit(**conversation, max_new_tokens=12, eos_token_id=[])
        pieces = [e[2] for e in request.events(300) if e[0] == "token"]
        assert "".join(pieces) == text
        # An eos id ends the request with "stop" at that token.
        first = tokens[3]
        eos_tokens, _, reason = engine.submit(**conversation, max_new_tokens=12, eos_token_id=[first]).result(300)
        assert reason == "stop" and eos_tokens == tokens[:tokens.index(first) + 1]
        # Cancelled after its first token: it ends, and the next request still runs.
        request = engine.submit(**conversation, max_new_tokens=400, eos_token_id=[])
        next(request.events(300))
        request.cancel()
        assert request.result(300)[2] == "cancelled"
        assert engine.submit(**conversation, max_new_tokens=12, eos_token_id=[]).result(300)[0] == tokens
        # Sampling with a seed repeats itself.
        a = engine.submit(**conversation, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, seed=5)
        b = engine.submit(**conversation, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, seed=5)
        assert a.result(300)[0] == b.result(300)[0]
    finally:
        engine.stop()


def test_bad_requests_are_refused_before_they_are_queued(tiny_ours):
    from mindone_qwen2vl.engine import Engine, EngineFull

    engine = Engine(tiny_ours, max_batch=1, max_queue=2, max_len=64)  # not started: requests stay queued
    conversation = rows()[3]
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        engine.submit(input_ids=np.array([[1, 999999]]))
    with pytest.raises(ValueError, match="more than the engine's 64 positions per request"):
        engine.submit(**conversation, max_new_tokens=100)
    with pytest.raises(ValueError, match="stop strings need the engine's tokenizer"):
        engine.submit(**conversation, max_new_tokens=4, stop=["x"])
    with pytest.raises(TypeError, match="unsupported options: num_beams"):
        engine.submit(**conversation, num_beams=2)
    with pytest.raises(ValueError, match="submit takes one conversation"):
        engine.submit(**case_inputs("mixed_left_padded_batch"))
    engine.submit(**conversation, max_new_tokens=4, num_beams=1, output_attentions=False)  # HF's defaults: accepted
    engine.submit(**conversation, max_new_tokens=4)
    with pytest.raises(EngineFull, match="2 requests are waiting"):
        engine.submit(**conversation, max_new_tokens=4)
    waiting = list(engine.waiting)
    engine.start()
    engine.stop()
    for request in waiting:  # stopped before they ran: each ends with an error, nothing hangs
        events = list(request.events(60))
        assert events[-1][0] in ("done", "error")


def test_streamed_text_is_the_decoded_text_token_by_token(tokenizer):
    """The engine decodes incrementally (only the tokens since the last whole character). Fed a text whose
    characters span several byte-level tokens (Chinese, an emoji, accents), token by token, the pieces it sends
    add up to the whole decoded text; with a stop string that crosses token boundaries, to the text before it."""
    from types import SimpleNamespace

    from mindone_qwen2vl.engine import Engine, _Slot

    text = "Le café 北京欢迎你 🦜🦜 naïve—done. Then a stop word: HALT and more 你好"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 20
    for stop, expected in (((), text), (("HALT",), text[:text.find("HALT")]), (("迎你",), text[:text.find("迎你")])):
        request = SimpleNamespace(tokens=[], stop=stop, text="")
        state = _Slot(request, None, 0, 0, set())
        engine = SimpleNamespace(tokenizer=tokenizer)
        sent, stopped = [], False
        for i, token in enumerate(tokens):
            request.tokens.append(token)
            added, stopped = Engine._text(engine, state, final=i == len(tokens) - 1)
            sent.append(added)
            assert "\ufffd" not in added
            if stopped:
                break
        assert "".join(sent) == expected == request.text
        assert stopped == bool(stop)
        assert state.anchor > 0  # it decoded incrementally: the settled prefix moved on


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_generate_runs_on_the_engine_thread_beside_its_requests(tiny_ours, mode):
    """While an engine serves the model, generate() from other threads is handed to the engine's thread (between
    its steps) and gives the tokens of a sequential call, as do the requests submitted beside it; once the engine
    stops, generate() runs on the caller's thread again."""
    from mindone_qwen2vl.engine import Engine

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        cases = rows()[:3]
        expected = [alone(tiny_ours, c, 3) for c in cases]
        engine = Engine(tiny_ours, max_batch=2, max_len=256).start()
        assert tiny_ours.engine is engine
        with pytest.raises(RuntimeError, match="already served by another engine"):
            Engine(tiny_ours, max_batch=1, max_len=64).start()
        try:
            results, errors, threads = {}, [], []

            def work(i, case):
                try:
                    results["generate", i] = alone(tiny_ours, case, 3)
                except BaseException as error:  # reported below
                    errors.append(repr(error))

            threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(cases)]
            for t in threads:
                t.start()
            submitted = [engine.submit(**c, max_new_tokens=3, eos_token_id=[]) for c in cases]
            for t in threads:
                t.join(timeout=600)
            assert not errors, errors
            for i, request in enumerate(submitted):
                assert request.result(600)[0] == expected[i]
                assert results["generate", i] == expected[i]
            assert engine.stats()["calls"] == len(cases)
        finally:
            engine.stop()
        assert tiny_ours.engine is None
        assert alone(tiny_ours, cases[0], 3) == expected[0]
        assert engine.stats()["calls"] == len(cases)  # that last call ran on the caller's thread
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
