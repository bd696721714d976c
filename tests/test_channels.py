"""Channel-coupling analysis on small hand-built graphs: one graph per pattern.

Exactness check: pruning channels R must give the same function as the original model in which
the consumers' input weights of R were zeroed by hand (so those channels contribute nothing).
That checks every offset (Concat, Split/Slice, H·W column blocks) independently of the analysis.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import GraphBuilder, assert_close, run
from onnxshrink.channels import analyze


def feeds(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.dim_value > 0 else n for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node(model, op, k=0):
    return [n for n in model.graph.node if n.op_type == op][k]


def zero_inputs(model, weight_name, axis, columns):
    """A copy of the model with the given input columns of a weight zeroed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == weight_name:
            a = numpy_helper.to_array(t).copy()
            idx = [slice(None)] * a.ndim
            idx[axis] = list(columns)
            a[tuple(idx)] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def group_of(an, model, op, k=0):
    return an.group_of(node(model, op, k).name)


def prune_dropping(an, model, g, drop):
    """The model with the channels ``drop`` of group ``g`` removed."""
    return an.prune(model, {g.index: [i for i in range(g.size) if i not in drop]})


def zero_consumer_inputs(model, consumers, columns, axis=1):
    """``zero_inputs`` applied to the weights of several consumer nodes."""
    for c in consumers:
        model = zero_inputs(model, c.input[1], axis, columns)
    return model


def test_conv_bn_relu_conv_prunes_bn_and_both_convs():
    b = GraphBuilder(0)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.relu(b.bn(b.conv(x, 3, 8), 8))
    y = b.conv(h, 8, 4, out="y")
    b.output(y)
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned and g.size == 8 and len(g.consumers) == 1
    drop = [1, 5, 6]
    p = prune_dropping(an, m, g, drop)
    w2 = node(m, "Conv", 1).input[1]
    assert_close(zero_inputs(m, w2, 1, drop), p, feeds(m))
    assert init(p, node(p, "Conv", 0).input[1]).shape == (5, 3, 3, 3)
    assert all(init(p, n).shape == (5,) for n in node(p, "BatchNormalization").input[1:])
    assert init(p, node(p, "Conv", 1).input[1]).shape == (4, 5, 3, 3)
    assert group_of(an, m, "Conv", 1).pinned  # reaches the graph output


@pytest.mark.parametrize("act", ["Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Tanh",
                                 "Dropout", "Identity"])
def test_elementwise_activations_pass_channels(act):
    b = GraphBuilder(1, opset=20)
    x = b.input("x", ["N", 2, 6, 6])
    h = b.conv(x, 2, 8)
    if act == "Clip":
        h = b.node("Clip", [h, b.const(np.float32(0)), b.const(np.float32(6))])
    else:
        h = b.node(act, [h])
    b.output(b.conv(h, 8, 3, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv")
    assert not g.pinned
    p = an.prune(m, {g.index: [0, 2, 4, 6]})
    assert run(p, feeds(m))[0].shape == (3, 3, 6, 6)
    assert init(p, node(p, "Conv", 1).input[1]).shape == (3, 4, 3, 3)


@pytest.mark.parametrize("op,shape", [("Mul", (1, 8, 1, 1)), ("Add", (8, 1, 1)), ("Sub", (1, 8, 1, 1)),
                                      ("Mul", ()), ("Div", (1,))])
def test_per_channel_constants_are_sliced(op, shape):
    b = GraphBuilder(2)
    x = b.input("x", ["N", 2, 5, 5])
    h = b.conv(x, 2, 8)
    c = b.const((np.arange(int(np.prod(shape)), dtype=np.float32) + 1).reshape(shape))
    h = b.relu(b.node(op, [h, c]))
    b.output(b.conv(h, 8, 3, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv")
    drop = [0, 3, 7]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_inputs(m, node(m, "Conv", 1).input[1], 1, drop), p, feeds(m))
    pc = init(p, node(p, op).input[1])
    assert pc.shape == (tuple(5 if d == 8 else d for d in shape) if shape else ())


def test_depthwise_conv_and_pooling_follow_channels():
    b = GraphBuilder(3)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8))
    h = b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.relu(b.conv(h, 8, 8, group=8))          # depthwise
    h = b.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.node("GlobalAveragePool", [h])
    h = b.node("Flatten", [h], axis=1)
    b.output(b.gemm(h, 8, 4, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned and [s.node for s in g.sources] == [node(m, "Conv", 0).name]
    drop = [2, 3]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_inputs(m, node(m, "Gemm").input[1], 1, drop), p, feeds(m))
    dw = node(p, "Conv", 1)
    assert [a.i for a in dw.attribute if a.name == "group"] == [6]
    assert init(p, dw.input[1]).shape == (6, 1, 3, 3)


def test_residual_add_ties_both_producers():
    b = GraphBuilder(4)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.relu(b.conv(x, 3, 8))
    r = b.conv(b.relu(b.conv(a, 8, 4)), 4, 8)
    s = b.relu(b.node("Add", [a, r]))
    b.output(b.conv(s, 8, 2, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert sorted(s.node for s in g.sources) == sorted([node(m, "Conv", 0).name, node(m, "Conv", 2).name])
    assert sorted(g.consumers) == sorted([node(m, "Conv", 1).name, node(m, "Conv", 3).name])
    drop = [4]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_consumer_inputs(m, [node(m, "Conv", 1), node(m, "Conv", 3)], drop), p, feeds(m))
    assert init(p, node(p, "Conv", 2).input[1]).shape == (7, 4, 3, 3)


def test_concat_offsets():
    b = GraphBuilder(5)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.relu(b.conv(x, 3, 4))
    c = b.relu(b.conv(x, 3, 6))
    h = b.node("Concat", [a, c], axis=1)
    b.output(b.conv(h, 10, 2, k=1, out="y"))
    m = b.model()
    an = analyze(m)
    ga, gc = group_of(an, m, "Conv", 0), group_of(an, m, "Conv", 1)
    assert ga.index != gc.index and not ga.pinned and not gc.pinned
    p = an.prune(m, {ga.index: [0, 2, 3], gc.index: [0, 1, 3, 5]})
    assert_close(zero_inputs(m, node(m, "Conv", 2).input[1], 1, [1, 4 + 2, 4 + 4]), p, feeds(m))
    assert init(p, node(p, "Conv", 2).input[1]).shape == (2, 7, 1, 1)


def test_split_and_slice_on_channels():
    b = GraphBuilder(6, opset=13)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.relu(b.conv(x, 3, 8))
    s1, s2 = b.node("Split", [h, b.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    sl = b.node("Slice", [h, b.const(np.array([2], np.int64)), b.const(np.array([6], np.int64)),
                          b.const(np.array([1], np.int64))])
    y1 = b.conv(s1, 3, 2, k=1, out="y1")
    y2 = b.conv(s2, 5, 2, k=1, out="y2")
    y3 = b.conv(sl, 4, 2, k=1, out="y3")
    for y in (y1, y2, y3):
        b.output(y)
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned
    drop = [1, 3, 6]
    p = prune_dropping(an, m, g, drop)
    z = zero_inputs(m, node(m, "Conv", 1).input[1], 1, [1])
    z = zero_inputs(z, node(m, "Conv", 2).input[1], 1, [3 - 3, 6 - 3])
    z = zero_inputs(z, node(m, "Conv", 3).input[1], 1, [3 - 2])
    assert_close(z, p, feeds(m))
    assert list(init(p, node(p, "Split").input[1])) == [2, 3]


@pytest.mark.parametrize("how", ["Flatten", "Reshape"])
def test_flatten_into_gemm_removes_hw_blocks(how):
    b = GraphBuilder(7)
    x = b.input("x", ["N", 2, 4, 4])
    h = b.relu(b.conv(x, 2, 6, stride=2))  # (N, 6, 2, 2)
    if how == "Flatten":
        h = b.node("Flatten", [h], axis=1)
    else:
        h = b.node("Reshape", [h, b.const(np.array([-1, 24], np.int64))])
    b.output(b.gemm(h, 24, 5, trans_b=0, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv")
    assert not g.pinned
    drop = [0, 4]
    p = an.prune(m, {g.index: [1, 2, 3, 5]})
    cols = [c * 4 + j for c in drop for j in range(4)]
    assert_close(zero_inputs(m, node(m, "Gemm").input[1], 0, cols), p, feeds(m))
    assert init(p, node(p, "Gemm").input[1]).shape == (16, 5)


def test_squeeze_excitation():
    b = GraphBuilder(8)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    s = b.node("GlobalAveragePool", [h])
    s = b.relu(b.conv(s, 8, 2, k=1))
    s = b.node("Sigmoid", [b.conv(s, 2, 8, k=1)])
    h = b.node("Mul", [h, s])
    b.output(b.conv(h, 8, 3, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert sorted(s.node for s in g.sources) == sorted([node(m, "Conv", 0).name, node(m, "Conv", 2).name])
    drop = [2, 7]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_consumer_inputs(m, [node(m, "Conv", 1), node(m, "Conv", 3)], drop), p, feeds(m))
    assert init(p, node(p, "Conv", 2).input[1]).shape == (6, 2, 1, 1)


def test_matmul_ffn_and_conv1d():
    b = GraphBuilder(9)
    x = b.input("x", ["N", 4, 6])
    h = b.node("Add", [b.matmul(x, 6, 16), b.const(np.ones(16, np.float32))])
    h = b.relu(h)
    b.output(b.node("Add", [b.matmul(h, 16, 6), b.const(np.ones(6, np.float32))], out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "MatMul", 0)
    assert not g.pinned and g.size == 16
    drop = [0, 1, 9]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_inputs(m, node(m, "MatMul", 1).input[1], 0, drop), p, feeds(m))

    b = GraphBuilder(10)
    x = b.input("x", ["N", 2, 12])
    h = b.relu(b.conv(x, 2, 8, nd=1))
    b.output(b.conv(h, 8, 3, nd=1, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv")
    p = an.prune(m, {g.index: [0, 1, 2, 3]})
    assert_close(zero_inputs(m, node(m, "Conv", 1).input[1], 1, [4, 5, 6, 7]), p, feeds(m))


def pinned_reasons(an, g):
    return " | ".join(f"{p.node}: {p.reason}" for p in g.pins)


@pytest.mark.parametrize("case", ["output", "unknown", "grouped", "reshape_heads", "layernorm", "softmax"])
def test_pinned_groups_are_left_whole(case):
    b = GraphBuilder(11, opset=17)
    x = b.input("x", ["N", 4, 4, 4])
    h = b.conv(x, 4, 8, group=2 if case == "grouped" else 1)
    if case == "output":
        b.output(h)
        h2 = b.conv(b.relu(h), 8, 2, out="y")
    elif case == "unknown":
        h2 = b.conv(b.node("LRN", [h], size=3), 8, 2, out="y")
    elif case == "grouped":
        h2 = b.conv(b.relu(h), 8, 2, out="y")
    elif case == "reshape_heads":
        r = b.node("Reshape", [h, b.const(np.array([0, 2, 4, 16], np.int64))])
        h2 = b.node("Reshape", [r, b.const(np.array([0, 8, 4, 4], np.int64))], out="y")
    elif case == "layernorm":
        t = b.node("Transpose", [h], perm=[0, 2, 3, 1])
        ln = b.node("LayerNormalization", [t, b.const(np.ones(8, np.float32)), b.const(np.zeros(8, np.float32))],
                    axis=-1)
        h2 = b.node("Transpose", [ln], perm=[0, 3, 1, 2], out="y")
    else:
        h2 = b.node("Softmax", [h], axis=1, out="y")
    b.output(h2)
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert g.pinned, case
    want = {"output": "graph output", "unknown": "LRN", "grouped": "grouped Conv", "reshape_heads": "Reshape",
            "layernorm": "LayerNormalization", "softmax": "Softmax"}[case]
    assert want in pinned_reasons(an, g)
    assert all(p.node for p in g.pins)
    p = an.prune(m, {g.index: [0, 1]})  # a pinned group is left whole
    assert_close(m, p, feeds(m))


def test_reference_models_groups():
    from onnxshrink.graph import normalize
    from models import digits
    m = normalize(onnx.load(digits.model_path("cnn_residual")))
    an = analyze(m)
    free = [g for g in an.groups if not g.pinned]
    assert len(free) == 10
    # the stem and the first block's projection form one residual group; the Concat branches two
    assert sorted(g.size for g in free if len(g.sources) == 2) == [16, 32, 48]
    m = normalize(onnx.load(digits.model_path("transformer")))
    an = analyze(m)
    assert sorted(g.size for g in an.groups if not g.pinned) == [4, 4, 256, 256]   # four heads per layer, two FFNs


def test_matmul_with_the_weight_on_the_left_pins_with_a_clear_reason():
    b = GraphBuilder(12)
    x = b.input("x", ["N", 16, 6])
    h = b.relu(b.matmul(x, 6, 12))                                          # (N, 16, 12)
    h = b.node("MatMul", [b.const(b.rng.standard_normal((10, 16)).astype(np.float32)), h])   # W @ h
    b.output(b.matmul(b.relu(h), 12, 4, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "MatMul", 0)
    assert g.pinned and "weight on the left" in pinned_reasons(an, g)
    p = an.prune(m, {g.index: [0, 1]})
    assert_close(m, p, feeds(m))


@pytest.mark.parametrize("opset,inputs", [(13, 1), (13, 2), (18, 1)])
def test_equal_split_on_channels_gets_explicit_sizes(opset, inputs):
    b = GraphBuilder(13, opset=opset)
    x = b.input("x", ["N", 3, 5, 5])
    h = b.relu(b.conv(x, 3, 8))
    attrs = {"num_outputs": 2} if opset >= 18 else {}
    s1, s2 = b.node("Split", [h, ""][:inputs], n_out=2, axis=1, **attrs)   # "": the omitted optional sizes
    b.output(b.node("Add", [b.conv(s1, 4, 2, k=1), b.conv(s2, 4, 2, k=1)], out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    drop = [1, 5, 6]
    p = prune_dropping(an, m, g, drop)
    z = zero_inputs(zero_inputs(m, node(m, "Conv", 1).input[1], 1, [1]), node(m, "Conv", 2).input[1], 1, [1, 2])
    assert_close(z, p, feeds(m))


def _branch(nodes, outputs, name):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, []) for o in outputs])


@pytest.mark.parametrize("kind", ["if", "nested_if", "loop"])
def test_a_tensor_read_inside_a_subgraph_pins_its_group(kind):
    """A branch that reads ``h`` through outer scope: pruning h's channels would change what the
    branch computes, and calibration/validation data that never takes the branch would not see it.

        x ─ Conv0 ─ Relu ─ h ─ Conv1 ─ y
        cond = ReduceMax(x) > 100 ─ If/Loop ─ z       (the body reads h: ReduceSum(h))
    """
    b = GraphBuilder(14, opset=17)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    b.output(b.conv(h, 8, 4, out="y"))
    cond = b.node("Greater", [b.node("ReduceMax", [x], keepdims=0), b.const(np.float32(100.0))])
    reads_h = [helper.make_node("ReduceSum", [h], ["t_sum"], keepdims=0, name="t_sum")]
    other = [helper.make_node("ReduceSum", [x], ["e_sum"], keepdims=0, name="e_sum")]
    if kind == "if":
        b.node("If", [cond], out="z", then_branch=_branch(reads_h, ["t_sum"], "then"),
               else_branch=_branch(other, ["e_sum"], "else"))
    elif kind == "nested_if":
        inner = helper.make_node("If", [cond], ["inner"], name="inner_if",
                                 then_branch=_branch(reads_h, ["t_sum"], "then2"),
                                 else_branch=_branch([helper.make_node("ReduceSum", [x], ["e2"], keepdims=0,
                                                                       name="e2")], ["e2"], "else2"))
        b.node("If", [cond], out="z", then_branch=_branch([inner], ["inner"], "then"),
               else_branch=_branch(other, ["e_sum"], "else"))
    else:
        body = helper.make_graph(
            reads_h + [helper.make_node("Add", ["v", "t_sum"], ["v_out"], name="acc"),
                       helper.make_node("Identity", ["c"], ["c_out"], name="keep_going")], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("c", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v", TensorProto.FLOAT, [])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])])
        b.node("Loop", [b.const(np.int64(1)), cond, b.const(np.float32(0))], out="z", body=body)
    b.output("z", [], TensorProto.FLOAT)
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert g.pinned, kind
    assert any("subgraph" in p.reason and h in p.reason for p in g.pins), pinned_reasons(an, g)
    p = an.prune(m, {g.index: [0, 1, 2]})
    big = {"x": 1000 * feeds(m)["x"]}                   # takes the branch that reads h
    assert run(m, big)[1].shape == ()
    assert_close(m, p, big)


@pytest.mark.parametrize("case", ["pad_attr_op10", "pad_input_op11", "pad_axes_op18", "upsample_op9",
                                  "resize_scales_op10", "resize_sizes_const", "clip_scalar_input"])
def test_spatial_ops_pass_channels(case):
    """x(1,3,6,6) ─ Conv(3→8) ─ Relu ─ [op] ─ Conv(8→4) ─ y: the op is transparent to channels."""
    opset = int(case.rsplit("op", 1)[1]) if "_op" in case else 13
    b = GraphBuilder(15, opset=opset)
    x = b.input("x", [1, 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    i64 = lambda v: b.const(np.array(v, np.int64))
    f32 = lambda v: b.const(np.array(v, np.float32))
    if case == "pad_attr_op10":
        h = b.node("Pad", [h], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="edge")
    elif case == "pad_input_op11":
        h = b.node("Pad", [h, i64([0, 0, 1, 1, 0, 0, 1, 1]), f32(0.5)], mode="constant")
    elif case == "pad_axes_op18":
        h = b.node("Pad", [h, i64([1, 1, 1, 1]), "", i64([2, -1])], mode="reflect")
    elif case == "upsample_op9":
        h = b.node("Upsample", [h, f32([1, 1, 2, 2])], mode="nearest")
    elif case == "resize_scales_op10":
        h = b.node("Resize", [h, f32([1, 1, 2, 2])], mode="nearest")
    elif case == "resize_sizes_const":
        h = b.node("Resize", [h, "", "", i64([1, 8, 12, 12])], mode="nearest")
    else:   # a per-sample scalar bound computed in the graph
        hi = b.node("ReduceMax", [x], keepdims=0)
        h = b.node("Clip", [h, f32(0.0), hi])
    b.output(b.conv(h, 8, 4, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned, pinned_reasons(an, g)
    drop = [1, 4, 5]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_inputs(m, node(m, "Conv", 1).input[1], 1, drop), p, feeds(m))
    if case == "resize_sizes_const":
        assert list(init(p, node(p, "Resize").input[3])) == [1, 5, 12, 12]


@pytest.mark.parametrize("case,want", [
    ("pad_reflect_channels", "Pad that copies"), ("resize_channel_scale", "scales the channel axis"),
    ("resize_sizes_computed", "computed sizes"),
    ("groupnorm", "GroupNormalization"), ("pad_computed", "Pad with computed pads")])
def test_ops_that_would_move_channels_pin_with_a_reason(case, want):
    b = GraphBuilder(16, opset=21 if case == "groupnorm" else 18)
    x = b.input("x", [1, 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    i64 = lambda v: b.const(np.array(v, np.int64))
    f32 = lambda v: b.const(np.array(v, np.float32))
    if case == "pad_reflect_channels":
        h = b.node("Pad", [h, i64([0, 1, 0, 0, 0, 1, 0, 0])], mode="reflect")
        c = 10
    elif case == "resize_channel_scale":
        h = b.node("Resize", [h, "", f32([1, 0.5, 1, 1])], mode="nearest")
        c = 4
    elif case == "resize_sizes_computed":
        sz = b.node("Concat", [i64([1, 8]), b.node("Slice", [b.node("Shape", [x]), i64([2]), i64([4])])], axis=0)
        h = b.node("Resize", [h, "", "", sz], mode="nearest")
        c = 8
    elif case == "groupnorm":
        h = b.node("GroupNormalization", [h, f32(np.ones(8)), f32(np.zeros(8))], num_groups=2)
        c = 8
    else:
        h = b.node("Pad", [h, b.node("Mul", [i64([0, 0, 1, 1, 0, 0, 1, 1]), i64(1)])])
        c = 8
    b.output(b.conv(h, c, 4, out="y"), [1, 4, 6, 6])
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert g.pinned and want in pinned_reasons(an, g), pinned_reasons(an, g)
    assert_close(m, an.prune(m, {g.index: [0, 1]}), feeds(m))


def test_constant_pad_on_channels_shifts_the_consumers_columns():
    """x ─ Conv(3→8) ─ Pad(C: 2 before, 3 after, value 1) ─ Conv(13→4): channels 2…9 of the Pad's
    output are the Conv's; the padded channels stay."""
    b = GraphBuilder(17, opset=13)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    h = b.node("Pad", [h, b.const(np.array([0, 2, 0, 0, 0, 3, 0, 0], np.int64)), b.const(np.float32(1.0))])
    b.output(b.conv(h, 13, 4, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned
    drop = [0, 6]
    p = prune_dropping(an, m, g, drop)
    assert_close(zero_inputs(m, node(m, "Conv", 1).input[1], 1, [2 + d for d in drop]), p, feeds(m))
    assert init(p, node(p, "Conv", 1).input[1]).shape == (4, 11, 3, 3)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_grouped_conv_loses_whole_groups(op):
    """x ─ Conv(3→8) ─ Relu ─ [op](8→12, group 4) ─ Relu ─ Conv(12→4) ─ y: group j of the grouped
    layer reads channels 2j, 2j+1 and writes 3j…3j+2; dropping groups 1 and 3 drops all of them."""
    b = GraphBuilder(18, opset=13)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.relu(b.conv(x, 3, 8))
    if op == "Conv":
        h = b.conv(h, 8, 12, group=4)
    else:
        w = b.rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3
        h = b.node("ConvTranspose", [h, b.const(w), b.const(b.rng.standard_normal(12).astype(np.float32))],
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4)
    b.output(b.conv(b.relu(h), 12, 4, out="y"))
    m = b.model()
    an = analyze(m)
    g = group_of(an, m, "Conv", 0)
    assert not g.pinned and g.size == 4
    p = an.prune(m, {g.index: [0, 2]})
    assert_close(zero_inputs(m, node(m, "Conv", 1 if op == "ConvTranspose" else 2).input[1], 1, [3, 4, 5, 9, 10, 11]),
                 p, feeds(m))
    assert init(p, node(p, "Conv", 0).input[1]).shape == (4, 3, 3, 3)
    grouped = node(p, op, 1 if op == "Conv" else 0)
    assert [a.i for a in grouped.attribute if a.name == "group"] == [2]
    assert init(p, grouped.input[1]).shape == ((6, 2, 3, 3) if op == "Conv" else (4, 3, 3, 3))


def test_packed_qkv_layers_sharing_their_shape_targets_lose_different_heads():
    """Two nn.MultiheadAttention layers with packed in_proj (torch.dynamo's graph) read the same
    Reshape-target Concats and head-count Mul: each in_proj is one group of 4 heads; pruning them to
    different counts gives each pruned layer its own copy of what it rewrites, gathers the shared mask
    to each layer's kept heads, and equals the original with the dropped heads' out_proj columns
    zeroed, at a batch (3) other than the analysis's (1) and unchanged when no head goes."""
    from zoo.patterns import PATTERNS
    from onnxshrink.graph import normalize
    z = PATTERNS["attention_packed_qkv_op17"]()
    m = normalize(z.model)
    an = analyze(m, z.shapes)
    heads = [g for g in an.groups if not g.pinned]
    assert [(g.size, g.sources[0].op) for g in heads] == [(4, "MatMul"), (4, "MatMul")], \
        [(g.name, g.size, g.pins) for g in an.groups]
    x = z.calibration(3, seed=1)
    assert_close(m, an.prune(m, {g.index: np.arange(4) for g in heads}), x, rtol=1e-6, atol=1e-6)
    keep = {heads[0].index: [0, 1, 3], heads[1].index: [2]}
    pruned = an.prune(m, keep)
    onnx.checker.check_model(pruned, full_check=True)
    masked = m
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"][:2]
    for g, gemm in zip(heads, gemms):
        dead = [c for h in range(4) if h not in keep[g.index] for c in range(4 * h, 4 * h + 4)]
        masked = zero_inputs(masked, gemm.input[1], 1, dead)          # out_proj W (d, d), transB=1
    assert_close(masked, pruned, x)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("Gather") - [n.op_type for n in m.graph.node].count("Gather") == 2   # one mask per layer
    for g in heads:
        w = next(init(pruned, n.input[1]) for n in pruned.graph.node if n.name == g.sources[0].node)
        assert w.shape == (16, 3 * 4 * len(keep[g.index]))


def test_channel_classes_are_the_connected_components_of_the_ties(rng):
    """``channels._UF``: ties recorded in any order give the classes a union-find gives, each named
    by its smallest member."""
    from onnxshrink.channels import _UF
    for trial in range(20):
        uf = _UF()
        n = int(rng.integers(1, 60))
        comps = uf.new(n)
        assert comps.tolist() == list(range(n))
        pairs = rng.integers(0, n, size=(int(rng.integers(0, 2 * n)), 2))
        parent = list(range(n))

        def find(a):
            while parent[a] != a:
                a = parent[a]
            return a
        for a, b in pairs:
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        for k in range(0, len(pairs), 3):   # ties come in arrays, as the analysis records them
            uf.tie(pairs[k:k + 3, 0], pairs[k:k + 3, 1])
        assert uf.roots().tolist() == [find(i) for i in range(n)]


def _paddle_bias(b, h, c):
    """A Conv's bias as Paddle2ONNX writes it: Add(conv, Reshape(b, [1, C, 1, 1]))."""
    bias = b.const((0.1 * b.rng.standard_normal(c)).astype(np.float32), "offset")
    return b.node("Add", [h, b.node("Reshape", [bias, b.const(np.array([1, c, 1, 1], np.int64), "shape")])])


def test_paddle_biases_and_cast_reshape_tails_are_folded_so_se_and_flatten_join_the_groups():
    """The PaddleOCR direction classifier's patterns: every Conv bias an ``Add(conv, Reshape(offset,
    [1, C, 1, 1]))`` (the SE's two Convs too) and the classifier's input ``Reshape(GAP, Concat(Shape(x)[0:1],
    Cast([C])))``. Normalising folds the Reshapes and the Cast of constant vectors into constants, so the
    block's channels (with the SE's outer ones) and the SE's inner width are groups, not pinned by operands
    computed at run time; a 2-D table read through a Reshape is not folded."""
    from onnxshrink.graph import normalize
    b = GraphBuilder(12)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.relu(_paddle_bias(b, b.conv(x, 3, 8, bias=False), 8))
    s = b.node("GlobalAveragePool", [h])
    s = b.relu(_paddle_bias(b, b.conv(s, 8, 4, k=1, bias=False), 4))
    s = b.node("HardSigmoid", [_paddle_bias(b, b.conv(s, 4, 8, k=1, bias=False), 8)], alpha=0.2, beta=0.5)
    h = b.node("Mul", [h, s])
    g = b.node("GlobalAveragePool", [h])
    n = b.node("Slice", [b.node("Cast", [b.node("Shape", [g])], to=TensorProto.INT32), b.const(np.array([0], np.int64)),
                         b.const(np.array([1], np.int64)), b.const(np.array([0], np.int64))])
    tail = b.node("Cast", [b.const(np.array([8], np.int32), "width")], to=TensorProto.INT64)
    flat = b.node("Reshape", [g, b.node("Concat", [b.node("Cast", [n], to=TensorProto.INT64), tail], axis=0)])
    table = b.node("Reshape", [b.const(np.ones((2, 4), np.float32), "table"), b.const(np.array([1, 8], np.int64))])
    b.output(b.node("Add", [b.matmul(flat, 8, 5), b.matmul(table, 8, 5)], out="y"))
    m = b.model()
    norm = normalize(m)
    ops = [n.op_type for n in norm.graph.node]
    assert ops.count("Reshape") == 2 and ops.count("Cast") == 2, ops   # the Flatten and the table stay
    assert_close(m, norm, feeds(m))
    an = analyze(norm)
    block = group_of(an, norm, "Conv", 0)
    inner = group_of(an, norm, "Conv", 1)
    assert not block.pinned and not inner.pinned, (block.pins, inner.pins)
    assert sorted(s.node for s in block.sources) == sorted([node(norm, "Conv", 0).name, node(norm, "Conv", 2).name])
    p = prune_dropping(an, norm, block, [1, 6])
    made = {o: n for n in norm.graph.node for o in n.output}
    mm = next(n for n in norm.graph.node if n.op_type == "MatMul" and made[n.input[0]].input[0] in made
              and made[made[n.input[0]].input[0]].op_type == "GlobalAveragePool")   # not the table's MatMul
    se = next(n for n in norm.graph.node if n.op_type == "Conv" and n.input[0] in made
              and made[n.input[0]].op_type == "GlobalAveragePool")
    assert sorted(init(p, n.input[1]).shape for n in p.graph.node if n.op_type == "MatMul") == [(6, 5), (8, 5)]
    masked = zero_inputs(zero_inputs(norm, se.input[1], 1, [1, 6]), mm.input[1], 0, [1, 6])
    assert_close(masked, p, feeds(m))


def test_rows_merged_into_features_as_jax2tf_writes_magika():
    """Magika's file-type classifier (JAX → TF → ONNX): a Dense (MatMul 16 → 8 + bias, tanh-GELU) on
    every byte position, ``Reshape(N, T, 8) → (N, T/4, 4·8)`` with a ``Cast(Concat(Shape(x)[0:1], [T/4],
    [32]))`` target (channel c is column 8j + c), a LayerNorm over the positions whose mean is broadcast
    back by ``Reshape`` and ``Expand`` to a shared ``Cast(Concat(…, [1], [32]))``, then ``Unsqueeze ─
    Transpose ─ Conv (k×1)``. The Dense's 8 channels are one group: pruning two of them removes 4 input
    channels each of the Conv and rewrites the targets' 32 (the shared one copied for its second reader),
    exactly as masking them."""
    b = GraphBuilder(21)
    x = b.input("x", ["N", 16, 16])
    h = b.node("Add", [b.matmul(x, 16, 8), b.const((0.1 * b.rng.standard_normal((1, 1, 8))).astype(np.float32))])
    h = b.node("Mul", [h, b.node("Tanh", [h])])
    n = b.node("Slice", [b.node("Cast", [b.node("Shape", [x])], to=TensorProto.INT32), b.const(np.array([0], np.int64)),
                         b.const(np.array([1], np.int64)), b.const(np.array([0], np.int64))])
    i32 = lambda v: b.const(np.array(v, np.int32))  # noqa: E731
    merged = b.node("Cast", [b.node("Concat", [n, i32([4]), i32([32])], axis=0)], to=TensorProto.INT64)
    per_feature = b.node("Cast", [b.node("Concat", [n, i32([1]), i32([32])], axis=0)], to=TensorProto.INT64)
    h = b.node("Reshape", [h, merged])
    mean = b.node("Mul", [b.node("ReduceSum", [h, b.const(np.array([1], np.int64))], keepdims=0),
                          b.const(np.array(0.25, np.float32))])
    mean = b.node("Expand", [b.node("Reshape", [mean, per_feature]), per_feature])
    h = b.node("Sub", [h, mean])
    h = b.node("Transpose", [b.node("Unsqueeze", [h, b.const(np.array([3], np.int64))])], perm=[0, 2, 1, 3])
    w = (b.rng.standard_normal((12, 32, 3, 1)) / 10).astype(np.float32)
    h = b.relu(b.node("Conv", [h, b.const(w, "conv_w")], kernel_shape=[3, 1]))
    g = b.node("Flatten", [b.node("GlobalMaxPool", [h])], axis=1)
    b.output(b.gemm(g, 12, 4, out="y"))
    m = b.model()
    an = analyze(m)
    grp = group_of(an, m, "MatMul", 0)
    assert not grp.pinned and grp.size == 8, grp.pins
    p = prune_dropping(an, m, grp, [2, 5])
    assert init(p, node(p, "Conv", 0).input[1]).shape == (12, 24, 3, 1)
    cols = [j * 8 + c for j in range(4) for c in (2, 5)]
    assert_close(zero_inputs(m, node(m, "Conv", 0).input[1], 1, cols), p, feeds(m))
    tails = sorted(int(init(p, nd.input[2])[0]) for nd in p.graph.node if nd.op_type == "Concat")
    assert tails == [24, 24, 24], tails   # the merged target, the per-feature one and its copy for its second reader


def test_folded_constants_keep_their_rank():
    """A Constant node's scalar and a Squeeze of a one-element constant vector fold into 0-d
    initializers (not [1]): an Add of them to a 0-d input keeps a 0-d output."""
    from onnxshrink.graph import normalize
    nodes = [helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
             helper.make_node("Squeeze", ["v", "ax"], ["sq"]),
             helper.make_node("Add", ["x", "s"], ["a"]), helper.make_node("Add", ["a", "sq"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(np.array([3.0], np.float32), "v"),
                           numpy_helper.from_array(np.array([0], np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    norm = normalize(m)
    assert [n.op_type for n in norm.graph.node] == ["Add", "Add"]
    assert all(numpy_helper.to_array(t).ndim == 0 for t in norm.graph.initializer)
    out = run(norm, {"x": np.array(1.0, np.float32)})[0]
    assert out.shape == () and float(out) == 6.0
