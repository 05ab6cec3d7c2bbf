"""Check the MindSpore ops the package uses against the installed MindSpore's documentation for Ascend.

    python tools/check_ascend_ops.py [--model qwen2_vl|qwen2_5_vl ...] [--verbose]

Nothing here runs on an NPU. Two readings of the code, both checked against the op docstrings of the installed
MindSpore ("Supported Platforms", and the dtypes a docstring lists):

1. The graphs as the Ascend precision policy builds them: every compiled step of a tiny model (vision tower,
   prompt steps, cache writes, head, decode) is compiled for the Ascend configuration (bf16 compute, bf16
   patch embedding, fp16 flash attention, the fused Ascend kernels of kernels.py). MindSpore's front end (type
   inference, the validate stage) runs on any machine; the CPU backend then refuses the bf16 and Ascend-only
   kernels, which is expected. The validate-stage IR names each primitive with the dtypes of its inputs: the
   primitives and dtypes the NPU would receive.
2. The source: every `ops.X` / `mint.X` / `nn.X` the package names, including host-side and collective ops that
   the tiny single-process graphs do not contain (HCCL broadcast, all-reduce, all-gather).

A primitive fails the check when its docstring lists platforms without Ascend, or lists float dtypes and not one
the Ascend policy feeds it. Exit status 1 then. Docstrings with no dtype list pass as "not listed".
"""
import argparse
import ast
import collections
import glob
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mindone_qwen2vl")

# IR bookkeeping, not device ops.
NOT_OPS = {"MakeTuple", "TupleGetItem", "Return", "Load", "UpdateState", "Depend", "make_tuple", "tuple_getitem",
           "ScalarToTensor", "TupleToTensor", "TensorToTuple", "RealMakeTuple", "RealTupleGetItem", "Partial",
           "TensorShape", "Shape", "ScalarMul", "ScalarAdd", "ScalarSub", "ScalarFloorDiv", "ScalarCast",
           "MakeSlice", "TensorMove", "ScalarDiv", "ScalarEq", "ScalarGe", "ScalarGt", "ScalarLe", "ScalarLt",
           "sequence_len", "SequenceLen", "ListToTensor", "TupleToList", "ListGetItem", "MakeList"}
# Framework objects named in the source that are not device ops.
NOT_SOURCE_OPS = {"Cell", "CellList", "SequentialCell", "isconstant", "depend"}
FLOATS = ("bfloat16", "float16", "float32", "float64")
IR_DTYPES = {"BFloat16": "bfloat16", "Float16": "float16", "Float32": "float32", "Float64": "float64",
             "Int32": "int32", "Int64": "int64", "Bool": "bool", "UInt8": "uint8", "Int8": "int8"}
_CALL = re.compile(r"= (?:PrimFunc|Prim)_([A-Za-z0-9_]+)\(")
_TENSOR = re.compile(r"Tensor\[([A-Za-z0-9]+)\]")


# ---------------------------------------------------------------------------------------------- documentation
def _snake(name):
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def documentation(name, nn_cell=False):
    """(where the docs were found, docstring, the object's own docstring) for a primitive or function name,
    following the "Refer to :func:`mindspore.ops.x`" pointers of primitive classes to the functional docs;
    (None, "", "") if there are none."""
    import mindspore.ops.auto_generate as generated
    import mindspore.ops.operations as operations
    from mindspore import mint, nn, ops

    seen, texts = set(), []
    candidates = [("ops", getattr(ops, name, None)), ("ops.operations", getattr(operations, name, None)),
                  ("ops.auto_generate", getattr(generated, name, None)), ("mint", getattr(mint, name, None)),
                  ("ops", getattr(ops, _snake(name), None))]
    if nn_cell:
        candidates.insert(0, ("nn", getattr(nn, name, None)))
    where, own = None, ""
    for label, obj in candidates:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        doc = getattr(obj, "__doc__", None) or ""
        if not doc:
            continue
        if where is None:
            where, own = f"{label}.{getattr(obj, '__name__', name)}", doc
        texts.append(_without_examples(doc))
        for ref in re.findall(r":(?:func|class):`mindspore\.ops\.([A-Za-z0-9_]+)`", doc):
            target = getattr(ops, ref, None)
            if target is not None and id(target) not in seen and target.__doc__:
                seen.add(id(target))
                texts.append(_without_examples(target.__doc__))
    return where, "\n".join(texts), own


def platforms(doc):
    """The platforms a docstring lists under "Supported Platforms", or None when it has no such section."""
    found = re.findall(r"Supported Platforms:\s*\n\s*((?:``\w+``\s*)+)", doc)
    if not found:
        return None
    return sorted({p for block in found for p in re.findall(r"``(\w+)``", block)})


_SECTION = re.compile(r"^(Args|Inputs|Outputs|Returns|Raises|Note|Notes|Supported Platforms|Examples|Tutorial Examples)"
                      r"\s*:|^\.\. (warning|note)::")


def documented_floats(doc):
    """The float dtypes the argument / input / raises sections name for Ascend, [] when they name none, or
    FLOATS when they say any number type will do. Lines about other platforms only ("GPU: ...") are left out."""
    names, section = set(), None
    for line in doc.splitlines():
        text = line.strip()
        header = _SECTION.match(text)
        if header:
            section = header.group(1) or "note"
        if section not in ("Args", "Inputs", "Raises"):
            continue
        platform = re.match(r"^-?\s*([A-Za-z/]+):", text)
        if platform and set(platform.group(1).split("/")) <= {"GPU", "CPU"}:
            continue
        if re.search(r"all (Number|number) types?|all types", text):
            return list(FLOATS)
        names.update(f for f in FLOATS if re.search(rf"\b{f}\b", text))
    return [f for f in FLOATS if f in names]


def _without_examples(doc):
    """A docstring without its examples (they name a dtype only to build a tensor), platforms kept."""
    head, _, tail = doc.partition("Examples:")
    platforms_part = tail[tail.find("Supported Platforms:"):] if "Supported Platforms:" in tail else ""
    return head + platforms_part


# ---------------------------------------------------------------------------------------------- the graphs
def ir_calls(path):
    """[(primitive, input dtypes)] of every primitive call in a MindSpore IR dump."""
    calls = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        m = _CALL.search(line)
        if not m:
            continue
        types = []
        if i + 1 < len(lines) and lines[i + 1].lstrip().startswith(":"):
            inputs = lines[i + 1].split("->")[0]
            types = [IR_DTYPES.get(t, t) for t in _TENSOR.findall(inputs)]
        calls.append((m.group(1), tuple(types)))
    return calls


def validate_ir(cell, args, folder):
    """Compile `cell` on `args` with IR dumps in `folder` and return the primitive calls of its validate stage.
    On this CPU the backend then refuses the Ascend kernels; the front end's result is what is read."""
    import mindspore as ms

    ms.set_context(save_graphs=1, save_graphs_path=folder)
    try:
        cell(*args)
    except (TypeError, RuntimeError, ValueError):
        pass  # kernel selection: bf16 / Ascend-only kernels have no CPU implementation
    finally:
        ms.set_context(save_graphs=0)
    files = [f for f in glob.glob(os.path.join(folder, "**", "*.ir"), recursive=True)
             if "_validate_" in os.path.basename(f)]
    if not files:
        raise RuntimeError(f"{type(cell).__name__}: the front end did not reach the validate stage")
    return ir_calls(max(files, key=os.path.getmtime))


def ascend_policies():
    """{name: policy}: what resolve_policy gives on Ascend for a bf16 model (flash attention), and with
    attn_implementation="eager"; stated directly because device_target is CPU here."""
    import mindspore as ms

    from mindone_qwen2vl.precision import PrecisionPolicy

    return {"flash": PrecisionPolicy(ms.bfloat16, ms.bfloat16, "flash_attention_2", "Ascend"),
            "eager": PrecisionPolicy(ms.bfloat16, ms.bfloat16, "eager", "Ascend")}


def tiny_model(model_type, policy):
    from mindone_qwen2vl.config import Qwen2VLConfig
    from mindone_qwen2vl.default_model import tiny_config
    from mindone_qwen2vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    # Head sizes of 16: multiples of 16, as the flash kernel requires and the real models' are.
    if model_type == "qwen2_vl":
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(tiny_config()), policy)
    if model_type == "qwen2_5_vl":
        from mindone_qwen2vl.config import Qwen2_5_VLConfig
        from mindone_qwen2vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

        config = tiny_config()
        config["model_type"] = "qwen2_5_vl"
        config["vision_config"] = dict(depth=2, hidden_size=32, out_hidden_size=config["hidden_size"],
                                       intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config), policy)
    raise ValueError(f"unknown model type {model_type!r}")


def step_arguments(step):
    """Placeholder inputs for a step with declared specs (dynamic dimensions as MindSpore placeholders)."""
    specs = step.specs()
    step.set_inputs(*specs)
    step.declared = True
    return specs


def graph_calls(model_type, policy, folder):
    """{step name: [(primitive, input dtypes)]} for every compiled step of a tiny model under `policy`."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from mindone_qwen2vl.generation import Runner

    ms.set_context(mode=ms.GRAPH_MODE)
    model = tiny_model(model_type, policy)
    runner = Runner(model, 2, 64)
    model.runners.by_shape[(2, 64)] = runner
    found = {}
    for name, step in model.graphs().items():
        if name.startswith("decode_layers."):
            continue  # the layer-wise decode runs on the CPU backend only (layerwise.allowed); same ops as decode.
        if name.startswith("decode."):
            args = tuple(Tensor(np.array([5, 6], np.int32)) for _ in range(3))
        else:
            args = step_arguments(step)
        found[name] = validate_ir(step, args, os.path.join(folder, name))
    return found


# ---------------------------------------------------------------------------------------------- the source
def source_ops():
    """{(module alias, name): [file:line]} of the MindSpore ops the package's source names (ops.X, mint.X, nn.X, P.X)."""
    found = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("ops", "mint", "nn", "P") and node.attr[0] != "_":
                if node.attr in NOT_SOURCE_OPS or node.attr in ("nn", "functional"):
                    continue
                found[(node.value.id, node.attr)].append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return found


# ---------------------------------------------------------------------------------------------- the check
def judge(prim, fed_floats=(), named_in_source=False, nn_cell=False):
    """(docs location, documented floats, verdict, problem or None) for one op fed `fed_floats` on Ascend."""
    where, doc, own = documentation(prim, nn_cell)
    plats = platforms(doc) if doc else None
    floats = documented_floats(doc) if doc else []
    given = sorted(fed_floats)
    if where is None:
        return "-", floats, "no documentation found", f"{prim}: no documentation in the installed MindSpore"
    if plats is not None and "Ascend" not in plats:
        return where, floats, f"NOT on Ascend ({', '.join(plats)})", f"{prim}: documented for {plats} only"
    if named_in_source and re.search(r"\bdeprecated\b", own):
        return where, floats, "deprecated", f"{prim}: deprecated in the installed MindSpore ({where})"
    if given and floats and not set(given) <= set(floats):
        missing = sorted(set(given) - set(floats))
        return (where, floats, f"fed {', '.join(missing)}; documents {', '.join(floats)}",
                f"{prim}: the Ascend policy feeds it {missing}, its docs list {floats}")
    return where, floats, "ok" if plats else "ok (no platform list: follows its functional docs)", None


def collect(model_types):
    """({primitive: float dtypes fed}, {primitive: where used}) over every Ascend configuration's graphs."""
    fed, used_in = collections.defaultdict(set), collections.defaultdict(set)
    with tempfile.TemporaryDirectory(prefix="ascend_ir_") as folder:
        for model_type in model_types:
            for config, policy in ascend_policies().items():
                steps = graph_calls(model_type, policy, os.path.join(folder, model_type, config))
                for step, calls in steps.items():
                    for prim, types in calls:
                        if prim not in NOT_OPS:
                            used_in[prim].add(f"{model_type}/{config}:{step}")
                            fed[prim].update(t for t in types if t in FLOATS)
    return fed, used_in


def check(model_types, verbose=False, out=None, collected=None):
    """Print the table; return the list of problems (empty: every op is documented for Ascend as fed).
    collected: collect(model_types)'s result, if already computed."""
    out = out or sys.stdout
    fed, used_in = collected or collect(model_types)
    named, in_nn = collections.defaultdict(list), set()
    for (alias, name), places in source_ops().items():
        named[name] += places
        if alias == "nn":
            in_nn.add(name)
    problems, rows = [], []
    for prim in sorted(set(used_in) | set(named)):
        where, floats, verdict, problem = judge(prim, fed.get(prim, ()), prim in named, prim in in_nn)
        if problem:
            problems.append(problem)
        rows.append((prim, where, ",".join(sorted(fed.get(prim, ()))) or "-", ",".join(floats) or "not listed",
                     verdict, sorted(used_in.get(prim, ())) + named.get(prim, [])))
    width = max(len(r[0]) for r in rows)
    print(f"{'op':<{width}}  {'Ascend policy feeds':<26} {'docs list':<36} verdict", file=out)
    for prim, where, given, floats, verdict, places in rows:
        print(f"{prim:<{width}}  {given:<26} {floats:<36} {verdict}", file=out)
        if verbose:
            print(f"{'':<{width}}  docs: {where}; used in: {', '.join(places[:6])}", file=out)
    print(f"{len(rows)} ops; {len(problems)} problems", file=out)
    for p in problems:
        print("  " + p, file=out)
    return problems


def available_models():
    return ["qwen2_vl", "qwen2_5_vl"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=available_models(),
                        help="model family to compile (default: every family the package has)")
    parser.add_argument("--verbose", action="store_true", help="where each op's docs are and where it is used")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    return 1 if check(args.model or available_models(), args.verbose) else 0


if __name__ == "__main__":
    sys.exit(main())
