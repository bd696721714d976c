"""The architecture zoo: small graphs with the patterns real exporters emit (PyTorch, tf2onnx,
PaddlePaddle, Keras), random weights, built with onnx.helper.

Each builder returns a ``ZooModel``: the model plus the per-sample input shapes to calibrate with.
``ZOO`` maps a case name to a zero-argument builder; ``ZOO_NAMES`` is its sorted key list. Every
model has a dynamic batch dimension (so it can be run with another batch size), tiny channel counts
and small spatial sizes, so the zoo × passes matrix stays fast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphs import GraphBuilder


@dataclass
class ZooModel:
    name: str
    model: onnx.ModelProto
    shapes: dict                      # input name -> per-sample shape (batch axis left out)
    dtypes: dict = field(default_factory=dict)   # input name -> numpy dtype (default float32)
    external: bool = False            # save with external data and pass the path

    def calibration(self, n=32, seed=0):
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal((n,) + tuple(s)).astype(self.dtypes.get(k, np.float32))
                for k, s in self.shapes.items()}

    def source(self, folder):
        """What to give ``shrink``: the ModelProto, or a path (saved with external data)."""
        if not self.external:
            return self.model
        path = os.path.join(folder, f"{self.name}.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)  # save_model moves the weights out of the proto it is given
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{self.name}.onnx.data", size_threshold=0)
        return path


class ZooBuilder(GraphBuilder):
    """GraphBuilder with the opset-dependent spellings exporters use."""

    def __init__(self, seed=0, opset=17):
        super().__init__(seed, opset)

    def scalar(self, v, base="s"):
        return self.const(np.array(v, np.float32), base)

    def ints(self, v, base="i"):
        return self.const(np.array(v, np.int64), base)

    def constant_node(self, value, base="k"):
        """A Constant node (PaddlePaddle / older exporters keep weights this way)."""
        return self.node("Constant", [], value=numpy_helper.from_array(np.asarray(value), self.name(base)))

    def relu6(self, x, style="inputs"):
        if style == "constant":
            lo, hi = self.constant_node(np.float32(0.0)), self.constant_node(np.float32(6.0))
        else:
            lo, hi = self.scalar(0.0), self.scalar(6.0)
        return self.node("Clip", [x, lo, hi])

    def hardswish(self, x):
        if self.opset >= 14:
            return self.node("HardSwish", [x])
        return self.node("Mul", [x, self.node("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)])

    def gap(self, x):
        return self.node("GlobalAveragePool", [x])

    def flatten(self, x):
        return self.node("Flatten", [x], axis=1)

    def add(self, a, b):
        return self.node("Add", [a, b])

    def concat(self, xs, axis=1):
        return self.node("Concat", list(xs), axis=axis)

    def split(self, x, sizes, axis=1):
        if self.opset >= 13:
            return self.node("Split", [x, self.ints(sizes)], n_out=len(sizes), axis=axis)
        return self.node("Split", [x], n_out=len(sizes), axis=axis, split=list(sizes))

    def reduce_mean(self, x, axes, keepdims=1):
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints(axes)], keepdims=keepdims)
        return self.node("ReduceMean", [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x, axes):
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.ints(axes)])
        return self.node("Unsqueeze", [x], axes=list(axes))

    def resize2x(self, x):
        scales = self.const(np.array([1, 1, 2, 2], np.float32), "scales")
        roi = self.const(np.zeros(0, np.float32), "roi") if self.opset < 13 else ""
        return self.node("Resize", [x, roi, scales], mode="nearest")

    def conv_transpose(self, x, c_in, c_out, k=2, stride=2, bias=True):
        w = (self.rng.standard_normal((c_in, c_out, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
        ins = [x, self.const(w, "w")]
        if bias:
            ins.append(self.const(0.1 * self.rng.standard_normal(c_out).astype(np.float32), "b"))
        return self.node("ConvTranspose", ins, kernel_shape=[k, k], strides=[stride, stride])

    def conv_bn_act(self, x, c_in, c_out, k=3, stride=1, group=1, act="relu"):
        h = self.bn(self.conv(x, c_in, c_out, k, stride=stride, group=group, bias=False), c_out)
        if act == "relu":
            return self.relu(h)
        if act == "relu6":
            return self.relu6(h)
        if act == "hswish":
            return self.hardswish(h)
        return h

    def finish(self, name, shapes, **kw):
        return ZooModel(name, self.model(ir_version=_ir_for(self.opset)), shapes, **kw)


def _ir_for(opset):
    return {11: 6, 13: 7, 17: 8}.get(opset, 10 if opset >= 21 else 8)


# ----------------------------------------------------------------------------- CNN families
def resnet_basic(opset=17):
    """ResNet basic blocks (PyTorch export, BN unfused), the second with a projection shortcut.

        x ─ Conv3x3 ─ BN ─ Relu ─┬─ Conv3x3 ─ BN ─ Relu ─ Conv3x3 ─ BN ─ Add ─ Relu ─┐
                                 └──────────────────────────────────────┘            │
        ┌────────────────────────────────────────────────────────────────────────────┘
        ├─ Conv3x3/s2 ─ BN ─ Relu ─ Conv3x3 ─ BN ─┐
        └─ Conv1x1/s2 ─ BN ───────────────────────Add ─ Relu ─ GAP ─ Flatten ─ Gemm ─ logits
    """
    b = ZooBuilder(1, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.conv_bn_act(x, 3, 8)
    r = b.conv_bn_act(h, 8, 8)
    h = b.relu(b.add(b.conv_bn_act(r, 8, 8, act=None), h))
    r = b.conv_bn_act(h, 8, 16, stride=2)
    r = b.conv_bn_act(r, 16, 16, act=None)
    s = b.conv_bn_act(h, 8, 16, k=1, stride=2, act=None)
    h = b.relu(b.add(r, s))
    b.gemm(b.flatten(b.gap(h)), 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"resnet_basic_op{opset}", {"input": (3, 8, 8)})


def resnet_bottleneck(opset=13):
    """ResNet bottleneck block with a projection shortcut, then an identity bottleneck.

        x ─ Conv ─ BN ─ Relu ─┬─ Conv1x1 ─ BN ─ Relu ─ Conv3x3/s2 ─ BN ─ Relu ─ Conv1x1 ─ BN ─┐
                              └─ Conv1x1/s2 ─ BN ─────────────────────────────────────────── Add ─ Relu ─┐
        ┌────────────────────────────────────────────────────────────────────────────────────────────────┘
        ├─ Conv1x1 ─ BN ─ Relu ─ Conv3x3 ─ BN ─ Relu ─ Conv1x1 ─ BN ─┐
        └─────────────────────────────────────────────────────────── Add ─ Relu ─ GAP ─ Flatten ─ Gemm
    """
    b = ZooBuilder(2, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.conv_bn_act(x, 3, 8)
    r = b.conv_bn_act(h, 8, 4, k=1)
    r = b.conv_bn_act(r, 4, 4, stride=2)
    r = b.conv_bn_act(r, 4, 16, k=1, act=None)
    s = b.conv_bn_act(h, 8, 16, k=1, stride=2, act=None)
    h = b.relu(b.add(r, s))
    r = b.conv_bn_act(h, 16, 4, k=1)
    r = b.conv_bn_act(r, 4, 4)
    r = b.conv_bn_act(r, 4, 16, k=1, act=None)
    h = b.relu(b.add(r, h))
    b.gemm(b.flatten(b.gap(h)), 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"resnet_bottleneck_op{opset}", {"input": (3, 8, 8)})


def _inverted_residual(b, x, c_in, c_out, expand, stride, clip_style):
    hid = c_in * expand
    h = b.conv_bn_act(x, c_in, hid, k=1, act="relu6")
    h = b.bn(b.conv(h, hid, hid, 3, stride=stride, group=hid, bias=False), hid)
    h = b.relu6(h, clip_style)
    h = b.conv_bn_act(h, hid, c_out, k=1, act=None)
    return b.add(h, x) if stride == 1 and c_in == c_out else h


def mobilenet_v2(opset=13, clip_style="inputs"):
    """MobileNetV2 inverted residuals: expand 1x1, depthwise 3x3, project 1x1 (linear), residual
    Add when shapes match. ReLU6 is Clip with min/max as initializer inputs (``inputs``) or as
    Constant-node outputs (``constant``).

        x ─ Conv/s2 ─ BN ─ Clip ─┬─ Conv1x1 ─ BN ─ Clip ─ DWConv3x3 ─ BN ─ Clip ─ Conv1x1 ─ BN ─ Add ─┐
                                 └─────────────────────────────────────────────────────────┘         │
        ┌─────────────────────────────────────────────────────────────────────────────────────────────┘
        └─ [same block, stride 2, 8→12, no residual] ─ Conv1x1 ─ Clip ─ GAP ─ Flatten ─ Gemm ─ logits
        Clip(x, min, max): min/max initializers (opset ≥ 11) or Constant nodes
    """
    b = ZooBuilder(3, opset)
    x = b.input("input", ["N", 3, 16, 16])
    h = b.relu6(b.bn(b.conv(x, 3, 8, stride=2, bias=False), 8), clip_style)
    h = _inverted_residual(b, h, 8, 8, 2, 1, clip_style)
    h = _inverted_residual(b, h, 8, 12, 2, 2, clip_style)
    h = b.relu6(b.conv(h, 12, 16, k=1), clip_style)
    b.gemm(b.flatten(b.gap(h)), 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"mobilenet_v2_{clip_style}_op{opset}", {"input": (3, 16, 16)})


def _se(b, x, c, r, style):
    s = b.gap(x)
    if style == "conv":
        s = b.relu(b.conv(s, c, c // r, k=1))
        s = b.node("HardSigmoid", [b.conv(s, c // r, c, k=1)], alpha=1.0 / 6, beta=0.5)
    else:  # Keras/TF-style: Flatten -> Dense -> Dense -> reshape back
        s = b.relu(b.gemm(b.flatten(s), c, c // r))
        s = b.node("Sigmoid", [b.gemm(s, c // r, c)])
        s = b.unsqueeze(s, [2, 3])
    return b.node("Mul", [x, s])


def mobilenet_v3(opset=17):
    """MobileNetV3 blocks with HardSwish (``HardSwish`` op at opset ≥ 14, x·HardSigmoid(x)
    before) and Squeeze-Excitation, once with 1x1 convs + HardSigmoid, once with Gemm + Sigmoid.

        x ─ Conv ─ BN ─ HSwish ─ Conv1x1 ─ BN ─ HSwish ─ DWConv ─ BN ─ HSwish ─┬─ Mul ─ Conv1x1 ─ BN ─ Add(x') ─┐
                                               SE: GAP ─ Conv1x1 ─ Relu ─ Conv1x1 ─ HardSigmoid ─┘               │
        ┌─────────────────────────────────────────────────────────────────────────────────────────────────────┘
        └─ DWConv ─ BN ─ HSwish ─┬─ Mul ─ Conv1x1 ─ GAP ─ Flatten ─ Gemm ─ HSwish ─ Gemm ─ logits
          SE: GAP ─ Flatten ─ Gemm ─ Relu ─ Gemm ─ Sigmoid ─ Unsqueeze ─┘
    """
    b = ZooBuilder(4, opset)
    x = b.input("input", ["N", 3, 16, 16])
    h0 = b.conv_bn_act(x, 3, 8, stride=2, act="hswish")
    h = b.conv_bn_act(h0, 8, 16, k=1, act="hswish")
    h = b.hardswish(b.bn(b.conv(h, 16, 16, 3, group=16, bias=False), 16))
    h = _se(b, h, 16, 4, "conv")
    h = b.add(b.conv_bn_act(h, 16, 8, k=1, act=None), h0)
    h = b.hardswish(b.bn(b.conv(h, 8, 8, 3, stride=2, group=8, bias=False), 8))
    h = _se(b, h, 8, 2, "gemm")
    h = b.conv(h, 8, 16, k=1)
    h = b.hardswish(b.gemm(b.flatten(b.gap(h)), 16, 16))
    b.gemm(h, 16, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"mobilenet_v3_op{opset}", {"input": (3, 16, 16)})


def densenet(opset=13):
    """DenseNet block: every layer's output is concatenated onto the running feature map,
    then a transition (BN ─ Relu ─ Conv1x1 ─ AveragePool).

        x ─ Conv ─ c0 ─┬──────────────────────┬────────────── Concat(c0,g1,g2) ─ BN ─ Relu ─ Conv1x1 ─ AvgPool ─┐
                       └ BN─Relu─Conv ─ g1 ─ Concat(c0,g1) ─ BN─Relu─Conv ─ g2 ┘                               │
        ┌──────────────────────────────────────────────────────────────────────────────────────────────────────┘
        └─ GAP ─ Flatten ─ Gemm ─ logits
    """
    b = ZooBuilder(5, opset)
    x = b.input("input", ["N", 3, 8, 8])
    feats = [b.conv(x, 3, 8)]
    c = 8
    for _ in range(3):
        cat = b.concat(feats) if len(feats) > 1 else feats[0]
        g = b.conv(b.relu(b.bn(cat, c)), c, 4)
        feats.append(g)
        c += 4
    h = b.relu(b.bn(b.concat(feats), c))
    h = b.conv(h, c, 8, k=1)
    h = b.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    b.gemm(b.flatten(b.gap(h)), 8, 10, out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"densenet_op{opset}", {"input": (3, 8, 8)})


def yolo_neck(opset=13):
    """YOLO-style neck/head: a backbone with two scales, top-down Resize + Concat, a Split of
    the head's channels and three graph outputs (two from one Split).

        x ─ Conv/s2 ─ p3 ─ Conv/s2 ─ p4 ─ Conv1x1 ─ Resize(2x) ─┐
                     │                 └─ Conv1x1 ───────────────│──────────── out_p4
                     └──────────────────────────────────── Concat ─ Conv ─ Conv1x1 ─ Split ─┬ box
                                                                                         └ cls ─ Sigmoid
    """
    b = ZooBuilder(6, opset)
    x = b.input("images", ["N", 3, 16, 16])
    p3 = b.node("LeakyRelu", [b.conv(x, 3, 8, stride=2)], alpha=0.1)
    p4 = b.node("LeakyRelu", [b.conv(p3, 8, 16, stride=2)], alpha=0.1)
    b.conv(p4, 16, 6, k=1, out="out_p4")
    up = b.resize2x(b.relu(b.conv(p4, 16, 8, k=1)))
    h = b.relu(b.conv(b.concat([p3, up]), 16, 8))
    box, cls = b.split(b.conv(h, 8, 7, k=1), [4, 3])
    b.node("Identity", [box], out="box")
    b.node("Sigmoid", [cls], out="cls")
    b.output("out_p4", ["N", 6, 4, 4])
    b.output("box", ["N", 4, 8, 8])
    b.output("cls", ["N", 3, 8, 8])
    return b.finish(f"yolo_neck_op{opset}", {"images": (3, 16, 16)})


def unet(opset=17):
    """UNet-style encoder/decoder with a ConvTranspose up-sampler and a skip Concat.

        x ─ Conv ─ Relu ─ e1 ─ MaxPool ─ Conv ─ Relu ─ ConvTranspose(2x) ─┐
                          └─────────────────────────────────────────── Concat ─ Conv ─ Relu ─ Conv1x1 ─ mask
    """
    b = ZooBuilder(7, opset)
    x = b.input("input", ["N", 1, 16, 16])
    e1 = b.relu(b.conv(x, 1, 8))
    h = b.node("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2])
    h = b.relu(b.conv(h, 8, 16))
    up = b.conv_transpose(h, 16, 8)
    h = b.relu(b.conv(b.concat([e1, up]), 16, 8))
    b.conv(h, 8, 2, k=1, out="mask")
    b.output("mask", ["N", 2, 16, 16])
    return b.finish(f"unet_op{opset}", {"input": (1, 16, 16)})


def audio_conv1d(opset=13):
    """Conv1d audio stack (speech / keyword-spotting style): 1-D convs with BN, a dilated conv,
    a strided conv, MaxPool1d, global average pool, a classifier.

        wave(N,1,64) ─ Conv1d(k5) ─ BN ─ Relu ─ Conv1d(k3,d2) ─ BN ─ Relu ─ MaxPool1d ─ Conv1d/s2 ─ Relu ─ GAP ─ Flatten ─ Gemm
    """
    b = ZooBuilder(8, opset)
    x = b.input("wave", ["N", 1, 64])
    h = b.relu(b.bn(b.conv(x, 1, 8, k=5, nd=1, bias=False), 8))
    h = b.relu(b.bn(b.conv(h, 8, 8, k=3, dilation=2, nd=1), 8))
    h = b.node("MaxPool", [h], kernel_shape=[2], strides=[2])
    h = b.relu(b.conv(h, 8, 16, k=3, stride=2, nd=1))
    b.gemm(b.flatten(b.gap(h)), 16, 5, out="logits")
    b.output("logits", ["N", 5])
    return b.finish(f"audio_conv1d_op{opset}", {"wave": (1, 64)})


def _layernorm(b, x, d, style):
    g = b.const((1 + 0.1 * b.rng.standard_normal(d)).astype(np.float32), "ln_g")
    beta = b.const((0.1 * b.rng.standard_normal(d)).astype(np.float32), "ln_b")
    if style == "op":
        return b.node("LayerNormalization", [x, g, beta], axis=-1, epsilon=1e-5)
    mu = b.reduce_mean(x, [-1])
    xc = b.node("Sub", [x, mu])
    var = b.reduce_mean(b.node("Pow", [xc, b.scalar(2.0)]), [-1])
    den = b.node("Sqrt", [b.add(var, b.scalar(1e-5))])
    return b.add(b.node("Mul", [b.node("Div", [xc, den]), g]), beta)


def _gelu(b, x, style):
    if style == "op":
        return b.node("Gelu", [x])
    e = b.node("Erf", [b.node("Div", [x, b.scalar(np.sqrt(2.0))])])
    return b.node("Mul", [b.node("Mul", [x, b.add(e, b.scalar(1.0))]), b.scalar(0.5)])


def _linear(b, x, d_in, d_out, left=False):
    """x @ W + b (PyTorch) or, with ``left``, (Wᵀ @ xᵀ)ᵀ: weights on the left of the MatMul."""
    if not left:
        return b.add(b.matmul(x, d_in, d_out), b.const(0.1 * b.rng.standard_normal(d_out).astype(np.float32), "bias"))
    w = (b.rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    xt = b.node("Transpose", [x], perm=[0, 2, 1])
    y = b.node("MatMul", [b.const(w, "w"), xt])
    return b.add(b.node("Transpose", [y], perm=[0, 2, 1]),
                 b.const(0.1 * b.rng.standard_normal(d_out).astype(np.float32), "bias"))


def transformer(opset=17, ln="op", gelu="erf"):
    """Transformer encoder layer (one head, T=8 tokens, d=16) + mean-pool classifier. MatMul with
    the weight on the right (x·W) and once on the left (W·xᵀ), bias as a separate Add,
    LayerNormalization (opset ≥ 17) or its decomposed ReduceMean/Sub/Pow/Sqrt/Div form, Softmax,
    Gelu as Erf (or the Gelu op at opset ≥ 20).

        x(N,8,16) ─┬─ Q=x·Wq+b ─┐
                   ├─ K=x·Wk+b ─ Transpose ─ MatMul ─ Mul(1/√d) ─ Softmax ─┐
                   └─ V=(Wv·xᵀ)ᵀ+b ───────────────────────────────────── MatMul ─ O·Wo+b ─ Add(x) ─ LN ─ h
        h ─ W1+b ─ Gelu ─ W2+b ─ Add(h) ─ LN ─ ReduceMean(tokens) ─ Gemm ─ logits
    """
    b = ZooBuilder(9, opset)
    d, t = 16, 8
    x = b.input("tokens", ["N", t, d])
    q = _linear(b, x, d, d)
    k = _linear(b, x, d, d)
    v = _linear(b, x, d, d, left=True)
    att = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 2, 1])])
    att = b.node("Softmax", [b.node("Mul", [att, b.scalar(1 / np.sqrt(d))])], axis=-1)
    o = _linear(b, b.node("MatMul", [att, v]), d, d)
    h = _layernorm(b, b.add(o, x), d, ln)
    f = _linear(b, _gelu(b, _linear(b, h, d, 32), gelu), 32, d)
    h = _layernorm(b, b.add(f, h), d, ln)
    pooled = b.reduce_mean(h, [1], keepdims=0)
    b.gemm(pooled, d, 4, out="logits")
    b.output("logits", ["N", 4])
    return b.finish(f"transformer_{ln}_{gelu}_op{opset}", {"tokens": (t, d)})


def keras_mlp(opset=13):
    """Keras/tf2onnx dense stack: MatMul + Add (no Gemm), Reshape with a shape constant, Relu,
    Softmax output.

        x(N,4,4) ─ Reshape(-1,16) ─ MatMul ─ Add ─ Relu ─ MatMul ─ Add ─ Relu ─ MatMul ─ Add ─ Softmax ─ probs
    """
    b = ZooBuilder(10, opset)
    x = b.input("dense_input", ["unk__0", 4, 4])
    h = b.node("Reshape", [x, b.ints([-1, 16])])
    for d_in, d_out in ((16, 32), (32, 32)):
        h = b.relu(b.add(b.matmul(h, d_in, d_out), b.const(0.1 * b.rng.standard_normal(d_out).astype(np.float32))))
    h = b.add(b.matmul(h, 32, 6), b.const(np.zeros(6, np.float32)))
    b.node("Softmax", [h], out="probs", axis=-1)
    b.output("probs", ["unk__0", 6])
    return b.finish(f"keras_mlp_op{opset}", {"dense_input": (4, 4)})


def nhwc_tf2onnx(opset=13):
    """tf2onnx NHWC export: the graph input and output are NHWC; every conv is wrapped in
    Transpose(NHWC→NCHW) … Transpose(NCHW→NHWC), with element-wise ops and a residual Add on
    the NHWC side, and a per-channel bias Add broadcasting on the last axis.

        x(N,8,8,3) ─ T ─ Conv ─ T ─ Relu ─┬─ T ─ Conv ─ T ─ Add(bias[C]) ─ Relu ─ Add ─ T ─ Conv1x1 ─ T ─ y(N,8,8,4)
                                          └────────────────────────────────────┘
    """
    b = ZooBuilder(11, opset)
    x = b.input("input_1", ["unk__6", 8, 8, 3])

    def conv_nhwc(h, c_in, c_out, k=3, bias=True):
        h = b.node("Transpose", [h], perm=[0, 3, 1, 2])
        h = b.conv(h, c_in, c_out, k, bias=bias)
        return b.node("Transpose", [h], perm=[0, 2, 3, 1])

    h = b.relu(conv_nhwc(x, 3, 8))
    r = b.add(conv_nhwc(h, 8, 8, bias=False), b.const(0.1 * b.rng.standard_normal(8).astype(np.float32)))
    h = b.add(b.relu(r), h)
    b.node("Identity", [conv_nhwc(h, 8, 4, k=1)], out="output_1")
    b.output("output_1", ["unk__6", 8, 8, 4])
    return b.finish(f"nhwc_tf2onnx_op{opset}", {"input_1": (8, 8, 3)})


def shared_weights(opset=13):
    """One weight initializer used by two Convs (weight tying) and one Gemm weight used twice.

        x ─ Conv(W) ─ Relu ─ Conv(W) ─ Relu ─ GAP ─ Flatten ─ Gemm(V) ─ Relu ─ Gemm(V) ─ logits
                 └── W is the same initializer ──┘                 └─ V is the same initializer ─┘
    """
    b = ZooBuilder(12, opset)
    x = b.input("input", ["N", 8, 8, 8])
    w = b.const((b.rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "shared_w")
    h = x
    for _ in range(2):
        h = b.relu(b.node("Conv", [h, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    v = b.const((b.rng.standard_normal((8, 8)) / 3).astype(np.float32), "shared_v")
    h = b.flatten(b.gap(h))
    h = b.relu(b.node("Gemm", [h, v], transB=1))
    b.node("Gemm", [h, v], out="logits", transB=1)
    b.output("logits", ["N", 8])
    return b.finish(f"shared_weights_op{opset}", {"input": (8, 8, 8)})


def constant_weights(opset=13):
    """PaddlePaddle-style: weights and biases come from Constant nodes, one weight through an
    Identity on an initializer, and a BN whose parameters are Constant nodes.

        x ─ Conv(Constant W, Constant b) ─ BN(Constant γ,β,μ,σ²) ─ Relu ─ Conv(Identity(W2)) ─ Relu ─ GAP ─ Flatten ─ Gemm(Constant) ─ logits
    """
    b = ZooBuilder(13, opset)
    x = b.input("x", ["N", 3, 8, 8])
    w1 = b.constant_node((b.rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32), "w")
    b1 = b.constant_node((0.1 * b.rng.standard_normal(8)).astype(np.float32), "b")
    h = b.node("Conv", [x, w1, b1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    r = b.rng
    bn = [b.constant_node(v.astype(np.float32), "bn") for v in
          (r.uniform(0.5, 1.5, 8), 0.1 * r.standard_normal(8), 0.1 * r.standard_normal(8), r.uniform(0.5, 1.5, 8))]
    h = b.relu(b.node("BatchNormalization", [h] + bn, epsilon=1e-5))
    w2 = b.node("Identity", [b.const((r.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w2")])
    h = b.relu(b.node("Conv", [h, w2], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    wg = b.constant_node((r.standard_normal((8, 10)) / 3).astype(np.float32), "wg")
    bg = b.constant_node(np.zeros(10, np.float32), "bg")
    b.node("Gemm", [b.flatten(b.gap(h)), wg, bg], out="logits")
    b.output("logits", ["N", 10])
    return b.finish(f"constant_weights_op{opset}", {"x": (3, 8, 8)})


def dynamic_spatial(opset=17):
    """Fully convolutional net with dynamic batch *and* spatial dims (N, 3, H, W); calibrated at
    12×12 and run at other sizes.

        x(N,3,H,W) ─ Conv ─ BN ─ Relu ─ Conv/s2 ─ BN ─ Relu ─ Conv1x1 ─ y(N,4,H/2,W/2)
    """
    b = ZooBuilder(14, opset)
    x = b.input("input", ["N", 3, "H", "W"])
    h = b.conv_bn_act(x, 3, 8)
    h = b.conv_bn_act(h, 8, 8, stride=2)
    b.conv(h, 8, 4, k=1, out="y")
    b.output("y", ["N", 4, None, None])
    return b.finish(f"dynamic_spatial_op{opset}", {"input": (3, 12, 12)})


def external_data(opset=17):
    """A conv net saved with external data (every tensor in ``NAME.onnx.data``), given to
    ``shrink`` as a path.

        x ─ Conv ─ BN ─ Relu ─ Conv ─ BN ─ Relu ─ GAP ─ Flatten ─ Gemm ─ logits   (weights in .data)
    """
    b = ZooBuilder(15, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.conv_bn_act(x, 3, 8)
    h = b.conv_bn_act(h, 8, 16, stride=2)
    b.gemm(b.flatten(b.gap(h)), 16, 10, out="logits")
    b.output("logits", ["N", 10])
    m = b.finish(f"external_data_op{opset}", {"input": (3, 8, 8)})
    m.external = True
    return m


def two_inputs(opset=13):
    """Two graph inputs (image + side features) fused late, two outputs.

        img ─ Conv ─ Relu ─ GAP ─ Flatten ─┐
        feat(N,6) ─ Gemm ─ Relu ─────────── Concat ─ Gemm ─ logits
                                             └────── Gemm ─ aux
    """
    b = ZooBuilder(16, opset)
    img = b.input("img", ["N", 3, 8, 8])
    feat = b.input("feat", ["N", 6])
    a = b.flatten(b.gap(b.relu(b.conv(img, 3, 8))))
    f = b.relu(b.gemm(feat, 6, 8))
    h = b.concat([a, f], axis=1)
    b.gemm(h, 16, 10, out="logits")
    b.gemm(h, 16, 2, out="aux")
    b.output("logits", ["N", 10])
    b.output("aux", ["N", 2])
    return b.finish(f"two_inputs_op{opset}", {"img": (3, 8, 8), "feat": (6,)})


def unrolled_lstm(opset=13, steps=4, d=32, hidden=32, classes=10):
    """A PyTorch LSTM cell traced over ``steps`` time steps (CRNN text-reader style): every step
    reads the same W_ih, W_hh, biases and output projection, so each weight is one initializer
    shared by several Gemm nodes. Step 0 has no recurrent Gemm (zero state folded by the tracer).

        x(N,T,D) ─ Gather(t) ─ Gemm(W_ih, b_ih) ─┐
        h_{t-1} ─────────────── Gemm(W_hh, b_hh) ─ Add ─ Split(4) ─ σ/σ/tanh/σ ─ c_t, h_t
        h_t ─ Gemm(W_out, b_out) ─ Unsqueeze ─ Concat over t ─ logits(N,T,C)
    """
    b = ZooBuilder(17, opset)
    x = b.input("input", ["N", steps, d])
    r = b.rng
    w_ih = b.const((r.standard_normal((4 * hidden, d)) / np.sqrt(d)).astype(np.float32), "lstm_w_ih")
    w_hh = b.const((r.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), "lstm_w_hh")
    b_ih = b.const((0.1 * r.standard_normal(4 * hidden)).astype(np.float32), "lstm_b_ih")
    b_hh = b.const((0.1 * r.standard_normal(4 * hidden)).astype(np.float32), "lstm_b_hh")
    w_out = b.const((r.standard_normal((classes, hidden)) / np.sqrt(hidden)).astype(np.float32), "fc_w")
    b_out = b.const((0.1 * r.standard_normal(classes)).astype(np.float32), "fc_b")
    h = c = None
    outs = []
    for t in range(steps):
        xt = b.node("Gather", [x, b.const(np.array(t, np.int64), "step")], axis=1)
        gates = b.node("Gemm", [xt, w_ih, b_ih], transB=1)
        if h is None:
            gates = b.add(gates, b_hh)
        else:
            gates = b.add(gates, b.node("Gemm", [h, w_hh, b_hh], transB=1))
        i, f, g, o = b.split(gates, [hidden] * 4)
        i, f, o = (b.node("Sigmoid", [v]) for v in (i, f, o))
        ig = b.node("Mul", [i, b.node("Tanh", [g])])
        c = ig if c is None else b.add(b.node("Mul", [f, c]), ig)
        h = b.node("Mul", [o, b.node("Tanh", [c])])
        outs.append(b.unsqueeze(b.node("Gemm", [h, w_out, b_out], transB=1), [1]))
    b.node("Concat", outs, out="logits", axis=1)
    b.output("logits", ["N", steps, classes])
    return b.finish(f"unrolled_lstm_op{opset}", {"input": (steps, d)})


ZOO = {}
for _fn, _kw in [
    (resnet_basic, {"opset": 11}), (resnet_basic, {"opset": 13}), (resnet_basic, {"opset": 17}),
    (resnet_basic, {"opset": 21}),
    (resnet_bottleneck, {"opset": 13}),
    (mobilenet_v2, {"opset": 11, "clip_style": "inputs"}), (mobilenet_v2, {"opset": 13, "clip_style": "constant"}),
    (mobilenet_v2, {"opset": 21, "clip_style": "inputs"}),
    (mobilenet_v3, {"opset": 13}), (mobilenet_v3, {"opset": 17}),
    (densenet, {"opset": 13}),
    (yolo_neck, {"opset": 11}), (yolo_neck, {"opset": 17}),
    (unet, {"opset": 17}),
    (audio_conv1d, {"opset": 13}),
    (transformer, {"opset": 17, "ln": "op", "gelu": "erf"}),
    (transformer, {"opset": 13, "ln": "decomposed", "gelu": "erf"}),
    (transformer, {"opset": 21, "ln": "decomposed", "gelu": "op"}),
    (keras_mlp, {"opset": 13}),
    (nhwc_tf2onnx, {"opset": 13}),
    (shared_weights, {"opset": 13}),
    (constant_weights, {"opset": 13}),
    (dynamic_spatial, {"opset": 17}),
    (external_data, {"opset": 17}),
    (two_inputs, {"opset": 13}),
    (unrolled_lstm, {"opset": 13}),
]:
    _builder = functools.partial(_fn, **_kw)
    ZOO[_builder().name] = _builder

ZOO_NAMES = sorted(ZOO)


@functools.lru_cache(maxsize=None)
def _cached(name):
    return ZOO[name]()


def build(name) -> ZooModel:
    """A fresh copy of a zoo model (built once, copied per call)."""
    z = _cached(name)
    m = onnx.ModelProto()
    m.CopyFrom(z.model)
    return ZooModel(z.name, m, dict(z.shapes), dict(z.dtypes), z.external)
