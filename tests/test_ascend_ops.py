"""tools/check_ascend_ops.py: every MindSpore op of the package, as the Ascend policy compiles it, is documented
for Ascend in the dtypes it is fed (checked on paper: nothing here runs on an NPU)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import check_ascend_ops as checker  # noqa: E402


@pytest.fixture(scope="module")
def graphs():
    return checker.collect(checker.available_models())


def test_every_op_is_documented_for_ascend_as_fed(graphs, capsys):
    problems = checker.check(checker.available_models(), collected=graphs)
    assert problems == [], "\n".join(problems)
    assert "0 problems" in capsys.readouterr().out


def test_ascend_graphs_use_the_fused_kernels_and_fp32_activations(graphs):
    fed, used_in = graphs
    # The Ascend configuration really compiles the fused kernels (kernels.py, attention.py) ...
    for prim in ("RmsNorm", "Swiglu", "FlashAttentionScore"):
        assert any(place.split(":")[0].endswith("/flash") for place in used_in[prim]), prim
    assert fed["FlashAttentionScore"] == {"float16"}
    assert "bfloat16" in fed["MatMul"]  # ... in bf16 where the policy says so,
    # and the activations whose docs list fp16/fp32 only get float32 (kernels._float32_if_bf16).
    assert fed["Sigmoid"] == {"float32"}
    assert "bfloat16" not in fed["Erf"] | fed.get("SiLU", set())
    assert "Softmax" in fed and fed["Softmax"] == {"float32"}  # eager attention's softmax in float32


def test_the_checker_flags_what_the_docs_do_not_list():
    # ops.sigmoid documents float16/float32/float64 only: bf16 fed to it is a problem, float32 is not.
    assert checker.judge("Sigmoid", {"bfloat16"})[3] is not None
    assert checker.judge("Sigmoid", {"float32"})[3] is None
    # nn.MatMul is deprecated in MindSpore 2.10: named in the source, it would be a problem.
    assert checker.judge("MatMul", (), named_in_source=True, nn_cell=True)[2] == "deprecated"
    assert checker.platforms("Supported Platforms:\n    ``GPU`` ``CPU``\n") == ["CPU", "GPU"]
    assert checker.judge("NoSuchOp")[3] is not None


def test_the_source_names_no_deprecated_or_cpu_only_op():
    named = {name for _, name in checker.source_ops()}
    assert "randint" not in named and "flash_attention_score" in named and "Broadcast" in named
