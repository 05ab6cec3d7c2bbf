"""host_memory.py: oneDNN's primitive cache bounded, the heap's freed pages handed back after requests."""
import time

import numpy as np
import pytest

from mindone_qwen2vl import host_memory


@pytest.fixture
def capacity():
    """Restores this process's capacity after the test."""
    before = host_memory.primitive_cache_capacity()
    assert before is not None, "MindSpore's oneDNN was not found"
    yield before
    host_memory.bound_primitive_cache(before)


def test_the_primitive_cache_is_capped(capacity, monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert host_memory.bound_primitive_cache(77) == 77 == host_memory.primitive_cache_capacity()
    assert host_memory.bound_primitive_cache() == host_memory.PRIMITIVE_CACHE


def test_the_environment_wins(capacity, monkeypatch):
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.bound_primitive_cache(33)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert host_memory.bound_primitive_cache() == 33  # left as the user's setting made it


def test_a_cpu_model_caps_it(tiny_hf, capacity, monkeypatch):
    from mindone_qwen2vl import Qwen2VLForConditionalGeneration

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.bound_primitive_cache(1024)
    Qwen2VLForConditionalGeneration.from_pretrained(tiny_hf[1], progress=False)
    assert host_memory.primitive_cache_capacity() == host_memory.PRIMITIVE_CACHE


def test_freed_heap_pages_go_back():
    # Blocks below glibc's mmap threshold come from the heap; freeing all but the last leaves free pages
    # below it that only malloc_trim hands back.
    blocks = [np.ones(100 * 1024 // 8) for _ in range(300)]
    del blocks[:-1]
    assert host_memory.release_freed() is True


def test_generate_and_an_idle_engine_release(tiny_ours, monkeypatch):
    from mindone_qwen2vl.engine import Engine

    released = []
    monkeypatch.setattr(host_memory, "release_freed", lambda: released.append(1) or True)
    ids = np.array([[1, 2, 3, 4]])
    tiny_ours.generate(input_ids=ids, max_new_tokens=2, eos_token_id=[])
    assert len(released) == 1
    engine = Engine(tiny_ours, max_batch=2, max_len=64).start()
    try:
        for want in (2, 3):  # once per busy spell, when the engine's thread finds nothing more to do
            engine.submit(ids, max_new_tokens=2, eos_token_id=[]).result(300)
            deadline = time.monotonic() + 30
            while len(released) < want and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(released) == want
    finally:
        engine.stop()
