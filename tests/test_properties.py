"""Property tests (hypothesis): random DAGs of conv / linear blocks with residual Adds and
Concats.

- any built pass on any such graph gives a model that passes the checker, runs in ONNX Runtime at
  two batch sizes, keeps the graph's inputs/outputs (names, shapes, dtypes), and gives every skip
  a reason;
- at full energy / rank (nothing may be dropped), each structural pass reproduces the original
  outputs to float tolerance.
"""

import dataclasses

import numpy as np
import onnx
import pytest
from graphs import NO_NUMERIC_CHECKS, GraphBuilder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxshrink
from onnxshrink.registry import all_passes
from test_zoo import feeds_for, io_signature, run

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Full energy / rank, no rounding, and rewrite even where it does not save: the result must be
# the same function. Keys a pass's Config lacks are dropped.
FULL = {
    "pfa": {"energy": 1.0, "channel_multiple": 1, "positions": 8},
    "basisconv": {"energy": 1.0, "channel_multiple": 1, "force": True, "positions": 8},
    "lowrank": {"energy": 1.0, "rank_multiple": 1, "force": True, "positions": 8},
}


def _opts(name, values):
    fields = {f.name for f in dataclasses.fields(all_passes()[name].Config)}
    return {k: v for k, v in values.items() if k in fields}


class Net:
    """A random net as the builder made it, with its calibration shapes."""

    def __init__(self, model, shapes):
        self.model, self.shapes = model, shapes

    def calibration(self, n=32, seed=0):
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal((n,) + s).astype(np.float32) for k, s in self.shapes.items()}


block = st.tuples(st.sampled_from(["conv", "conv1x1", "residual", "concat", "dwconv", "bn"]),
                  st.integers(2, 8), st.booleans())


@st.composite
def conv_dags(draw):
    """input(N,C,8,8) ─ [conv | 1x1 | residual block + Add | Concat with an earlier tensor |
    depthwise | Conv+BN]* ─ (GAP ─ Flatten ─ Gemm ─ logits | Conv1x1 ─ map)"""
    seed = draw(st.integers(0, 2**16))
    b = GraphBuilder(seed)
    c = draw(st.integers(1, 4))
    h = b.input("input", ["N", c, 8, 8])
    tensors = [(h, c)]
    for kind, width, act in draw(st.lists(block, min_size=1, max_size=5)):
        if kind == "conv":
            h, c = b.conv(h, c, width), width
        elif kind == "conv1x1":
            h, c = b.conv(h, c, width, k=1), width
        elif kind == "residual":
            r = b.relu(b.conv(h, c, width))
            h = b.node("Add", [b.conv(r, width, c), h])
        elif kind == "concat":
            other, oc = tensors[draw(st.integers(0, len(tensors) - 1))]
            h, c = b.node("Concat", [h, other], axis=1), c + oc
        elif kind == "dwconv":
            h = b.conv(h, c, c, group=c)
        else:
            h = b.bn(b.conv(h, c, width, bias=False), width)
            c = width
        if act:
            h = b.relu(h)
        tensors.append((h, c))
    if draw(st.booleans()):
        h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
        b.gemm(h, c, 5, out="logits")
        b.output("logits", ["N", 5])
    else:
        b.conv(h, c, 3, k=1, out="map")
        b.output("map", ["N", 3, 8, 8])
    return Net(b.model(), {"input": (c_in(b),) + (8, 8)})


def c_in(b):
    return b.inputs[0].type.tensor_type.shape.dim[1].dim_value


@st.composite
def linear_dags(draw):
    """x(N,d) ─ [Gemm | MatMul+Add | residual Gemm ─ Relu ─ Gemm + Add | Concat]* ─ Gemm ─ logits"""
    seed = draw(st.integers(0, 2**16))
    b = GraphBuilder(seed)
    d = draw(st.integers(2, 12))
    d0 = d
    h = b.input("x", ["N", d])
    tensors = [(h, d)]
    for kind, width, act in draw(st.lists(st.tuples(st.sampled_from(["gemm", "matmul", "residual", "concat"]),
                                                    st.integers(2, 16), st.booleans()), min_size=1, max_size=5)):
        if kind == "gemm":
            h, d = b.gemm(h, d, width, trans_b=int(act)), width
        elif kind == "matmul":
            h = b.node("Add", [b.matmul(h, d, width), b.const(np.zeros(width, np.float32))])
            d = width
        elif kind == "residual":
            h = b.node("Add", [b.gemm(b.relu(b.gemm(h, d, width)), width, d), h])
        else:
            other, od = tensors[draw(st.integers(0, len(tensors) - 1))]
            h, d = b.node("Concat", [h, other], axis=1), d + od
        if act:
            h = b.relu(h)
        tensors.append((h, d))
    b.gemm(h, d, 4, out="logits")
    b.output("logits", ["N", 4])
    return Net(b.model(), {"x": (d0,)})


dags = st.one_of(conv_dags(), linear_dags())


def _shrink(net, passes, options):
    return onnxshrink.shrink(net.model, passes, calibration=net.calibration(32), options=options, force=True,
                             quiet=True, tolerances=NO_NUMERIC_CHECKS)   # invariants of structure on random DAGs


def _built():
    return sorted(all_passes())


@SETTINGS
@given(net=dags, pass_index=st.integers(0, 63))
def test_any_pass_keeps_the_invariants(net, pass_index):
    built = _built()
    name = built[pass_index % len(built)]
    from test_zoo import FAST_OPTIONS
    result = _shrink(net, name, {name: _opts(name, FAST_OPTIONS.get(name, {}))} if name in FAST_OPTIONS else None)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert result.report["validation"]["problems"] == []
    assert io_signature(out, "input") == io_signature(net.model, "input")
    assert io_signature(out, "output") == io_signature(net.model, "output")
    for batch in (2, 5):
        feeds = feeds_for(net, batch, seed=batch)
        want, got = run(net.model, feeds), run(out, feeds)
        assert [w.shape for w in want] == [g.shape for g in got]
        assert all(np.isfinite(g).all() for g in got)
    for p in result.report["passes"]:
        assert all(s["node"] and s["reason"].strip() for s in p["skipped"])


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_energy_reproduces_the_original(name):
    assert name in all_passes()

    changed = []

    @SETTINGS
    @given(net=dags)
    def check(net):
        result = _shrink(net, name, {name: _opts(name, FULL[name])})
        changed.append(len(result.report["passes"][0]["changed"]))
        feeds = feeds_for(net, 3, seed=7)
        for w, g in zip(run(net.model, feeds), run(result.model, feeds)):
            assert w.shape == g.shape
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(w).max())))
    check()
    if "force" in _opts(name, FULL[name]):  # the factorizing passes really rewrote layers
        assert sum(changed) > 0, changed
    print(name, "layers changed per example:", changed)
