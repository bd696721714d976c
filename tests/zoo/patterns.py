"""Exporter patterns for the channel analysis and pfa: one small graph per pattern, written the way
PyTorch (TorchScript / dynamo), tf2onnx and PaddlePaddle write it, random weights.

``PATTERNS`` maps a case name to a zero-argument builder returning a ``ZooModel`` (see
``tests/zoo/__init__.py``). These are checked by ``tests/passes/test_pfa.py`` (exact masking
equivalence, pfa prune + refit) and not by the all-pass matrix of ``tests/test_zoo.py``.
"""

from __future__ import annotations

import functools

import numpy as np

from . import ZooBuilder


def _head(b, h, c, n_out=10):
    """GAP ─ Flatten ─ Gemm ─ logits (N, n_out)."""
    b.gemm(b.flatten(b.gap(h)), c, n_out, out="logits")
    b.output("logits", ["N", n_out])


def pad_spatial(opset=13, mode="constant"):
    """Pad on the spatial axes before an unpadded Conv (PyTorch ``padding_mode='reflect'``, TF
    ``SAME`` written as an explicit Pad). Pads as an input (opset ≥ 11) or attribute (< 11).

        x ─ Conv ─ BN ─ Relu ─ Pad(H, W) ─ Conv(pads 0) ─ Relu ─ Conv ─ Relu ─ GAP ─ Flatten ─ Gemm
    """
    b = ZooBuilder(21, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.conv_bn_act(x, 3, 8)
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    if opset >= 11:
        h = b.node("Pad", [h, b.ints(pads)], mode=mode)
    else:
        h = b.node("Pad", [h], mode=mode, pads=pads)
    h = b.relu(b.conv(h, 8, 8, pad=0))
    h = b.relu(b.conv(h, 8, 8))
    _head(b, h, 8)
    return b.finish(f"pad_spatial_{mode}_op{opset}", {"input": (3, 8, 8)})


def pad_channels(opset=13):
    """Constant Pad on the channel axis (zero channels added in front and behind), then a Conv:
    the pruned channels shift the consumer's columns, the padded ones stay.

        x ─ Conv(3→8) ─ Relu ─ Pad(C: 2 before, 4 after) ─ Conv(14→8) ─ Relu ─ GAP ─ Flatten ─ Gemm
    """
    b = ZooBuilder(22, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 8))
    h = b.node("Pad", [h, b.ints([0, 2, 0, 0, 0, 4, 0, 0]), b.scalar(0.0)], mode="constant")
    h = b.relu(b.conv(h, 14, 8))
    _head(b, h, 8)
    return b.finish(f"pad_channels_op{opset}", {"input": (3, 8, 8)})


def depthwise_chain(opset=13):
    """MobileNetV2 block without residual, as PyTorch writes it (BN unfused, ReLU6 = Clip with
    min/max inputs), then a grouped Conv (group 2 of 8) and a depthwise Conv with multiplier 2.

        x ─ Conv ─ Clip ─ Conv1x1(expand 8→16) ─ BN ─ Clip ─ DW3x3(group 16) ─ BN ─ Clip ─ Conv1x1(project 16→8) ─ BN
          ─ Conv3x3(group 2) ─ Relu ─ DW3x3(8→16, group 8) ─ Relu ─ GAP ─ Flatten ─ Gemm
    """
    b = ZooBuilder(23, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.relu6(b.conv(x, 3, 8))
    h = b.conv_bn_act(h, 8, 16, k=1, act="relu6")
    h = b.relu6(b.bn(b.conv(h, 16, 16, 3, group=16, bias=False), 16))
    h = b.conv_bn_act(h, 16, 8, k=1, act=None)
    h = b.relu(b.conv(h, 8, 8, group=2))
    h = b.relu(b.conv(h, 8, 16, group=8))
    _head(b, h, 16)
    return b.finish(f"depthwise_chain_op{opset}", {"input": (3, 8, 8)})


def squeeze_excitation(opset=13, style="conv"):
    """SE blocks: ``conv``: GlobalAveragePool ─ Conv1x1 ─ Relu ─ Conv1x1 ─ HardSigmoid (torchvision
    MobileNetV3); ``gemm``: ReduceMean(H, W, keepdims=0) ─ Gemm ─ Swish ─ Gemm ─ Sigmoid ─
    Unsqueeze (EfficientNet/Keras style); ``reshape``: GAP ─ Reshape(N, C) ─ MatMul+Add ─ Relu ─
    MatMul+Add ─ Sigmoid ─ Reshape(N, C, 1, 1) (PaddlePaddle style).

        x ─ Conv ─ BN ─ Relu ─ h ─┬────────────────── Mul ─ Conv ─ Relu ─ GAP ─ Flatten ─ Gemm
                                  └─ [SE: pool ─ fc ─ act ─ fc ─ gate] ─┘
    """
    b = ZooBuilder(24, opset)
    x = b.input("input", ["N", 3, 8, 8])
    c, r = 16, 4
    h = b.conv_bn_act(x, 3, c)
    if style == "conv":
        s = b.relu(b.conv(b.gap(h), c, r, k=1))
        s = b.node("HardSigmoid", [b.conv(s, r, c, k=1)], alpha=1.0 / 6, beta=0.5)
    elif style == "gemm":
        s = b.reduce_mean(h, [2, 3], keepdims=0)
        s = b.gemm(s, c, r)
        s = b.node("Mul", [s, b.node("Sigmoid", [s])])
        s = b.unsqueeze(b.node("Sigmoid", [b.gemm(s, r, c)]), [2, 3])
    else:
        s = b.node("Reshape", [b.gap(h), b.ints([-1, c])])
        s = b.relu(b.add(b.matmul(s, c, r), b.const(0.1 * b.rng.standard_normal(r).astype(np.float32), "b")))
        s = b.node("Sigmoid", [b.add(b.matmul(s, r, c), b.const(np.zeros(c, np.float32), "b"))])
        s = b.node("Reshape", [s, b.ints([-1, c, 1, 1])])
    h = b.node("Mul", [h, s])
    h = b.relu(b.conv(h, c, 8))
    _head(b, h, 8)
    return b.finish(f"squeeze_excitation_{style}_op{opset}", {"input": (3, 8, 8)})


def activations(opset=13):
    """Activations as exporters spell them: HardSwish decomposed (x · Clip(x + 3, 0, 6) / 6, the
    PyTorch export before opset 14), HardSigmoid, PRelu with a per-channel slope (C, 1, 1), Clip
    with min/max as initializer inputs, InstanceNormalization.

        x ─ Conv ─ HSwish(decomposed) ─ Conv ─ PRelu ─ Conv ─ InstanceNorm ─ Clip(0, 6) ─ Conv ─ HardSigmoid ─ GAP ─ Gemm
    """
    b = ZooBuilder(25, opset)
    x = b.input("input", ["N", 3, 8, 8])
    h = b.conv(x, 3, 8)
    g = b.node("Clip", [b.add(h, b.scalar(3.0)), b.scalar(0.0), b.scalar(6.0)])
    h = b.node("Div", [b.node("Mul", [h, g]), b.scalar(6.0)])
    h = b.conv(h, 8, 8)
    h = b.node("PRelu", [h, b.const((0.25 + 0.05 * b.rng.standard_normal((8, 1, 1))).astype(np.float32), "slope")])
    h = b.conv(h, 8, 8)
    h = b.node("InstanceNormalization", [h, b.const(b.rng.uniform(0.5, 1.5, 8).astype(np.float32), "in_s"),
                                         b.const((0.1 * b.rng.standard_normal(8)).astype(np.float32), "in_b")])
    h = b.relu6(h)
    h = b.node("HardSigmoid", [b.conv(h, 8, 8)], alpha=0.2, beta=0.5)
    _head(b, h, 8)
    return b.finish(f"activations_op{opset}", {"input": (3, 8, 8)})


def fpn_neck(opset=13, resize="scales"):
    """FPN/PAN neck: top-down Resize (scales, constant sizes, or Upsample at opset 9) and Concat,
    bottom-up strided Conv and Concat; a lateral tensor read by several consumers; a
    ConvTranspose up-sampler; Slice and Split on channels.

        x ─ Conv/s2 ─ c3 ─ Conv/s2 ─ c4 ─┬─ Conv1x1 ─ l4 ─ Resize(2x) ─┐
                     │                   │                 └──────────│─────────────────────────┐
                     └──────────── Concat(c3, up) ─ Conv ─ p3 ─┬─ Conv/s2 ─ Concat(·, l4) ─ Conv ─ p4 ─┐
                                                               └─ ConvTranspose(2x) ─ Slice(C 0:6) ─┐  │
        out3 = Conv1x1(Concat(p3, Split(ConvT)[0]))    out4 = Conv1x1(p4)                        ...
    """
    b = ZooBuilder(26, opset)
    x = b.input("images", ["N", 3, 16, 16])
    c3 = b.relu(b.conv(x, 3, 8, stride=2))                   # (8, 8, 8)
    c4 = b.relu(b.conv(c3, 8, 16, stride=2))                 # (16, 4, 4)
    l4 = b.relu(b.conv(c4, 16, 8, k=1))                      # (8, 4, 4), read by Resize and the PAN Concat
    if resize == "scales":
        up = b.resize2x(l4)
    elif resize == "sizes":   # PyTorch: sizes = Concat(Shape(x)[0:2], spatial sizes)
        nc = b.node("Slice", [b.node("Shape", [l4]), b.ints([0]), b.ints([2]), b.ints([0])])
        up = b.node("Resize", [l4, "", "", b.concat([nc, b.ints([8, 8])], axis=0)], mode="nearest")
    elif resize == "axes":    # opset ≥ 18: sizes for the spatial axes only
        up = b.node("Resize", [l4, "", "", b.ints([8, 8])], mode="nearest", axes=[2, 3])
    else:
        up = b.node("Upsample", [l4, b.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest")
    p3 = b.relu(b.conv(b.concat([c3, up]), 16, 8))           # (8, 8, 8)
    d3 = b.relu(b.conv(p3, 8, 8, stride=2))                  # (8, 4, 4)
    p4 = b.relu(b.conv(b.concat([d3, l4]), 16, 8))           # (8, 4, 4)
    t = b.relu(b.conv_transpose(p4, 8, 8))                   # (8, 8, 8)
    t1, t2 = b.split(t, [5, 3])
    sl = b.node("Slice", [p3, b.ints([0]), b.ints([6]), b.ints([1])])
    h3 = b.concat([sl, t1, b.relu(t2)])
    b.conv(h3, 14, 6, k=1, out="out3")
    b.conv(p4, 8, 6, k=1, out="out4")
    b.output("out3", ["N", 6, 8, 8])
    b.output("out4", ["N", 6, 4, 4])
    return b.finish(f"fpn_neck_{resize}_op{opset}", {"images": (3, 16, 16)})


def conv_transpose_decoder(opset=13):
    """Decoder: ConvTranspose whose input channels come from a Conv (consumer side), whose output
    channels feed a Conv (source side), then a depthwise ConvTranspose and a grouped one.

        x ─ Conv ─ Relu ─ ConvT(8→8, 2x) ─ Relu ─ ConvT(depthwise, 2x) ─ Conv ─ Relu ─ ConvT(group 2) ─ Conv ─ out
    """
    b = ZooBuilder(27, opset)
    x = b.input("input", ["N", 3, 4, 4])
    h = b.relu(b.conv(x, 3, 8))
    h = b.relu(b.conv_transpose(h, 8, 8))
    w = (b.rng.standard_normal((8, 1, 2, 2)) / 2).astype(np.float32)
    h = b.node("ConvTranspose", [h, b.const(w, "w"), b.const(np.zeros(8, np.float32), "b")],
               kernel_shape=[2, 2], strides=[2, 2], group=8)
    h = b.relu(b.conv(h, 8, 8))
    w = (b.rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32)
    h = b.node("ConvTranspose", [h, b.const(w, "w")], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    b.conv(b.relu(h), 8, 2, k=1, out="out")
    b.output("out", ["N", 2, 16, 16])
    return b.finish(f"conv_transpose_decoder_op{opset}", {"input": (3, 4, 4)})


def transformer_ffn(opset=17, style="dynamo"):
    """Transformer FFN blocks as the exporters write them. ``dynamo`` (torch.export): rows flattened
    around each Linear, ``Reshape(-1, d) ─ Gemm(transB) ─ Reshape(-1, T, f)``, LayerNormalization op,
    Gelu as Div/Erf/Add/Mul; ``torchscript``: MatMul + bias Add on (N, T, d), LayerNormalization
    decomposed into ReduceMean/Sub/Pow/Add/Sqrt/Div/Mul/Add.

        x(N,8,16) ─ LN ─ Linear(16→32) ─ Gelu(erf) ─ Linear(32→16) ─ Add(x) ─ LN ─ Linear(16→24) ─ Relu
                  ─ Linear(24→16) ─ ReduceMean(tokens) ─ Gemm ─ logits
    """
    from . import _gelu, _layernorm
    b = ZooBuilder(28, opset)
    t, d = 8, 16
    x = b.input("tokens", ["N", t, d])

    def linear(h, d_in, d_out):
        if style == "torchscript":
            return b.add(b.matmul(h, d_in, d_out), b.const(0.1 * b.rng.standard_normal(d_out).astype(np.float32), "b"))
        rows = b.node("Reshape", [h, b.ints([-1, d_in])])
        return b.node("Reshape", [b.gemm(rows, d_in, d_out), b.ints([-1, t, d_out])])

    ln = "op" if style == "dynamo" else "decomposed"
    h = _layernorm(b, x, d, ln)
    h = b.add(linear(_gelu(b, linear(h, d, 32), "erf"), 32, d), x)
    h = _layernorm(b, h, d, ln)
    h = linear(b.relu(linear(h, d, 24)), 24, d)
    b.gemm(b.reduce_mean(h, [1], keepdims=0), d, 4, out="logits")
    b.output("logits", ["N", 4])
    return b.finish(f"transformer_ffn_{style}_op{opset}", {"tokens": (t, d)})


def attention_heads(opset=17, weak_head=2, shape="constant"):
    """Multi-head self-attention as PyTorch writes it (4 heads of 4, T=8, d=16): Q/K/V as MatMul +
    bias Add, Reshape(-1, T, h, dh) with one shared shape constant, Transpose to (N, h, T, dh), K
    transposed to (N, h, dh, T), scaled scores, Softmax, the heads merged back by Transpose and
    Reshape(-1, T, d), output projection, residual Add, LayerNormalization. Head ``weak_head`` has
    V columns scaled by 0.02: it contributes little to the output. ``shape="computed"`` writes each
    Reshape's target as TorchScript exports of Hugging Face models do (ViT, BERT):
    ``Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [h, dh])`` (and
    ``[d]`` where the heads merge back), the head count in a constant input of the Concat.

        x ─┬─ Q ─ Reshape ─ Transpose ───────────── MatMul ─ Mul ─ Softmax ─┐
           ├─ K ─ Reshape ─ Transpose(0,2,3,1) ──────┘                      │
           ├─ V ─ Reshape ─ Transpose ───────────────────────────────── MatMul ─ Transpose ─ Reshape ─ O ─ Add ─ LN ─┐
           └───────────────────────────────────────────────────────────────────────────────────────────┘           │
        ReduceMean(tokens) ─ Gemm ─ logits ────────────────────────────────────────────────────────────────────────┘
    """
    b = ZooBuilder(29, opset)
    t, d, h = 8, 16, 4
    dh = d // h
    x = b.input("tokens", ["N", t, d])
    const_shape = b.ints([-1, t, h, dh], "heads_shape")

    def target(y, tail):
        """The Reshape target for ``y``: one shared constant, or computed from ``y``'s shape."""
        if shape == "constant":
            return const_shape if tail == "heads" else b.ints([-1, t, d])
        dims = [b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [y]), b.ints(i)], axis=0), b.ints([0])])
                for i in (0, 1)]
        return b.node("Concat", dims + [b.ints([h, dh] if tail == "heads" else [d])], axis=0)

    def split(y):
        return b.node("Reshape", [y, target(y, "heads")])

    def proj(scale=None):
        w = (b.rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        bias = (0.1 * b.rng.standard_normal(d)).astype(np.float32)
        if scale is not None:
            w[:, scale * dh:(scale + 1) * dh] *= 0.02
            bias[scale * dh:(scale + 1) * dh] *= 0.02
        return b.add(b.node("MatMul", [x, b.const(w, "w")]), b.const(bias, "b"))

    q = b.node("Transpose", [split(proj())], perm=[0, 2, 1, 3])
    k = b.node("Transpose", [split(proj())], perm=[0, 2, 3, 1])
    v = b.node("Transpose", [split(proj(weak_head))], perm=[0, 2, 1, 3])
    att = b.node("Softmax", [b.node("Mul", [b.node("MatMul", [q, k]), b.scalar(1 / np.sqrt(dh))])], axis=-1)
    o = b.node("Transpose", [b.node("MatMul", [att, v])], perm=[0, 2, 1, 3])
    o = b.node("Reshape", [o, target(o, "merge")])
    o = b.add(b.matmul(o, d, d), b.const(0.1 * b.rng.standard_normal(d).astype(np.float32), "b"))
    from . import _layernorm
    y = _layernorm(b, b.add(o, x), d, "op" if opset >= 17 else "decomposed")
    b.gemm(b.reduce_mean(y, [1], keepdims=0), d, 4, out="logits")
    b.output("logits", ["N", 4])
    name = "attention_heads" if shape == "constant" else f"attention_heads_{shape}"
    return b.finish(f"{name}_op{opset}", {"tokens": (t, d)})


def attention_packed_qkv(opset=17, weak_head=2, layers=2, style="unflatten"):
    """``nn.MultiheadAttention`` (sequence-first inside, as ``nn.TransformerEncoderLayer`` runs it)
    with its packed in_proj, written the way torch.dynamo exports it (the Khmer segmenter's
    graph, 4 heads of 4, T=8, d=16): one MatMul + bias for Q, K and V; ``Reshape(T, N, 3, d)`` whose
    target is a ``Concat`` of Shape-derived dims and constants (one Concat read by every layer),
    ``Unsqueeze(0) ─ Transpose(3,1,2,0,4) ─ Squeeze(-2)`` and a ``Gather`` per part;
    ``Reshape(T, N·h, dh)`` with ``N·h`` computed as ``Mul(N, h)`` (also read by the mask's Reshape),
    ``Transpose ─ Reshape(N, h, T, dh)``; K reshaped to ``(-1, T, dh)``, transposed and reshaped
    back to ``Shape(K)[:-2] ‖ (dh, T)`` (``Slice`` from INT64_MIN), both scaled by dh^-¼; a key bias
    computed from the input, expanded to the heads (``Expand`` by ``[1, h, 1, 1]``) and added to the
    scores; the heads merged by ``Transpose(2,0,1,3) ─ Reshape(T·N, d)``, out_proj as Gemm(transB),
    ``Reshape(T, N, d) ─ Transpose``, residual Add, LayerNormalization. Head ``weak_head`` of the
    first layer has its V columns scaled by 0.02. ``style="chunk"``: the parts taken by a Split in
    three on the last axis (``in_proj(x).chunk(3, -1)``, older PyTorch) instead. ``style="paddle"``:
    as Paddle2ONNX writes SVTR/ViT attention (the PP-OCRv4 recognizer), batch-first, the packed
    output reshaped straight into heads by ``Reshape(qkv, Concat([0], Cast(Shape(x)[1:2]), [3], [h],
    [dh]))``, ``Transpose(2,0,3,1,4)``, a ``Slice [k:k+1] ─ Squeeze(0)`` per part, Q scaled, K
    transposed, the heads merged by ``Transpose(0,2,1,3) ─ Reshape(0, T, d)``, out_proj as MatMul + Add.

        x(N,T,d) ─ Transpose ─ MatMul(d→3d) ─ Add ─ Reshape(T,N,3,d) ─ Unsqueeze ─ Transpose ─ Squeeze
          ─ Gather(0|1|2) ─ Reshape(T,N·h,dh) ─ Transpose ─ Reshape(N,h,T,dh) ─ scores(+mask) ─ Softmax
          ─ ·V ─ Transpose ─ Reshape(T·N,d) ─ Gemm ─ Reshape ─ Transpose ─ Add(x) ─ LN ─ … ─ Gemm ─ logits
    """
    from . import _layernorm
    b = ZooBuilder(30, opset)
    t, d, h = 8, 16, 4
    dh = d // h
    x = b.input("tokens", ["N", t, d])
    if style == "paddle":
        return _paddle_attention(b, x, t, d, h, opset, weak_head, layers)
    tdim = b.node("Shape", [x], start=1, end=2)
    ndim = b.node("Shape", [x], start=0, end=1)
    packed = b.node("Concat", [tdim, ndim, b.ints([3]), b.ints([d])], axis=0)
    nh = b.node("Reshape", [b.node("Mul", [b.node("Squeeze", [ndim]), b.ints(h)]), b.ints([-1])])
    per_head = b.node("Concat", [tdim, nh, b.ints([dh])], axis=0)
    batched = b.node("Concat", [ndim, b.ints([h]), tdim, b.ints([dh])], axis=0)
    rows = b.node("Reshape", [b.node("Mul", [b.node("Squeeze", [tdim]), b.node("Squeeze", [ndim])]), b.ints([-1])])
    merged = b.node("Concat", [rows, b.ints([d])], axis=0)
    back = b.node("Concat", [tdim, ndim, b.ints([d])], axis=0)
    scale = b.const(np.array([dh ** -0.25], np.float32), "scale")
    # a key bias computed from the input, broadcast over the heads as the padding mask is
    bias = b.node("Mul", [b.reduce_mean(x, [2], keepdims=0), b.scalar(0.5)])
    bias = b.node("Reshape", [bias, b.node("Concat", [ndim, b.ints([1]), b.ints([1]), tdim], axis=0)])
    bias = b.node("Expand", [bias, b.ints([1, h, 1, 1])])
    bias = b.node("Reshape", [bias, b.node("Concat", [nh, b.ints([1]), tdim], axis=0)])
    bias = b.node("Reshape", [bias, b.node("Concat", [ndim, b.ints([h]), b.ints([-1]), tdim], axis=0)])
    big = b.ints([np.iinfo(np.int64).max])
    y = x
    for layer in range(layers):
        w, bb = _packed_weights(b, d, dh, weak_head if layer == 0 else None)
        qkv = b.add(b.node("MatMul", [b.node("Transpose", [y], perm=[1, 0, 2]), b.const(w, "in_proj_w")]),
                    b.const(bb, "in_proj_b"))
        if style == "chunk":
            parts = b.split(qkv, [d, d, d], axis=-1)
        else:
            parts = b.node("Reshape", [qkv, packed], allowzero=1)
            parts = b.node("Squeeze", [b.node("Transpose", [b.unsqueeze(parts, [0])], perm=[3, 1, 2, 0, 4]), b.ints([-2])])
            parts = [b.node("Gather", [parts, b.ints(i)], axis=0) for i in range(3)]
        q, k, v = (b.node("Reshape", [b.node("Transpose", [b.node("Reshape", [p, per_head], allowzero=1)], perm=[1, 0, 2]),
                                     batched], allowzero=1) for p in parts)
        ks = b.node("Shape", [k])
        dims = lambda lo, hi: b.node("Slice", [ks, b.ints([lo]), hi])  # noqa: E731  Shape(K)[lo:hi]
        k = b.node("Reshape", [k, b.node("Concat", [b.ints([-1]), dims(-2, b.ints([-1])), dims(-1, big)], axis=0)])
        k = b.node("Transpose", [k], perm=[0, 2, 1])
        k = b.node("Reshape", [k, b.node("Concat", [dims(np.iinfo(np.int64).min, b.ints([-2])), dims(-1, big),
                                                     dims(-2, b.ints([-1]))], axis=0)])
        s = b.add(b.node("MatMul", [b.node("Mul", [q, scale]), b.node("Mul", [k, scale])]), bias)
        o = b.node("MatMul", [b.node("Softmax", [s], axis=-1), v])
        o = b.node("Reshape", [b.node("Transpose", [o], perm=[2, 0, 1, 3]), merged], allowzero=1)
        o = b.node("Transpose", [b.node("Reshape", [b.gemm(o, d, d), back], allowzero=1)], perm=[1, 0, 2])
        y = _layernorm(b, b.add(y, o), d, "op" if opset >= 17 else "decomposed")
    b.gemm(b.reduce_mean(y, [1], keepdims=0), d, 4, out="logits")
    b.output("logits", ["N", 4])
    name = "attention_packed_qkv" if style == "unflatten" else f"attention_packed_qkv_{style}"
    return b.finish(f"{name}_op{opset}", {"tokens": (t, d)})


def _packed_weights(b, d, dh, weak_head=None):
    """A packed Q/K/V projection's weight (d × 3d) and bias; head ``weak_head`` (if any) has its V
    columns scaled by 0.02."""
    w = (b.rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(np.float32)
    bb = (0.1 * b.rng.standard_normal(3 * d)).astype(np.float32)
    if weak_head is not None:
        cols = slice(2 * d + weak_head * dh, 2 * d + (weak_head + 1) * dh)
        w[:, cols] *= 0.02
        bb[cols] *= 0.02
    return w, bb


def _paddle_attention(b, x, t, d, h, opset, weak_head, layers):
    from . import _layernorm
    dh = d // h
    tlen = b.node("Cast", [b.node("Slice", [b.node("Cast", [b.node("Shape", [x])], to=6), b.ints([1]), b.ints([2]),
                                           b.ints([0]), b.ints([1])])], to=7)
    heads = b.node("Concat", [b.ints([0]), tlen, b.ints([3]), b.ints([h]), b.ints([dh])], axis=0)
    merge = b.node("Concat", [b.ints([0]), tlen, b.ints([d])], axis=0)
    y = x
    for layer in range(layers):
        w, bb = _packed_weights(b, d, dh, weak_head if layer == 0 else None)
        qkv = b.add(b.node("MatMul", [y, b.const(w, "qkv_w")]), b.const(bb, "qkv_b"))
        parts = b.node("Transpose", [b.node("Reshape", [qkv, heads])], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Squeeze", [b.node("Slice", [parts, b.ints([i]), b.ints([i + 1]), b.ints([0]), b.ints([1])]),
                                      b.ints([0])]) for i in range(3))
        s = b.node("MatMul", [b.node("Mul", [q, b.scalar(dh ** -0.5)]), b.node("Transpose", [k], perm=[0, 1, 3, 2])])
        o = b.node("MatMul", [b.node("Softmax", [s], axis=-1), v])
        o = b.node("Reshape", [b.node("Transpose", [o], perm=[0, 2, 1, 3]), merge])
        o = b.add(b.matmul(o, d, d), b.const(0.1 * b.rng.standard_normal(d).astype(np.float32), "b"))
        y = _layernorm(b, b.add(y, o), d, "op" if opset >= 17 else "decomposed")
    b.gemm(b.reduce_mean(y, [1], keepdims=0), d, 4, out="logits")
    b.output("logits", ["N", 4])
    return b.finish(f"attention_packed_qkv_paddle_op{opset}", {"tokens": (t, d)})


PATTERNS = {}
for _fn, _kw in [
    (pad_spatial, {"opset": 13}),
    (pad_spatial, {"opset": 18, "mode": "reflect"}),
    (pad_channels, {"opset": 13}),
    (depthwise_chain, {"opset": 13}),
    (squeeze_excitation, {"opset": 13, "style": "conv"}),
    (squeeze_excitation, {"opset": 13, "style": "gemm"}),
    (squeeze_excitation, {"opset": 17, "style": "reshape"}),
    (activations, {"opset": 13}),
    (fpn_neck, {"opset": 11, "resize": "scales"}),
    (fpn_neck, {"opset": 13, "resize": "sizes"}),
    (fpn_neck, {"opset": 18, "resize": "axes"}),
    (conv_transpose_decoder, {"opset": 13}),
    (transformer_ffn, {"opset": 17, "style": "dynamo"}),
    (transformer_ffn, {"opset": 13, "style": "torchscript"}),
    (attention_heads, {"opset": 17}),
    (attention_heads, {"opset": 14, "shape": "computed"}),
    (attention_packed_qkv, {"opset": 17}),
    (attention_packed_qkv, {"opset": 15, "style": "chunk"}),
    (attention_packed_qkv, {"opset": 13, "style": "paddle"}),
]:
    _builder = functools.partial(_fn, **_kw)
    PATTERNS[_builder().name] = _builder

PATTERN_NAMES = sorted(PATTERNS)
