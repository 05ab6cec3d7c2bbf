"""Sampling, logits processing, streaming, generation_config.json defaults and option errors of generate().

Processing and top-k/top-p are checked against HF's own processor classes on random scores; end to end runs use
the tiny checkpoint in graph mode (cheap per token once compiled).
"""
import json
import os
import shutil
import threading

import mindspore as ms
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, TextIteratorStreamer, TextStreamer
from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from mindone_qwen2vl.generation import GenerationOptions, TokenChooser
from test_generation import case_inputs, hf_generate
from tiny import left_pad

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")


def options(**kw):
    base = dict(max_new_tokens=8, min_new_tokens=0, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                repetition_penalty=1.0, eos_token_id=(5, 7), pad_token_id=0)
    base.update(kw)
    return GenerationOptions(**base)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


# ---------------------------------------------------------------------------------------------- host-side parts
def test_processing_matches_hf_processors():
    rng = np.random.default_rng(0)
    vocab, prompt = 1000, rng.integers(0, 1000, (3, 12))
    opts = options(repetition_penalty=1.3, min_new_tokens=2, temperature=0.7)
    ours = TokenChooser(opts, prompt, vocab)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3),
                              MinNewTokensLengthLogitsProcessor(12, 2, torch.tensor([5, 7])),
                              TemperatureLogitsWarper(0.7)])
    ids = torch.from_numpy(prompt)
    for step in range(4):
        logits = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
        ref = hf(ids, torch.from_numpy(logits.copy())).numpy()
        np.testing.assert_array_equal(ours.process(logits, step), ref)
        tokens = rng.integers(0, vocab, 3)
        ours.observe(tokens)
        ids = torch.cat([ids, torch.from_numpy(tokens)[:, None]], 1)
    assert np.isneginf(ours.process(logits, 1)[:, [5, 7]]).all()  # eos barred before min_new_tokens
    assert np.isfinite(ours.process(logits, 2)[:, [5, 7]]).all()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (50, 1.0), (20, 0.8), (1, 1.0), (0, 0.3), (0, 0.995), (40, 0.5)])
@pytest.mark.parametrize("spread", [4.0, 0.05])  # peaked scores, and nearly flat ones (top-p needs thousands)
def test_top_k_top_p_candidates_match_hf(top_k, top_p, spread):
    rng = np.random.default_rng(1)
    scores = (rng.standard_normal((4, 5000)) * spread).astype(np.float32)
    chooser = TokenChooser(options(top_k=top_k, top_p=top_p), np.zeros((4, 1), np.int64), 5000)
    warpers = LogitsProcessorList(([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    ref = warpers(torch.zeros(4, 1, dtype=torch.long), torch.from_numpy(scores.copy())).numpy()
    for row, ref_row in zip(scores, ref):
        cand = chooser.candidates(row)
        ours = set(range(5000)) if cand is None else set(cand.tolist())
        assert ours == set(np.flatnonzero(np.isfinite(ref_row)).tolist())


def test_draws_follow_the_softmax():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]], np.float32)
    chooser = TokenChooser(options(), np.zeros((1, 1), np.int64), 6, np.random.default_rng(0))
    draws = np.array([chooser.pick(logits)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=6) / len(draws)
    expected = np.exp(logits[0] - logits.max()) / np.exp(logits[0] - logits.max()).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)


# ---------------------------------------------------------------------------------------------- end to end
def test_top_k_1_sampling_equals_greedy(tiny_hf, tiny_ours, graph_mode):
    inputs = case_inputs("mixed_left_padded_batch")
    sampled = tiny_ours.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7)
    np.testing.assert_array_equal(sampled, hf_generate(tiny_hf[0], inputs, max_new_tokens=8))


def test_seeded_sampling_repeats(tiny_ours, graph_mode):
    inputs = case_inputs("image")
    kw = dict(max_new_tokens=10, do_sample=True, temperature=3.0, top_k=0, eos_token_id=[])
    ms.set_seed(3)
    first = tiny_ours.generate(**inputs, **kw)
    following = tiny_ours.generate(**inputs, **kw)  # the RNG moved on: another sample
    ms.set_seed(3)
    again = tiny_ours.generate(**inputs, **kw)
    ms.set_seed(4)
    other_seed = tiny_ours.generate(**inputs, **kw)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, following)
    assert not np.array_equal(first, other_seed)


class Recorder:
    """A streamer that records HF's calls."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(np.asarray(value).tolist())

    def end(self):
        self.ends += 1


def test_streamer_gets_the_calls_hf_makes(tiny_hf, tiny_ours, graph_mode):
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    inputs = dict(input_ids=ids, attention_mask=mask)
    ours, ref = Recorder(), Recorder()
    out = tiny_ours.generate(**inputs, max_new_tokens=6, streamer=ours)
    hf_generate(tiny_hf[0], inputs, max_new_tokens=6, streamer=ref)
    assert ours.puts == ref.puts and ours.ends == ref.ends == 1
    assert ours.puts[0] == ids.tolist()  # the prompt first, then every new token of every row
    assert [p for p in ours.puts[1:]] == out[:, ids.shape[1]:].T.tolist()


def test_text_streamers(tiny_hf, tiny_ours, graph_mode, capsys):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    inputs = dict(input_ids=np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]]))
    out = tiny_ours.generate(**inputs, max_new_tokens=8, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0, 8:]) + "\n"

    # TextIteratorStreamer: generate in a thread, read the text as it comes, as HF documents.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=tiny_ours.generate(**inputs, max_new_tokens=8, streamer=streamer)))
    worker.start()
    pieces = list(streamer)
    worker.join()
    hf_streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    hf_worker = threading.Thread(target=hf_generate, args=(tiny_hf[0], inputs),
                                 kwargs=dict(max_new_tokens=8, streamer=hf_streamer))
    hf_worker.start()
    hf_pieces = list(hf_streamer)
    hf_worker.join()
    assert pieces == hf_pieces and "".join(pieces) == tokenizer.decode(result["out"][0, 8:])


def test_defaults_from_generation_config_json(tiny_hf, tiny_ours, tmp_path, graph_mode):
    """The real Qwen2-VL generation_config.json samples with top_k=1 (greedy in effect) and stops at either of
    two eos ids; without arguments generate follows the file."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    inputs = case_inputs("text_only")
    free = tiny_ours.generate(**inputs, max_new_tokens=8, eos_token_id=[])[0, 8:].tolist()
    eos = [free[3], 151643]
    stop = free.index(free[3])
    folder = shutil.copytree(tiny_hf[1], tmp_path / "ckpt")
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.01, "eos_token_id": eos,
                   "pad_token_id": 151643, "repetition_penalty": 1.0}, f)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder), progress=False)
    out = model.generate(**inputs, max_new_tokens=8)
    assert out[0, 8:].tolist() == free[:stop + 1]
    # The file is read once, at load: what happens to it afterwards changes nothing.
    assert model.generation_config["eos_token_id"] == eos and model.name_or_path == str(folder)
    os.remove(folder / "generation_config.json")
    np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=8), out)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    # More than the positions of the model (the tiny one's 32768), before the cache is allocated: it used to fail
    # there with a MemoryError (256 GiB for 10^9 tokens).
    (dict(max_new_tokens=10 ** 9), ValueError, "max_new_tokens 1000000000: with the prompt's 3 tokens that is more "
                                               "than the model's 32768 positions"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(eos_token_id="</s>"), ValueError, "eos_token_id"),
    (dict(max_new_token=5), TypeError, "max_new_token"),
    (dict(streamer=object()), TypeError, r"streamer must have put\(\) and end\(\) methods"),
    (dict(attention_mask=np.array([[1, 1, 0]])), ValueError, "left padding"),
    (dict(attention_mask=np.array([[1, 1]])), ValueError, "attention_mask"),
])
def test_bad_options_are_named(tiny_ours, kwargs, error, match):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        tiny_ours.generate(input_ids=np.array([[1, 2, 3]]), **kwargs)


# HF's options (num_return_sequences, return_dict_in_generate, stop_strings, refused options) on both model
# classes: test_generation_hf_options.py.
