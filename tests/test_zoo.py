"""Every zoo model × every built pass (and the chain pfa,basisconv,pq once all three are built).

Invariants for each case: the result passes ``onnx.checker`` (full check), ONNX Runtime loads
and runs it at the calibration shapes and at another batch size (and another spatial size where
the model allows it), graph inputs/outputs keep their names, declared shapes and dtypes, it saves
and loads back, and the pass report either lists changed layers or names every candidate node it
skipped, each with a reason. Exact passes must also reproduce the original outputs.

A pass that fails on a zoo model is marked in ``KNOWN_FAILURES`` (strict xfail naming the node and
the error) so the gap stays visible and the mark is removed when it is fixed.
"""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxshrink
import zoo
from onnxshrink.graph import normalize
from onnxshrink.model_io import load_model
from onnxshrink.registry import all_passes, get_pass, make_config
from graphs import NO_NUMERIC_CHECKS
from zoo.conftest import *  # noqa: F401,F403  (the zoo fixtures)

CHAIN = "pfa,basisconv,pq"
EXACT = {"foldbn"}  # passes whose result must equal the original to float tolerance

# Settings for the tiny zoo models: fewer sampled positions (speed), and no rounding of kept
# channels / ranks to multiples of 8 with a lower energy, so that the passes really rewrite these
# 8–32-channel layers instead of keeping them whole. Only keys the pass's Config has are used.
FAST_OPTIONS = {
    "pfa": {"positions": 8, "channel_multiple": 1, "energy": 0.9},
    "basisconv": {"positions": 8, "channel_multiple": 1, "energy": 0.9},
    "lowrank": {"positions": 8, "rank_multiple": 1, "energy": 0.9},
}

# (pass or chain, zoo case) -> reason: a failure found by this matrix, xfail(strict=True).
KNOWN_FAILURES = {}


def built_passes():
    return sorted(all_passes())


def _pass_ids():
    return built_passes() + [CHAIN]


def _cases():
    for passes in _pass_ids():
        name = passes.values[0] if hasattr(passes, "values") else passes
        marks = list(passes.marks) if hasattr(passes, "marks") else []
        for case in zoo.ZOO_NAMES:
            m = list(marks)
            if (name, case) in KNOWN_FAILURES:
                m.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(name, case)]))
            yield pytest.param(name, case, marks=m, id=f"{name}-{case}")


def options_for(passes):
    out = {}
    for name in passes.split(","):
        fields = {f.name for f in dataclasses.fields(all_passes()[name].Config)}
        opts = {k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in fields}
        if opts:
            out[name] = opts
    return out


def io_signature(model, which):
    init = {t.name for t in model.graph.initializer}
    sig = []
    for vi in getattr(model.graph, which):
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        sig.append((vi.name, tt.elem_type, dims))
    return sig


def feeds_for(z, batch, seed=1, spatial=None):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in z.shapes.items():
        shape = tuple(shape)
        if spatial is not None and len(shape) == 3:
            shape = shape[:1] + spatial
        feeds[name] = rng.standard_normal((batch,) + shape).astype(np.float32)
    return feeds


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_report(passes, report, original):
    """Every skip has a node and a reason; a pass that changed nothing names, with a reason,
    every node its own ``plan`` would have touched."""
    assert [p["name"] for p in report["passes"]] == passes.split(",")
    for p in report["passes"]:
        for s in p["skipped"]:
            assert isinstance(s["reason"], str) and s["reason"].strip(), f"{p['name']}: skip without a reason: {s}"
            assert s["node"], f"{p['name']}: skip without a node name: {s}"
    first = report["passes"][0]
    if first["changed"]:
        return
    p = get_pass(first["name"])
    plan = p.plan(original, make_config(p, options_for(first["name"]).get(first["name"], {})))
    skipped = {s["node"] for s in first["skipped"]}
    missing = sorted(set(plan.nodes) - skipped)
    assert not missing, f"{first['name']} changed nothing and gave no reason for its planned targets {missing}"


@pytest.mark.parametrize("passes,case", list(_cases()))
def test_zoo_pass(passes, case, tmp_path):
    z = zoo.build(case)
    original = normalize(load_model(z.source(str(tmp_path))))
    result = onnxshrink.shrink(z.source(str(tmp_path)), passes, calibration=z.calibration(32),
                               options=options_for(passes), force=True, quiet=True,
                               tolerances=NO_NUMERIC_CHECKS)   # structure only: random weights at energy 0.9
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.report["validation"]["problems"] == []
    assert result.report["validation"]["tensorrt_unparseable"] == []  # every op a pass adds parses in TensorRT

    # graph interface unchanged: names, dtypes, declared shapes (dynamic dims stay dynamic)
    assert io_signature(out, "input") == io_signature(z.model, "input")
    assert io_signature(out, "output") == io_signature(z.model, "output")

    # runs at the calibration shapes, at another batch size, and at another spatial size if dynamic
    spatial_dynamic = any(not d.HasField("dim_value") for vi in z.model.graph.input
                          for d in list(vi.type.tensor_type.shape.dim)[1:])
    variants = [feeds_for(z, 2), feeds_for(z, 3, seed=2)]
    if spatial_dynamic:
        variants.append(feeds_for(z, 1, seed=3, spatial=(10, 14)))
    for feeds in variants:
        want, got = run(z.model, feeds), run(out, feeds)
        assert [w.shape for w in want] == [g.shape for g in got]
        assert all(np.isfinite(g).all() for g in got)
        assert all(w.dtype == g.dtype for w, g in zip(want, got))
        if passes in EXACT:
            for w, g in zip(want, got):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))

    check_report(passes, result.report, original)

    # the result saves (external data when the input had it) and loads back unchanged
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    result.save(str(path), external=z.external or None)
    back = load_model(str(path))
    assert io_signature(back, "output") == io_signature(out, "output")
    assert len(back.graph.initializer) == len(out.graph.initializer)
    if z.external and any(len(t.raw_data) >= 1024 for t in out.graph.initializer):
        assert (path.parent / "model.onnx.data").exists()


def test_zoo_covers_the_issue_patterns():
    """The zoo holds every pattern the issue lists (guards against a builder silently dropped)."""
    ops, opsets, dynamic_spatial = set(), set(), False
    for case in zoo.ZOO_NAMES:
        m = zoo.build(case).model
        ops |= {n.op_type for n in m.graph.node}
        opsets.add(m.opset_import[0].version)
    for op in ("Conv", "ConvTranspose", "BatchNormalization", "Clip", "HardSwish", "HardSigmoid", "Sigmoid",
               "Resize", "Concat", "Split", "MatMul", "Gemm", "LayerNormalization", "ReduceMean", "Softmax",
               "Erf", "Gelu", "Transpose", "Constant", "Identity", "GlobalAveragePool"):
        assert op in ops, op
    assert {11, 13, 17, 21} <= opsets
    assert any(zoo.build(c).external for c in zoo.ZOO_NAMES)
    for case in zoo.ZOO_NAMES:
        m = zoo.build(case).model
        dynamic_spatial |= any(d.dim_param for vi in m.graph.input for d in list(vi.type.tensor_type.shape.dim)[2:])
        # every model has a dynamic batch dim, so "another batch size" is meaningful
        assert all(vi.type.tensor_type.shape.dim[0].dim_param for vi in m.graph.input), case
    assert dynamic_spatial
    shared = zoo.build("shared_weights_op13").model
    uses = [i for n in shared.graph.node for i in n.input]
    assert uses.count("shared_w_1") == 2


def test_fixtures_give_fresh_copies(resnet_model, external_model, tmp_path):
    resnet_model.model.graph.node.pop()
    assert len(zoo.build("resnet_basic_op17").model.graph.node) == len(resnet_model.model.graph.node) + 1
    path = external_model.source(str(tmp_path))
    assert (tmp_path / "external_data_op17.onnx.data").exists()
    assert onnx.load(path, load_external_data=False).graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
