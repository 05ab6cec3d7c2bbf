"""generate() against HF transformers' generate (greedy, fp32) on the tiny random checkpoint, in pynative and
graph mode; every step compiles once for any shape, the decode step once per bucket."""
import itertools

import mindspore as ms
import numpy as np
import pytest
import torch

from tiny import IMAGE, VIDEO, left_pad, random_pixels, vision_block

IMG, IMG_B, VID = (1, 4, 6), (1, 8, 4), (3, 4, 4)
# Pynative runs op by op on the CPU (slow): fewer tokens there.
NEW_TOKENS = {"pynative": 4, "graph": 12}


def case_inputs(name):
    if name == "image":
        return dict(input_ids=np.array([[1, 2] + vision_block(IMAGE, IMG) + [3, 4, 5]]),
                    pixel_values=random_pixels([IMG], 2), image_grid_thw=np.array([IMG]))
    if name == "video":
        return dict(input_ids=np.array([[1, 2] + vision_block(VIDEO, VID) + [3, 4]]),
                    pixel_values_videos=random_pixels([VID], 4), video_grid_thw=np.array([VID]))
    if name == "text_only":
        return dict(input_ids=np.array([[151644, 872, 198, 74785, 419, 2168, 13, 151645]]))
    if name == "mixed_left_padded_batch":
        ids, mask = left_pad([
            [1, 2] + vision_block(IMAGE, IMG) + [3],
            [7] + vision_block(VIDEO, VID) + [8, 9],
            [4, 5, 6],
            vision_block(IMAGE, IMG_B) + [9],
        ])
        grid = np.array([IMG, IMG_B])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(grid, 5), image_grid_thw=grid,
                    pixel_values_videos=random_pixels([VID], 6), video_grid_thw=np.array([VID]))
    raise KeyError(name)


def hf_generate(hf_model, inputs, **options):
    options.setdefault("do_sample", False)
    with torch.no_grad():
        out = hf_model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **options)
    return out.numpy()


@pytest.mark.parametrize("case", ["image", "video", "text_only", "mixed_left_padded_batch"])
def test_greedy_matches_hf(tiny_hf, tiny_ours, ms_mode, case):
    inputs = case_inputs(case)
    n = NEW_TOKENS[ms_mode]
    ours = tiny_ours.generate(**inputs, max_new_tokens=n)
    ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n)


def test_a_padded_batch_without_its_mask_is_masked_by_the_pad_token(tiny_hf, tiny_ours):
    """Without attention_mask, generate() takes the pad token for padding, as HF's does (unless the pad token is
    also an end token, where HF and ours take every position as real): the rows get their masked answers. They
    used to attend to the padding as if it were text."""
    inputs = case_inputs("mixed_left_padded_batch")
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    n, eos = 4, [151645]
    ours = tiny_ours.generate(**unmasked, max_new_tokens=n, pad_token_id=151643, eos_token_id=eos)
    np.testing.assert_array_equal(ours, tiny_ours.generate(**inputs, max_new_tokens=n, pad_token_id=151643,
                                                           eos_token_id=eos))
    np.testing.assert_array_equal(ours, hf_generate(tiny_hf[0], unmasked, max_new_tokens=n, pad_token_id=151643,
                                                    eos_token_id=eos))
    # The pad token is also an end token: no mask is inferred, on either side.
    both = dict(max_new_tokens=n, pad_token_id=151643, eos_token_id=[151645, 151643])
    np.testing.assert_array_equal(tiny_ours.generate(**unmasked, **both), hf_generate(tiny_hf[0], unmasked, **both))


def test_repetition_penalty_matches_hf(tiny_hf, tiny_ours, ms_mode):
    inputs = case_inputs("image")
    n = NEW_TOKENS[ms_mode] + 2
    plain = hf_generate(tiny_hf[0], inputs, max_new_tokens=n)
    ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n, repetition_penalty=1.5)
    assert not np.array_equal(plain, ref)  # the tiny model repeats itself: the penalty changes its output
    ours = tiny_ours.generate(**inputs, max_new_tokens=n, repetition_penalty=1.5)
    np.testing.assert_array_equal(ours, ref)


def pick_eos(rows, n):
    """Token ids from a greedy run that end every row before the last step, not all at the same step."""
    first = []  # per row: token -> the step it first appears
    for row in rows:
        seen = {}
        for step, tok in enumerate(row.tolist()):
            seen.setdefault(tok, step)
        first.append(seen)
    best = None
    for choice in itertools.product(*[sorted(f, key=f.get)[:4] for f in first]):
        stops = [min(f.get(t, n) for t in choice) for f in first]
        if max(stops) < n - 1 and len(set(stops)) >= 2:
            spread = len(set(stops))
            if best is None or spread > best[0]:
                best = (spread, sorted(set(int(t) for t in choice)), stops)
    assert best is not None, f"no eos choice stops the rows at different steps: {rows}"
    return best[1], best[2]


def test_eos_list_stops_rows_at_different_steps(tiny_hf, tiny_ours):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        inputs = case_inputs("mixed_left_padded_batch")
        n, seq, pad = 10, inputs["input_ids"].shape[1], 151643
        free = tiny_ours.generate(**inputs, max_new_tokens=n, eos_token_id=[])[:, seq:]
        eos, stops = pick_eos(free, n)
        print(f"eos {eos}: rows stop at steps {stops} of {n}")
        ours = tiny_ours.generate(**inputs, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        np.testing.assert_array_equal(ours, ref)
        # Each row ends at its own eos, then holds padding; the call stops when the last row has ended.
        assert ours.shape[1] == seq + max(stops) + 1 < seq + n
        for r, stop in enumerate(stops):
            assert ours[r, seq + stop] in eos
            assert (ours[r, seq + stop + 1:] == pad).all()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_prompts_one_after_another(tiny_hf, tiny_ours, ms_mode):
    """Different rope_deltas (image, video, text) on one model and one cache: nothing stale between calls."""
    n = NEW_TOKENS[ms_mode]
    for case in ["image", "video", "text_only", "image"]:
        inputs = case_inputs(case)
        np.testing.assert_array_equal(tiny_ours.generate(**inputs, max_new_tokens=n),
                                      hf_generate(tiny_hf[0], inputs, max_new_tokens=n), err_msg=case)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_steps_compile_once_for_any_shape(tiny_hf, attn):
    """In GRAPH_MODE the vision, prompt and head steps compile once whatever the image sizes and prompt lengths;
    the decode step and its prompt write compile once per (batch rows, cache length) bucket, and a short
    generation reuses a bucket already compiled. A fresh model, so that the counts are this test's. Under sdpa
    (the default) a prompt's layer is one step of two CPU kernels; under eager, two steps, the masked attention."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.attention import CAUSAL_BLOCKS
    from mindone_qwen2vl.generation import SHORT_CACHE_POSITIONS

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, attn_implementation=attn)
    fused = attn == "sdpa"
    shared = ["vision.embed", "vision.project", "vision.attend", "vision.merger", "text.embed", "text.rotary",
              "text.project", "text.attend", "text.attend_shared_mask", "head"] + \
        ["text.attend_fused", "text.layer_fused", "vision.block_fused"] * fused
    # The causal-block attention of long prompts (none here; the first prompt of 16 tokens or more compiles it).
    blocked = [f"text.attend.{CAUSAL_BLOCKS}", f"text.attend_shared_mask.{CAUSAL_BLOCKS}"]
    shared += blocked
    assert sorted(model.compiled_graphs()) == sorted(shared)  # no bucket before the first generation
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        out = model.generate(**case_inputs("text_only"), max_new_tokens=40, eos_token_id=[])
        assert out.shape[1] == case_inputs("text_only")["input_ids"].shape[1] + 40
        graphs = model.compiled_graphs()
        # Every decoder layer of the prompt ran the shared steps: one graph each. A short generation with no
        # bucket to run in compiles one with room for the next ones. Under eager it decodes it layer by layer
        # (two graphs of its own and the shared head, layerwise.py); under sdpa the whole step, whose layers are
        # one kernel each (generation.decode_kernels), compiles as fast.
        bucket = f"1x{SHORT_CACHE_POSITIONS}"
        layer = ("text.layer_fused",) if fused else ("text.project", "text.attend")
        used = ("text.embed", "text.rotary", *layer, "head", f"write.{bucket}") + (f"decode.{bucket}",) * fused

        def decode_graphs(bucket, compiled):  # the decode steps of a bucket and their graphs
            return {f"decode.{bucket}": compiled} if fused else {f"decode.{bucket}": 0, f"decode_layers.{bucket}": 2}

        assert graphs == {**{k: int(k in used) for k in shared + [f"write.{bucket}"]}, **decode_graphs(bucket, 1)}
        # Pin what a compilation costs in steps (measured on the fly, see test_bucket_policy_rents_before_it_buys),
        # so that the generations below rent the bucket whatever this machine's speed, and decode it layer by
        # layer (test_layerwise_and_whole_decode_match_hf covers the switch).
        model.runners.by_shape[1, SHORT_CACHE_POSITIONS].first_call_s = 10.0
        model.runners.by_shape[1, SHORT_CACHE_POSITIONS].step_s = 0.01
        model.runners.whole_after = 10 ** 6
        # Other prompt lengths, images of several sizes, a video, forward(), a longer generation: no new graph.
        model.generate(input_ids=np.array([[5, 6, 7]]), max_new_tokens=30, eos_token_id=[])
        for case in ("image", "video"):
            model.generate(**case_inputs(case), max_new_tokens=5)
        ids = [[1] + vision_block(IMAGE, IMG_B) + [2] + vision_block(IMAGE, (1, 2, 2)) + [3]]
        grid = np.array([IMG_B, (1, 2, 2)])
        model.generate(input_ids=np.array(ids), pixel_values=random_pixels(grid, 8), image_grid_thw=grid,
                       max_new_tokens=5)
        model.generate(input_ids=np.array([[5, 6, 7, 8]]), max_new_tokens=70, eos_token_id=[])
        model(**case_inputs("image"))
        # The first prompt of 16 tokens or more compiled the causal-block attention (so that a long prompt later
        # does not stop to compile it); the shared-mask variants are for prompts whose masks exceed the budget.
        expected = {**{k: int(k not in blocked) for k in shared}, "text.attend_shared_mask": 0,
                    f"text.attend.{CAUSAL_BLOCKS}": int(not fused), **decode_graphs(bucket, 1), f"write.{bucket}": 1}
        if fused:  # the halves of a layer and of a vision block never run: each is one step of CPU kernels
            expected.update({"text.attend": 0, "text.project": 0, "text.attend_fused": 0, "vision.project": 0,
                             "vision.attend": 0})
        assert model.compiled_graphs() == expected
        # A new batch size (3 rows -> 4) adds exactly its decode steps and its prompt write.
        ids, mask = left_pad([[4, 5, 6], [7, 8], [9, 10, 11, 12]])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
        rows4 = f"4x{SHORT_CACHE_POSITIONS // 4}"
        assert model.compiled_graphs() == {**expected, **decode_graphs(rows4, 1), f"write.{rows4}": 1}
        # The decode step holds the model as plain attributes: a call walks no sub-cells on the host.
        runner = model.runners.by_shape[(1, SHORT_CACHE_POSITIONS)]
        assert [name for name, _ in runner.decode.cells_and_names()] == [""]
        # Steps whose one graph serves every call take MindSpore's fast call path after the first (graphs.Step);
        # the whole decode step, a cell the engine calls with several row counts, does not.
        assert model.model.steps["layer_fused" if fused else "project"].phase == "increment"
        assert fused or runner.layerwise.decode.layer.phase == "increment"
        assert runner.decode.phase != "increment"
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_fused_buckets_are_never_bought_tighter(tiny_ours):
    """Under sdpa a decode step reads only the positions its rows see: a generation runs in any compiled bucket
    that holds it, however long its own would be and however many tokens it asks for."""
    from mindone_qwen2vl.generation import Runners

    runners = Runners(tiny_ours)
    big = runners.get(1, 900, new_tokens=8)
    assert big.decode.fused and big.length == 4096
    for _ in range(3):
        assert runners.get(1, 300, new_tokens=10 ** 5) is big
    assert list(runners.by_shape) == [(1, 4096)]
    assert runners.get(1, 5000, new_tokens=8).length == 16384  # nothing holds it: a bucket of its own
    assert runners.get(2, 300, new_tokens=8).rows == 2  # other rows: another bucket


def test_bucket_policy_rents_before_it_buys(tiny_eager):
    """Runners.get: with no bucket compiled, a long generation gets its tightest bucket and a short one a bucket
    with room; a generation then runs in a longer compiled bucket until the steps run that way for its own
    bucket cost what a compilation costs (both measured: first_call_s, step_s), and then gets its own. (Eager:
    under sdpa the step costs the same in any bucket, test_fused_buckets_are_never_bought_tighter.)"""
    from mindone_qwen2vl.generation import Runners

    runners = Runners(tiny_eager)
    assert (runners.get(1, 300, new_tokens=100).rows, runners.get(1, 300, new_tokens=100).length) == (1, 512)
    assert runners.get(1, 900, new_tokens=8).length == 4096  # short, nothing holds it: room to spare
    big = runners.by_shape[1, 4096]
    assert runners.get(1, 1500, new_tokens=8) is big  # not measured yet: a compilation counts as 64 steps
    big.first_call_s, big.step_s = 1.02, 0.01  # measured: a compilation costs 100 of its steps
    assert runners.steps_rented() == {(1, 2048): 8}
    for _ in range(11):
        assert runners.get(1, 1500, new_tokens=8) is big  # 8 + 11 * 8 = 96 < 100
    assert runners.get(1, 1500, new_tokens=8).length == 2048  # 104 >= 100: buy
    assert runners.get(1, 1500, new_tokens=8).length == 2048
    assert runners.get(1, 200, new_tokens=500).length == 256  # 500 steps cost more than a compilation (of 512)
    assert runners.get(3, 10, new_tokens=8).rows == 4


def test_layerwise_and_whole_decode_match_hf(tiny_hf):
    """In GRAPH_MODE generate() decodes a bucket layer by layer (layerwise.py) until the tokens asked of it make
    the whole-decoder step worth compiling (Runners.whole_step_after); then the bucket keeps the whole step. Both
    give HF's greedy tokens. The switch comes before a generation, never within one. A fresh model, so that the
    counts are this test's; eager, since under sdpa the whole step's layers are fused kernels that compile fast
    and no bucket decodes layer by layer (tests/test_decode_kernels.py)."""
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.generation import WHOLE_STEP_AFTER, Runners

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False, attn_implementation="eager")
    inputs, n = case_inputs("mixed_left_padded_batch"), 6
    ref = hf_generate(tiny_hf[0], inputs, max_new_tokens=n)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=n), ref)
        (key, runner), = model.runners.by_shape.items()
        bucket = "x".join(map(str, key))
        assert not runner.whole and runner.layerwise.calls >= n - 1 and runner.calls == 0
        layer_steps = runner.layerwise.calls
        model.runners.whole_after = layer_steps + n  # this generation's tokens reach it: the whole step
        np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=n), ref)
        assert runner.whole and runner.calls >= n - 1 and runner.layerwise.calls == layer_steps
        graphs = model.compiled_graphs()
        assert graphs[f"decode.{bucket}"] == 1 and graphs[f"decode_layers.{bucket}"] == 2
        # The same token at the same position through both steps: bit-identical logits (each writes the same key
        # and value into the cache before attending, so the second call sees what the first left).
        rows = runner.rows
        step_args = [ms.Tensor(np.full(rows, v, np.int32)) for v in (7, 20, 20)]
        layer_logits = runner.layerwise.decode(*step_args).asnumpy()
        np.testing.assert_array_equal(runner.decode(*step_args).asnumpy(), layer_logits)
        np.testing.assert_array_equal(runner.layerwise.decode(*step_args).asnumpy(), layer_logits)
        model.runners.whole_after = None  # both steps measured: their costs decide
        lw = runner.layerwise
        saved = lw.step_s - runner.step_s
        expect = float("inf") if saved <= 0 else (runner.first_call_s - runner.step_s) / saved
        assert model.runners.whole_step_after() == expect
        # Before anything is measured: WHOLE_STEP_AFTER tokens, counting the generation about to run.
        runners = Runners(model)
        assert not runners.get(1, 300, new_tokens=WHOLE_STEP_AFTER - 1).whole
        assert runners.get(1, 300, new_tokens=WHOLE_STEP_AFTER).whole
        assert runners.get(2, 300, new_tokens=8).layerwise is not None  # every bucket starts layer by layer
        # A short generation rents a longer bucket that decodes layer by layer for WHOLE_STEP_AFTER steps (its
        # whole step is not measured) before its own bucket is made.
        big = runners.get(1, 900, new_tokens=8)
        assert big.length == 4096 and not big.whole
        for _ in range(WHOLE_STEP_AFTER // 8 - 1):
            assert runners.get(1, 1500, new_tokens=8) is big
        assert runners.get(1, 1500, new_tokens=8).length == 2048
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    # In PYNATIVE_MODE nothing compiles: the whole step runs from the first token.
    assert Runners(model).get(1, 300, new_tokens=8).layerwise is None


def test_ms_tensor_in_ms_tensor_out(tiny_ours):
    inputs = case_inputs("text_only")
    out = tiny_ours.generate(input_ids=ms.Tensor(inputs["input_ids"]), max_new_tokens=2)
    assert isinstance(out, ms.Tensor) and out.dtype == ms.int64
    np.testing.assert_array_equal(out.asnumpy()[:, :8], inputs["input_ids"])


@pytest.fixture(scope="module")
def flash_pair(tmp_path_factory):
    """The same checkpoint loaded with eager and with flash attention (the kernel emulated on CPU, in fp32, given
    by the precision policy). The emulated kernel wants head sizes that are multiples of 16: vision 32/2, text
    64/4."""
    import flash_emulation
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration
    from mindone_qwen2vl.precision import PrecisionPolicy
    from tiny import hf_config, hf_model, save_checkpoint

    folder = save_checkpoint(hf_model(hf_config(vision_heads=2), seed=7), str(tmp_path_factory.mktemp("flash")))
    eager = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False)
    policy = PrecisionPolicy(attn_implementation="flash_attention_2", flash_dtype=ms.float32,
                             flash_kernel=flash_emulation.emulated_flash_attention_score)
    flash = Qwen2VLForConditionalGeneration.from_pretrained(folder, progress=False, policy=policy)
    return eager, flash


def test_flash_attention_path_generates_the_same(flash_pair):
    """The Ascend default: every attention goes through flash_attention_score in the BNSD layout: the vision
    frames in batches of equal length, each prompt row over its own keys (no padding), the decode step over the
    cache bucket.
    Pynative only: there the emulation logs its calls (and graph mode would compile two more models)."""
    import flash_emulation

    eager, flash = flash_pair
    inputs = case_inputs("mixed_left_padded_batch")
    n = NEW_TOKENS["pynative"]
    flash_emulation.CALLS.clear()
    ours = flash.generate(**inputs, max_new_tokens=n)
    calls = list(flash_emulation.CALLS)
    assert {call[0] for call in calls} == {"BNSD"} and {call[1] for call in calls} == {0}
    assert {call[2][3] for call in calls} == {16}  # head_dim
    # (batch, query length, key length, mask) by head count: the vision tower has 2 heads, the decoder 4.
    found = {(q[1], q[0], q[2], k[2], mask) for _, _, q, k, mask in calls}
    vision = {entry[1:] for entry in found if entry[0] == 2}
    text = {entry[1:] for entry in found if entry[0] == 4}
    assert len(vision) + len(text) == len(found)
    # One batch entry per frame of equal length, no mask: the 3 frames of the video (16 patches each), the two
    # images.
    assert vision == {(3, 16, 16, None), (1, 24, 24, None), (1, 32, 32, None)}
    # Each prompt row over its own keys with a boolean (1, 1, S, S) causal mask (the last layer: its last
    # position only, one mask row), then the decode step: one query per row of the bucket (4 rows) over the
    # whole cache, a boolean (B, 1, 1, L) mask.
    lengths = inputs["attention_mask"].sum(-1).tolist()
    (rows, length), = flash.runners.by_shape
    assert rows == 4
    assert text == ({(1, s, s, ((1, 1, s, s), ms.bool_)) for s in lengths}
                    | {(1, 1, s, ((1, 1, 1, s), ms.bool_)) for s in lengths}
                    | {(4, 1, length, ((4, 1, 1, length), ms.bool_))})
    np.testing.assert_array_equal(ours, eager.generate(**inputs, max_new_tokens=n))
