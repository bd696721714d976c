"""A model whose layer weights hold NaN or Inf is refused by every pass with one clear error
(statistics and fits downstream of such a weight are not numbers), before anything runs; passes
used directly also skip such layers with a reason."""

import numpy as np
import pytest
from graphs import GraphBuilder
from onnx import numpy_helper

from onnxshrink import shrink
from onnxshrink.errors import InputError
from onnxshrink.registry import all_passes
from onnxshrink.validate import Tolerances


def _net(bad):
    """x(N,32) ─ Gemm 32→64 ─ Relu ─ Gemm 64→64 (one weight NaN/Inf) ─ Relu ─ Gemm 64→10 ─ y"""
    b = GraphBuilder(0)
    x = b.input("x", ["N", 32])
    h = b.relu(b.gemm(x, 32, 64))
    h = b.relu(b.gemm(h, 64, 64))
    b.gemm(h, 64, 10, out="y")
    b.output("y", ["N", 10])
    m = b.model()
    for t in m.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.shape == (64, 64):
            w = w.copy()
            w[3, 5] = bad
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return m


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("passes", sorted(all_passes()))
def test_every_pass_refuses_non_finite_weights(passes, bad):
    m = _net(bad)
    before = m.SerializeToString()
    calib = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    with pytest.raises(InputError, match=r"weight 'w_\d+' of Gemm node 'gemm_\d+' contains NaN or Inf") as e:
        shrink(m, passes, calibration=calib, force=True, tolerances=Tolerances(min_cosine=None))
    assert "\n" not in str(e.value) and passes in str(e.value)
    assert m.SerializeToString() == before


def test_pq_and_lowrank_skip_non_finite_layers_with_a_reason():
    import onnx_graphsurgeon as gs

    from onnxshrink.passes import _factor
    from onnxshrink.passes.lowrank import LowRankConfig, find_layers
    from onnxshrink.passes.pq import Pq, PqConfig
    m = _net(np.nan)
    g = gs.import_onnx(m)
    _, skipped = Pq()._scan(g, PqConfig())
    assert any("NaN or Inf" in s.reason for s in skipped)
    layers, _ = find_layers(g, _factor.shape_info(m, None), LowRankConfig(rank_multiple=1))
    bad = _factor.non_finite_skips(layers)
    assert [r for _, r in bad] == ["weights or bias contain NaN or Inf values: not factorized"]
