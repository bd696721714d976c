"""Train and export the digits reference models (development-only script).

Usage::

    pip install torch==2.13.0 && python models/build.py [name ...]

Trains the four reference models on scikit-learn's bundled digits data set
(see ``digits.py`` for the data recipe), exports each one to
``models/<name>.onnx`` (opset 17, float32, one input ``input`` with a dynamic
``batch`` dimension, one output ``logits`` of shape (batch, 10)) and writes
``models/<name>_calib.npz`` (key ``input``: the first 512 training images in
the model's layout).  Test accuracy is measured with onnxruntime on the
exported file.

This is the only file of the project that imports PyTorch.
"""

from __future__ import annotations

import collections
import io
import os
import random
import sys
import time
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import digits  # noqa: E402

OPSET = 17
SEED = 0
MAX_FILE_BYTES = 5 * 1024 * 1024


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def conv_bn_relu(cin, cout, k):
    return [
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class CnnPlain(nn.Module):
    """VGG-style: 9 x (Conv + BatchNorm + ReLU), MaxPool between stages,
    GlobalAveragePool and a Gemm head."""

    def __init__(self):
        super().__init__()
        layers = []
        layers += conv_bn_relu(1, 32, 3)
        layers += conv_bn_relu(32, 32, 3)
        layers += [nn.MaxPool2d(2)]  # 8x8 -> 4x4
        layers += conv_bn_relu(32, 64, 3)
        layers += conv_bn_relu(64, 64, 3)
        layers += conv_bn_relu(64, 64, 1)
        layers += [nn.MaxPool2d(2)]  # 4x4 -> 2x2
        layers += conv_bn_relu(64, 128, 3)
        layers += conv_bn_relu(128, 128, 3)
        layers += conv_bn_relu(128, 128, 3)
        layers += conv_bn_relu(128, 128, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def conv_bn_relu6(cin, cout, k, stride=1, groups=1, act=True):
    layers = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_shortcut = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_relu6(cin, hidden, 1),
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn_relu6(hidden, cout, 1, act=False),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_shortcut else y


class CnnResidual(nn.Module):
    """MobileNetV2-style residual CNN with a two-branch Concat and a
    Flatten -> Gemm head over a 64 x 2 x 2 map."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu6(1, 16, 3)  # 16 x 8 x 8
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 4),  # identity shortcut
            InvertedResidual(16, 32, 2, 4),  # -> 32 x 4 x 4
            InvertedResidual(32, 32, 1, 4),  # identity shortcut
            InvertedResidual(32, 48, 2, 4),  # -> 48 x 2 x 2
            InvertedResidual(48, 48, 1, 4),  # identity shortcut
        )
        # two branches concatenated on the channel axis
        self.branch_a = conv_bn_relu6(48, 32, 1)
        self.branch_b = nn.Sequential(
            conv_bn_relu6(48, 48, 3, groups=48),
            conv_bn_relu6(48, 32, 1),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)  # 64 x 2 x 2
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention written with matmul/softmax so that the
    export is plain MatMul/Add/Transpose/Reshape/Softmax."""

    def __init__(self, d, heads, tokens):
        super().__init__()
        self.d, self.heads, self.tokens = d, heads, tokens
        self.hd = d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.scale = 1.0 / float(self.hd) ** 0.5

    def split(self, x):  # (B, T, D) -> (B, H, T, hd)
        return x.reshape(-1, self.tokens, self.heads, self.hd).transpose(1, 2)

    def forward(self, x):
        q = self.split(self.q(x))
        k = self.split(self.k(x))
        v = self.split(self.v(x))
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(-1, self.tokens, self.d)
        return self.o(y)


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer."""

    def __init__(self, d, heads, ffn, tokens, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, tokens)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ffn)
        self.ff2 = nn.Linear(ffn, d)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        x = x + self.drop(self.ff2(self.act(self.ff1(self.ln2(x)))))
        return x


class Transformer(nn.Module):
    """8 tokens (image rows) of 8 features -> d=64, 2 pre-LN encoder layers,
    final LayerNorm, mean pooling over tokens, linear head."""

    def __init__(self, d=64, heads=4, ffn=256, layers=2, tokens=8, dropout=0.1):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            [EncoderLayer(d, heads, ffn, tokens, dropout) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):  # (B, 8, 8)
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        x = x.mean(dim=1)
        return self.head(x)


# name -> (constructor, training config)
CONFIGS = {
    "cnn_plain": (CnnPlain, dict(epochs=60, lr=2e-3, wd=5e-4, batch=64)),
    "cnn_residual": (CnnResidual, dict(epochs=80, lr=3e-3, wd=5e-4, batch=64)),
    "mlp": (Mlp, dict(epochs=60, lr=1e-3, wd=1e-4, batch=64)),
    "transformer": (Transformer, dict(epochs=150, lr=2e-3, wd=5e-2, batch=64)),
}
assert set(CONFIGS) == set(digits.MODELS)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_shift(x, gen):
    """Shift each (N, 8, 8) image by -1, 0 or +1 pixel in each axis (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            idx = torch.nonzero((dy == oy) & (dx == ox), as_tuple=True)[0]
            if idx.numel():
                out[idx] = padded[idx, oy : oy + 8, ox : ox + 8]
    return out


def train(name):
    ctor, cfg = CONFIGS[name]
    kind = digits.MODELS[name]
    seed_everything(SEED)
    model = ctor()
    split = digits.load_split()
    x_train = torch.from_numpy(split["x_train"])
    y_train = torch.from_numpy(split["y_train"])
    n = x_train.shape[0]
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    steps_per_epoch = (n + cfg["batch"] - 1) // cfg["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], epochs=cfg["epochs"], steps_per_epoch=steps_per_epoch,
        pct_start=0.15,
    )
    t0 = time.time()
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, n, cfg["batch"]):
            idx = perm[i : i + cfg["batch"]]
            xb = random_shift(x_train[idx], gen)
            xb = torch.from_numpy(digits.to_model_input(xb.numpy(), kind))
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        if (epoch + 1) % 10 == 0 or epoch == cfg["epochs"] - 1:
            print(
                f"  [{name}] epoch {epoch + 1:3d}/{cfg['epochs']}  "
                f"loss {loss_sum / total:.4f}  train-acc {correct / total:.4f}  "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Export and checks
# ---------------------------------------------------------------------------


def export(model, name):
    kind = digits.MODELS[name]
    example = torch.from_numpy(digits.calibration(kind, n=2))
    kwargs = {}
    if name == "cnn_plain":
        # TrainingMode.PRESERVE (with the model in eval mode) keeps the
        # BatchNormalization nodes unfused (inference-mode BN, training_mode=0).
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Expected: the legacy (TorchScript) exporter is deprecated, and it
        # warns about constant folding under TrainingMode.PRESERVE even though
        # the model is in eval mode (nothing trainable is folded).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding.*")
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
            export_params=True,
            **kwargs,
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "onnxshrink-models"
    m.doc_string = f"digits reference model '{name}' (input layout '{kind}')"
    # Drop the legacy exporter's per-node doc strings (source locations).
    for node in m.graph.node:
        node.doc_string = ""
    return m


def check(m, name):
    kind = digits.MODELS[name]
    onnx.checker.check_model(m, full_check=True)
    g = m.graph
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets.get("", None) == OPSET and set(opsets) <= {"", "ai.onnx"}, opsets
    assert all(n.domain in ("", "ai.onnx") for n in g.node), "non-standard op"
    assert [i.name for i in g.input] == ["input"], [i.name for i in g.input]
    assert [o.name for o in g.output] == ["logits"], [o.name for o in g.output]
    in_dims = g.input[0].type.tensor_type.shape.dim
    out_dims = g.output[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch", in_dims[0]
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 10, out_dims
    want = {"cnn": [1, 8, 8], "mlp": [64], "seq": [8, 8]}[kind]
    assert [d.dim_value for d in in_dims[1:]] == want, in_dims
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for init in g.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64):
            raise AssertionError(f"unexpected initializer type {init.name}")
    ops = collections.Counter(n.op_type for n in g.node)
    if name == "cnn_plain":
        assert ops["BatchNormalization"] == ops["Conv"] > 0, ops
        assert ops["MaxPool"] > 0 and ops["GlobalAveragePool"] == 1, ops
    if name == "cnn_residual":
        groups = [
            next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in g.node if n.op_type == "Conv"
        ]
        assert max(groups) > 1, "no depthwise conv"
        assert ops["Clip"] > 0 and ops["Add"] > 0 and ops["Concat"] > 0, ops
        assert ops["Flatten"] == 1 and ops["Gemm"] == 1, ops
    if name == "mlp":
        assert ops["Gemm"] == 3, ops
    if name == "transformer":
        assert ops["LayerNormalization"] == 5 and ops["Softmax"] == 2, ops
        assert ops["MatMul"] > 0 and ops.get("Gemm", 0) <= 1, ops
    return ops


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def main(argv):
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    names = argv or list(digits.MODELS)
    unknown = set(names) - set(digits.MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s): {sorted(unknown)}")
    results = []
    t_all = time.time()
    for name in names:
        kind = digits.MODELS[name]
        print(f"== {name} (kind {kind})", flush=True)
        t0 = time.time()
        model = train(name)
        with torch.no_grad():
            x_test, y_test = digits.test_set(kind)
            torch_acc = float(
                (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
            )
        m = export(model, name)
        ops = check(m, name)
        path = digits.model_path(name)
        onnx.save_model(m, path)
        size = os.path.getsize(path)
        assert size < MAX_FILE_BYTES, f"{path} is {size} bytes"
        np.savez_compressed(digits.calib_path(name), input=digits.calibration(kind, 512))
        acc = digits.accuracy(path, kind)
        print(
            f"  {name}: params {count_params(model):,}  file {size / 1e6:.2f} MB  "
            f"test-acc onnxruntime {acc:.4f} (torch {torch_acc:.4f})  "
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
        print(f"  ops: {dict(sorted(ops.items()))}", flush=True)
        results.append((name, kind, count_params(model), size, acc))
    print(f"\ntotal time {time.time() - t_all:.0f}s")
    print("| model | input | params | size (bytes) | test accuracy |")
    print("|---|---|---|---|---|")
    for name, kind, params, size, acc in results:
        print(f"| {name} | {kind} | {params:,} | {size:,} | {100 * acc:.2f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
