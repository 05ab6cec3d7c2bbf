"""The CPU backend's fused decode step (csrc/decode.cc, generation.decode_kernels): each decoder layer and the head
as one operator, against the eager decode step of the same checkpoint; where it applies; its graph."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindone_qwen2vl.generation import DecodeOneToken, Runner, decode_kernels

ROWS, LENGTH = 2, 256
POSITIONS = np.array([37, 180], np.int32)  # each row's current position: rows at different points of a generation


def fill(runner, rng, beyond=None):
    """Random keys and values at every cache position of every layer; positions past each row's own (which its
    mask hides) get `beyond` if given."""
    for layer in runner.cache.layers:
        for p in (layer.key, layer.value):
            data = rng.standard_normal(p.shape).astype(np.float32)
            if beyond is not None:
                view = data.reshape(runner.cache.layers[0].shape)
                for row, pos in enumerate(POSITIONS):
                    view[row, :, pos + 1:] = beyond
            p.set_data(Tensor(data))


def step(model, beyond=None):
    """One decode step of ROWS rows at POSITIONS over a cache filled at random (seeded): logits and the caches."""
    runner = Runner(model, ROWS, LENGTH, layerwise=False)
    fill(runner, np.random.default_rng(3), beyond)
    ids = Tensor(np.array([11, 57], np.int32))
    logits = runner.decode(ids, Tensor(POSITIONS), Tensor(POSITIONS + 5)).asnumpy()
    caches = [(layer.key.asnumpy(), layer.value.asnumpy()) for layer in runner.cache.layers]
    return runner, logits, caches


def test_fused_step_matches_the_eager_step(tiny_ours, tiny_eager, ms_mode):
    """Logits within 1e-5 of the eager step's (relative to max |logit|), the same greedy tokens, and the token's
    keys and values written at each row's position of every layer's cache, nothing else."""
    runner, got, got_caches = step(tiny_ours)
    assert runner.decode.fused and runner.layerwise is None  # the whole step: no layer-by-layer phase
    _, want, want_caches = step(tiny_eager)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()
    before = np.random.default_rng(3)
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
        for g, w in ((gk, wk), (gv, wv)):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    # The writes happened: the caches differ from their random fill at exactly the rows' positions.
    fill_k = before.standard_normal(got_caches[0][0].shape).astype(np.float32)
    changed = (got_caches[0][0] != fill_k).any(-1).reshape(ROWS, -1, LENGTH)
    assert [sorted(set(np.nonzero(changed[r])[1])) for r in range(ROWS)] == [[p] for p in POSITIONS]


def test_fused_step_never_reads_masked_positions(tiny_ours, tiny_eager):
    """Positions past a row's own are not read: NaN there changes nothing (the eager step reads them and weighs
    them 0, which NaN would poison)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        _, got, _ = step(tiny_ours, beyond=np.nan)
        _, want, _ = step(tiny_eager, beyond=0.0)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_where_the_fused_step_applies(tiny_ours, tiny_eager, monkeypatch):
    """Only under sdpa (the CPU backend) in float32 and in one process: a tensor-parallel rank's layer must reduce
    across ranks, which the kernel does not."""
    assert decode_kernels(tiny_ours) is not None
    assert decode_kernels(tiny_eager) is None
    assert not DecodeOneToken(tiny_eager, Runner(tiny_eager, 1, LENGTH, layerwise=False).cache).fused
    monkeypatch.setattr(tiny_ours, "tensor_parallel", (0, 2))
    assert decode_kernels(tiny_ours) is None


@pytest.mark.parametrize("bad", ["rows", "cache"])
def test_the_layer_operator_refuses_inconsistent_shapes(tiny_ours, bad):
    """A call whose shapes do not fit together fails in MindSpore with an error, never writes out of bounds."""
    kernels = decode_kernels(tiny_ours)
    layer = tiny_ours.model.layers[0]
    attn = layer.self_attn
    n, d, e = attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim, tiny_ours.config.text_config.hidden_size
    kvh = attn.num_kv_heads
    x = Tensor(np.zeros((1, e), np.float32))
    cos = Tensor(np.ones((1, n, d), np.float32))
    mask = Tensor(np.zeros((1, 1, 1, 8), np.float32))
    rows = Tensor(np.array([[0] * kvh], np.int32) + (10 ** 6 if bad == "rows" else 0))
    cache = Tensor(np.zeros((kvh * (8 if bad == "rows" else 4), d), np.float32))
    eps = Tensor(np.array([1e-6], np.float32))
    with pytest.raises(RuntimeError):
        kernels.decode_layer(x, cos, cos, mask, rows, cache, cache, *layer.weights(), eps).asnumpy()


def test_a_bad_row_writes_nothing(tiny_ours):
    """A call whose second row's cache row is out of bounds fails before the first row's key and value are
    written: the cache is left as it was."""
    kernels = decode_kernels(tiny_ours)
    layer = tiny_ours.model.layers[0]
    attn = layer.self_attn
    n, d, e = attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim, tiny_ours.config.text_config.hidden_size
    kvh, length = attn.num_kv_heads, 8
    x = Tensor(np.ones((2, e), np.float32))
    cos = Tensor(np.ones((2, n, d), np.float32))
    mask = Tensor(np.zeros((2, 1, 1, length), np.float32))
    rows = Tensor(np.array([[0] * kvh, [10 ** 6] * kvh], np.int32))
    cache = Tensor(np.zeros((2 * kvh * length, d), np.float32))
    eps = Tensor(np.array([1e-6], np.float32))
    with pytest.raises(RuntimeError):
        kernels.decode_layer(x, cos, cos, mask, rows, cache, cache, *layer.weights(), eps).asnumpy()
    assert not cache.asnumpy().any()
