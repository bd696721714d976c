"""pq's fp16 storage of the constants it leaves float (``pq.float16``): the first Conv, small heads,
biases and slopes as fp16 + Cast where that saves bytes and the rounding is within HALF_ERROR."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from test_pq import FAST, _mlp_calib, _wide_mlp

from graphs import run
from onnxshrink import shrink
from onnxshrink.passes.pq.edits import HALF_ERROR, HALF_SUFFIX, half_error, store_half

# the two wide layers quantized, the 10-logit head (10 KiB) left float by pq.min_bytes
OPTS = dict(FAST, min_bytes=20000, max_error=0)


def test_the_weights_left_float_are_stored_as_fp16():
    """The head's 256 x 10 weight and the first Gemm's 256-wide bias (refit, float32) are written
    as fp16 and a Cast: 2 bytes a value fewer, less a Cast node each (the head's 10-wide bias would
    not save its Cast's bytes and stays float32); the outputs move by the rounding alone."""
    model, calib = _wide_mlp(), _mlp_calib()
    half = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": OPTS})
    full = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(OPTS, float16=False)})
    head = next(n for n in model.graph.node if n.name == "gemm_10")
    inits = {t.name: t for t in half.model.graph.initializer}
    assert inits[head.input[1] + HALF_SUFFIX].data_type == onnx.TensorProto.FLOAT16
    assert head.input[1] not in inits and inits[head.input[2]].data_type == onnx.TensorProto.FLOAT
    halves = [t for t in half.model.graph.initializer if t.name.endswith(HALF_SUFFIX)]
    assert sorted(int(np.prod(t.dims)) for t in halves) == [256, 2560]
    assert sum(n.op_type == "Cast" for n in half.model.graph.node) == \
        sum(n.op_type == "Cast" for n in full.model.graph.node) + 2
    saved = full.model.ByteSize() - half.model.ByteSize()
    assert 2 * 2816 - 2 * 100 < saved < 2 * 2816, saved   # 2816 values, 2 bytes each, less two Casts
    x = _mlp_calib(64, seed=5)
    a, b = run(full.model, x)[0], run(half.model, x)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3
    # a runtime folds the Cast: it holds the float32 values, as before
    mem = lambda r: r.report["passes"][0]["memory"]["runtime_weight_bytes"]["after"]   # noqa: E731
    assert mem(half) == mem(full)
    # fp32 codebooks keep every stored float in fp32
    fp32 = shrink(model, ["pq"], calibration=calib, force=True, options={"pq": dict(OPTS, codebook_dtype="fp32")})
    assert not any(t.name.endswith(HALF_SUFFIX) for t in fp32.model.graph.initializer)


def _graph(weights: dict):
    """x (N, 64) -> per named constant its reader (op, the constant as its second input) -> outputs."""
    x = gs.Variable("x", dtype=np.float32, shape=["N", 64])
    nodes, outs = [], []
    for name, (op, w) in weights.items():
        y = gs.Variable(name + "_y", dtype=np.float32)
        nodes.append(gs.Node(op, name + "_node", inputs=[x, gs.Constant(name, w)], outputs=[y]))
        outs.append(y)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outs, opset=17)


def test_store_half_keeps_float32_where_fp16_cannot_hold_it_or_saves_nothing():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    assert half_error(w) < 1e-7   # rounding alone: about 2^-24 relative
    big = np.full((64, 64), 1e5, np.float32)         # over fp16's largest value (65504)
    tiny = (w * 1e-6).astype(np.float32)             # most values under fp16's normal range
    assert half_error(big) == np.inf and half_error(tiny) > HALF_ERROR
    g = _graph({"w": ("MatMul", w), "big": ("MatMul", big), "tiny": ("MatMul", tiny),
                "one": ("Add", np.ones(1, np.float32)),        # 4 bytes: its Cast would cost more
                "scales": ("Resize", np.ones(64, np.float32))})   # a reader that reads shapes: kept
    held = store_half(g)
    kinds = {t.name: t.values.dtype for t in g.tensors().values() if isinstance(t, gs.Constant)}
    assert held == w.nbytes and kinds["w" + HALF_SUFFIX] == np.float16 and "w" not in kinds
    assert kinds["big"] == kinds["tiny"] == kinds["one"] == kinds["scales"] == np.float32
    # a budget tighter than fp16's rounding (pq.max_error) keeps it float32 too, so does a protected reader
    assert store_half(_graph({"w": ("MatMul", w)}), limit=1e-12) == 0
    assert store_half(_graph({"w": ("MatMul", w)}), kept={"w_node"}) == 0
