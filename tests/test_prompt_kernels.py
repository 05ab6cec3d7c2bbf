"""The CPU backend's prompt layer (csrc/prompt.cc, Qwen2VLTextModel.prompt_kernels): each decoder layer of a
prompt as two operators, against the eager prompt of the same checkpoint; where it applies; bad shapes."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor


def prompt(model, length, keep_last):
    """One prompt of `length` random tokens (seeded) with three distinct M-RoPE axes: (hidden, keys and values)."""
    rng = np.random.default_rng(length)
    ids = rng.integers(0, model.config.text_config.vocab_size, length).astype(np.int32)
    positions = np.stack([np.arange(length), np.arange(length) // 3, np.arange(length) % 4 + 2])
    embeds = model.model.steps["embed"](Tensor(ids))
    hidden, kv = model.model.prompt(embeds, positions, keep_last=keep_last, keep_kv=True)
    return hidden.asnumpy(), [a.asnumpy() for a in kv]


@pytest.mark.parametrize("length, keep_last", [(1, 0), (9, 3), (70, 0)])
def test_fused_prompt_matches_the_eager_prompt(tiny_ours, tiny_eager, ms_mode, length, keep_last):
    """Hidden states within 1e-5 of the eager prompt's (relative to their max), the kept rows only, and every
    layer's keys and values."""
    assert tiny_ours.model.prompt_kernels() is not None
    compiled = tiny_ours.model.steps["layer_fused"].compiled()
    got, got_kv = prompt(tiny_ours, length, keep_last)
    want, want_kv = prompt(tiny_eager, length, keep_last)
    if ms_mode == "graph":
        assert tiny_ours.model.steps["layer_fused"].compiled() == max(compiled, 1)  # one graph, every length
    assert got.shape == want.shape == (keep_last or length, tiny_ours.config.text_config.hidden_size)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert len(got_kv) == len(want_kv) == 2 * len(tiny_ours.model.layers)
    for g, w in zip(got_kv, want_kv):
        assert g.shape == w.shape
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5


def test_where_the_fused_prompt_applies(tiny_ours, tiny_eager, monkeypatch):
    """Only under sdpa (the CPU backend) in float32 and in one process: a tensor-parallel rank's layer must reduce
    across ranks, which the kernels do not."""
    assert tiny_ours.model.prompt_kernels() is not None
    assert tiny_eager.model.prompt_kernels() is None
    monkeypatch.setattr(tiny_ours.model, "tensor_parallel", (0, 2))
    assert tiny_ours.model.prompt_kernels() is None


def layer_inputs(model, length, n=None):
    layer = model.model.layers[0]
    attn = layer.self_attn
    n = n or attn.num_heads + 2 * attn.num_kv_heads
    d, e = attn.head_dim, model.config.text_config.hidden_size
    x = Tensor(np.ones((length, e), np.float32))
    table = Tensor(np.ones((length, n, d), np.float32))
    return layer, x, table, Tensor(np.array([1e-6], np.float32))


@pytest.mark.parametrize("bad", ["rows", "heads", "bias"])
def test_the_prompt_operators_refuse_inconsistent_shapes(tiny_ours, bad):
    """A call whose inputs do not fit together (a position past the prompt, rotary tables of another head count, a
    bias shorter than its projection) fails in MindSpore with an error, never reads out of bounds."""
    kernels = tiny_ours.model.prompt_kernels()
    layer, x, table, eps = layer_inputs(tiny_ours, 6)
    w = layer.weights()
    if bad == "bias":
        short = Tensor(w[2].asnumpy()[:-1])
        with pytest.raises(RuntimeError):
            kernels.prompt_project(x, table, table, w[0], w[1], short, *w[3:7], eps).asnumpy()
        return
    if bad == "heads":
        _, _, wrong, _ = layer_inputs(tiny_ours, 6, n=3)
        with pytest.raises(RuntimeError):
            kernels.prompt_project(x, wrong, wrong, *w[:7], eps).asnumpy()
        return
    qkv = kernels.prompt_project(x, table, table, *w[:7], eps)
    assert qkv.shape == (table.shape[1], 6, table.shape[2])
    with pytest.raises(RuntimeError):
        kernels.prompt_attend(x, qkv, Tensor(np.array([2, 6], np.int32)), *w[7:], eps).asnumpy()


def test_layer_operators_that_compute_wrong_are_not_used(tmp_path, monkeypatch):
    """cpu_kernels.check_layers finds layer operators that compute wrong (here a build whose q/k/v projections
    drop their last bias element): `layers_ready` is false, with a warning, so the model keeps MindSpore's steps.
    The library this process uses passes the same check."""
    from mindone_qwen2vl import cpu_kernels

    monkeypatch.setenv("MINDONE_QWEN2VL_KERNEL_CACHE", str(tmp_path))
    sources = []
    for source in cpu_kernels.SOURCES:
        text = source.read_text()
        if source.name == "prompt.cc":
            good = "mindone::AddBias(into, t, widths[p], n * d, in(bias[p]));"
            assert good in text
            text = text.replace(good, "mindone::AddBias(into, t, widths[p] - 1, n * d, in(bias[p]));")
        sources.append(tmp_path / source.name)
        sources[-1].write_text(text)
    monkeypatch.setattr(cpu_kernels, "SOURCES", tuple(sources))
    broken = cpu_kernels.Kernels(str(cpu_kernels.build()))
    assert "wrong results" in cpu_kernels.check_layers(broken)
    with pytest.warns(RuntimeWarning, match="run MindSpore's kernels instead"):
        assert not broken.layers_ready
    monkeypatch.undo()
    assert cpu_kernels.check_layers(cpu_kernels.kernels()) is None
