"""HF's generate options on both model classes (Qwen2-VL and Qwen2.5-VL), against HF's generate: num_return_sequences
(the prompt and its images computed once), return_dict_in_generate with scores and logits, stop_strings, and the
options refused or accepted by name."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import test_generation
import test_qwen2_5_vl
from test_qwen2_5_vl import hf25, ours25  # noqa: F401 (module fixtures of the tiny Qwen2.5-VL pair)
from tiny import rel_err

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "mindone_qwen2vl", "assets", "qwen2-vl-2b-instruct")


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def pair(request):
    """(HF model, our model, inputs by case name) of one model class; a left-padded batch of an image, a video,
    a text-only row and another image (Qwen2.5-VL's with second_per_grid_ts)."""
    if request.param == "qwen2_vl":
        hf, ours, cases = request.getfixturevalue("tiny_hf")[0], request.getfixturevalue("tiny_ours"), test_generation
    else:
        hf, ours, cases = request.getfixturevalue("hf25")[0], request.getfixturevalue("ours25"), test_qwen2_5_vl
    return hf, ours, cases.case_inputs


def hf_generate(model, inputs, **options):
    with torch.no_grad():
        return model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **options)


def count_calls(monkeypatch, model):
    """Counts the vision tower's calls (with the number of images and videos each got) and the prompt rows
    computed."""
    seen = {"vision": [], "prompt_rows": 0}
    tower = type(model.visual)
    vision, prompt_rows = tower.__call__, model.prompt_rows

    def counted_vision(self, pixels, grid):
        seen["vision"].append(len(np.asarray(grid).reshape(-1, 3)))
        return vision(self, pixels, grid)

    def counted_rows(*args, **kwargs):
        for item in prompt_rows(*args, **kwargs):
            seen["prompt_rows"] += 1
            yield item

    monkeypatch.setattr(tower, "__call__", counted_vision)
    monkeypatch.setattr(model, "prompt_rows", counted_rows, raising=False)
    return seen


def test_num_return_sequences_computes_the_prompt_once(pair, monkeypatch):
    hf, ours, case_inputs = pair
    inputs = case_inputs("mixed_left_padded_batch")  # 4 prompts: 2 images and 1 video
    seen = count_calls(monkeypatch, ours)
    # top_k=1 sampling draws the most probable token: every copy is HF's (which repeats the prompt rows alike).
    out = ours.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=1, num_return_sequences=3)
    assert seen == {"vision": [3], "prompt_rows": 4}  # once for the batch, not once per copy
    np.testing.assert_array_equal(out, hf_generate(hf, inputs, max_new_tokens=3, do_sample=True, top_k=1,
                                                   num_return_sequences=3).numpy())
    assert out.shape == (12, inputs["input_ids"].shape[1] + 3)
    # Real sampling: the copies of a prompt are drawn independently (HF's order: a prompt's copies side by side).
    ms.set_seed(0)
    drawn = ours.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, temperature=5.0, eos_token_id=[],
                          num_return_sequences=3)
    new = drawn[:, inputs["input_ids"].shape[1]:].reshape(4, 3, 6)
    assert all(len({tuple(copy) for copy in prompt}) > 1 for prompt in new)
    np.testing.assert_array_equal(drawn[:, :inputs["input_ids"].shape[1]], np.repeat(inputs["input_ids"], 3, 0))


def test_return_dict_scores_and_logits_equal_hf(pair):
    hf, ours, case_inputs = pair
    inputs = case_inputs("mixed_left_padded_batch")
    for options in (dict(do_sample=False, repetition_penalty=1.3),
                    dict(do_sample=True, top_k=1, temperature=0.7, num_return_sequences=2)):
        options.update(max_new_tokens=3, return_dict_in_generate=True, output_scores=True, output_logits=True)
        mine, ref = ours.generate(**inputs, **options), hf_generate(hf, inputs, **options)
        np.testing.assert_array_equal(mine.sequences, ref.sequences.numpy())
        assert mine["sequences"] is mine.sequences  # keys and attributes, as HF's output
        assert len(mine.scores) == len(ref.scores) == len(mine.logits) == len(ref.logits) == 3
        for ours_logits, hf_logits in zip(mine.logits, ref.logits):
            assert rel_err(ours_logits, hf_logits.numpy()) < 1e-4
        for ours_scores, hf_scores in zip(mine.scores, ref.scores):  # after the processors: -inf where HF's are
            hf_scores = hf_scores.numpy()
            np.testing.assert_array_equal(np.isfinite(ours_scores), np.isfinite(hf_scores))
            finite = np.isfinite(hf_scores)
            assert rel_err(ours_scores[finite], hf_scores[finite]) < 1e-4


def test_stop_strings_equal_hf(pair):
    hf, ours, case_inputs = pair
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    inputs = case_inputs("mixed_left_padded_batch")
    seq = inputs["input_ids"].shape[1]
    free = ours.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    text = tokenizer.decode(free[0, seq:])
    stop = text[len(text) // 3:len(text) // 3 + 2]
    assert stop.strip(), text
    options = dict(max_new_tokens=8, do_sample=False, stop_strings=stop, tokenizer=tokenizer)
    mine = ours.generate(**inputs, **options)
    np.testing.assert_array_equal(mine, hf_generate(hf, inputs, **options).numpy())
    assert stop in tokenizer.decode(mine[0, seq:]) and mine.shape[1] <= free.shape[1]
    with pytest.raises(ValueError, match="stop_strings need the model's tokenizer: pass tokenizer="):
        ours.generate(**inputs, max_new_tokens=2, stop_strings=["x"])


def test_options_refused_by_name_or_accepted_as_hf(pair):
    _, ours, case_inputs = pair
    inputs = case_inputs("mixed_left_padded_batch")
    plain = ours.generate(**inputs, max_new_tokens=2)
    # HF's defaults of what is not implemented ask for nothing: accepted, same output.
    same = ours.generate(**inputs, max_new_tokens=2, num_beams=1, num_beam_groups=1, output_attentions=False,
                         output_hidden_states=None)
    np.testing.assert_array_equal(same, plain)
    with pytest.raises(TypeError, match=r"unsupported arguments: num_beams=2 \(.*no beam search"):
        ours.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(TypeError, match=r"unsupported arguments: logits_processor, num_beams=4, "
                                        r"output_hidden_states=True"):
        ours.generate(**inputs, max_new_tokens=2, num_beams=4, output_hidden_states=True, logits_processor=[])
    with pytest.raises(TypeError, match="unsupported arguments: num_beams=True"):
        ours.generate(**inputs, max_new_tokens=2, num_beams=True)
    embeds = np.zeros((1, 3, ours.config.text_config.hidden_size), np.float32)
    for given in ({"input_ids": None, "attention_mask": None}, {}):
        with pytest.raises(ValueError, match="generate from inputs_embeds is not supported: pass input_ids"):
            ours.generate(**{**inputs, **given}, inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        ours.generate(**inputs, max_new_tokens=2, num_return_sequences=2)
