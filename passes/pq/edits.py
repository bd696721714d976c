"""pq's graph edits: the decode subgraph that rebuilds a weight from its codes, and the biases
the refit writes.

Decode: Cast(int8 codes → int32) (+ 128 when K > 128) → Gather(codebook (Cast fp16 → the weight's
dtype)) → Reshape (→ Transpose) → the weight input of every reader. Packed 4-bit codes:
v = Cast(int32) + 128, hi = v / 16, lo = v − 16·hi, Concat(hi, lo) → the same Gather; 6-bit
codes (3 × g bytes): u = ReduceSum((Cast(int32) + 128) · [2¹⁶, 2⁸, 1]ᵀ, axis 0), q = u / [2¹⁸, 2¹², 2⁶, 1]ᵀ,
codes = Reshape(q − 64·(q / 64), −1) → the same Gather; 5-bit codes (4 × g bytes) the same with
places [2²⁴, 2¹⁶, 2⁸, 1] and [2²⁵, 2²⁰, …, 1], digits q − 32·(q / 32). All
standard ops on constants, which runtimes fold once at load time (see ``codec``). Nodes are built
with ``graph.Emitter``; the codebook, the codes and the decoded weight are named after the weight
(``W.pq_codebook``, ``W.pq_codes``, ``W.pq``), the decode's inner tensors under a short tag.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import Emitter
from .codec import WORDS, code_offset, pack_codes, pack_words, stored_codes, word_places
from .layer import Layer, own_bias, shared_bias


def decode(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray,
           bits: int = 8) -> gs.Variable:
    """Cast(int8 codes → int32) (→ Add offset) → Gather(codebook (→ Cast)) → Reshape
    (→ Transpose): the weight tensor, from ops and types TensorRT's ONNX parser accepts.
    Packed 4-bit codes (``bits`` 4): v = Cast(int32) + 128, hi = v / 16 (integer division, floor
    as v ≥ 0), lo = v − 16·hi, Concat(hi, lo) (→ Slice to n when n is odd) → the same Gather.
    6-bit codes (``bits`` 6, ``codec.pack_words``): the 24-bit words from the three byte rows,
    their four 6-bit digits (→ Slice to n) → the same Gather; 5-bit codes (``bits`` 5) the same
    with the 30-bit words of four byte rows and their six 5-bit digits. ``bits`` True/False: 4/8."""
    bits = {True: 4, False: 8}.get(bits, bits)
    base = layer.weight.name
    wdtype = layer.weight.values.dtype
    k, d = codebook.shape
    rows, nb = codes.shape
    n = rows * nb

    # the decode's small constants (offsets, places, radices, shapes) are shared by every decode of
    # the graph that uses the same value (``Emitter.shared_const``): one copy each, not one per layer
    # (captcha_crnn: 177 of them, 25 distinct, 4.5 KB)
    em = Emitter(graph, dtype=wdtype, shared=graph.__dict__.setdefault("_pq_small_constants", {}))
    made = []
    # the decode's inner tensors, nodes and small constants under a short tag of their own (``pq0``,
    # ``pq1``, ...): a weight's name (often 40 characters and more) in each of them was up to a
    # sixth of a quantized file (oww_embedding: 6-bit decodes of 20 Convs); the codebook, the codes
    # and the decoded weight keep the weight's name
    tag = _tag(graph)

    def add(op, inputs, suffix, dtype, shape, **attrs):
        name = em.name("", f"{base}.pq" if not suffix else f"{tag}{suffix}")
        out = gs.Variable(name, dtype=dtype, shape=shape)
        made.append(out)
        return em.op(op, inputs, attrs, out=out, name=f"{name}_{op.lower()}")

    def const(suffix, value):
        if suffix in ("codebook", "codes"):
            return em.const(value, dtype=value.dtype, name=f"{base}.pq_{suffix}")
        key = (suffix, value.dtype.str, value.shape, value.tobytes())
        return em.shared_const(key, lambda: value, f"{tag}_{suffix}")

    cb = const("codebook", codebook)
    if bits in WORDS:
        c, nbytes = WORDS[bits]
        if k > 1 << bits:
            raise ValueError(f"{bits}-bit codes hold at most {1 << bits} centroids, got {k}")
        places, byte_places = word_places(bits)
        stored = pack_words(codes, bits)
        g = stored.shape[1]
        raw = add("Cast", [const("codes", stored)], "_packed", np.int32, [nbytes, g], to=onnx.TensorProto.INT32)
        v = add("Add", [raw, const("offset", np.array(128, dtype=np.int32))], "_byte", np.int32, [nbytes, g])
        v = add("Mul", [v, const("places", byte_places.astype(np.int32))], "_placed", np.int32, [nbytes, g])
        axes = np.array([0], dtype=np.int64)
        opset = getattr(graph, "opset", None) or 13
        if opset >= 13:
            u = add("ReduceSum", [v, const("axes", axes)], "_word", np.int32, [1, g], keepdims=1)
        else:
            u = add("ReduceSum", [v], "_word", np.int32, [1, g], axes=[0], keepdims=1)
        radix = const(RADIX_NAMES[bits], np.array(1 << bits, dtype=np.int32))
        q = add("Div", [u, const("radix", places.astype(np.int32))], "_q", np.int32, [c, g])
        r = add("Sub", [q, add("Mul", [add("Div", [q, radix], "_q64", np.int32, [c, g]), radix],
                               "_q64x", np.int32, [c, g])], "_digits", np.int32, [c, g])
        idx = add("Reshape", [r, const("flat", np.array([-1], dtype=np.int64))], "_codes", np.int32, [c * g])
        if c * g != n:
            idx = add("Slice", [idx, const("start", np.array([0], dtype=np.int64)),
                                const("end", np.array([n], dtype=np.int64))], "_index", np.int32, [n])
        gather_shape = [n, d]
    elif bits == 4:
        if k > 16:
            raise ValueError(f"4-bit codes hold at most 16 centroids, got {k}")
        h = (n + 1) // 2
        raw = add("Cast", [const("codes", pack_codes(codes))], "_packed", np.int32, [h],
                  to=onnx.TensorProto.INT32)
        sixteen = const("sixteen", np.array(16, dtype=np.int32))
        v = add("Add", [raw, const("offset", np.array(128, dtype=np.int32))], "_byte", np.int32, [h])
        hi = add("Div", [v, sixteen], "_hi", np.int32, [h])
        lo = add("Sub", [v, add("Mul", [hi, sixteen], "_hi16", np.int32, [h])], "_lo", np.int32, [h])
        idx = add("Concat", [hi, lo], "_nibbles", np.int32, [2 * h], axis=0)
        if 2 * h != n:
            idx = add("Slice", [idx, const("start", np.array([0], dtype=np.int64)),
                                const("end", np.array([n], dtype=np.int64))], "_index", np.int32, [n])
        gather_shape = [n, d]
    else:
        cd = const("codes", stored_codes(codes, k))
        idx = add("Cast", [cd], "_idx", np.int32, [rows, nb], to=onnx.TensorProto.INT32)
        if code_offset(k):
            idx = add("Add", [idx, const("offset", np.array(code_offset(k), dtype=np.int32))],
                      "_index", np.int32, [rows, nb])
        gather_shape = [rows, nb, d]
    table = cb
    if codebook.dtype != wdtype:
        table = add("Cast", [cb], "_codebook_f", wdtype, [k, d],
                    to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(wdtype)))
    gathered = add("Gather", [table, idx], "_gathered", wdtype, gather_shape, axis=0)
    shape = list(layer.shape)
    if layer.rows_of == "transpose":
        flat_shape = const("shape", np.array([rows, nb * d], dtype=np.int64))
        flat = add("Reshape", [gathered, flat_shape], "_rows", wdtype, [rows, nb * d])
        out = add("Transpose", [flat], "", wdtype, shape, perm=[1, 0])
    else:
        out = add("Reshape", [gathered, const("shape", np.array(shape, dtype=np.int64))], "", wdtype, shape)
    for v in made[:-1]:  # the decode's inner tensors are written without type information (fewer bytes)
        v.dtype = None
    return out


RADIX_NAMES = {5: "thirty2", 6: "sixty4"}   # the constant 2^bits of a word decode (6: as before 5-bit words)


def _tag(graph: gs.Graph) -> str:
    """``pq0``, ``pq1``, ...: the first that no tensor name of ``graph`` starts with (as ``tag_``)."""
    taken = {name.split("_", 1)[0] for name in graph.tensors()}
    i = 0
    while f"pq{i}" in taken:
        i += 1
    return f"pq{i}"


def replace_weight(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray, bits: int) -> None:
    """Every reader of the layer's weight reads the decoded tensor instead (``bits``: the code
    width, 4, 6 or 8, see ``decode``)."""
    decoded = decode(graph, layer, codebook, codes, bits)
    for n in layer.nodes:
        for i, t in enumerate(n.inputs):
            if t is layer.weight:
                n.inputs[i] = decoded


# ----------------------------------------------------------------------------- biases
def refit_biases(layer: Layer, t_hat, cm, per_node) -> None:
    """b = E[y] − E[x̃]ᵀŴ: once from the pooled statistics ``cm`` for a bias all readers share,
    else per reader from its own (``per_node``). Conv/Gemm: b is the whole bias of the output y;
    MatMul: y excludes its bias Add, so b is added to that Add's constant."""
    w = layer.alpha * t_hat.T
    shared = shared_bias(layer)
    if shared is not None:
        b = cm.mean_y - cm.x.mean @ w
        if layer.node.op == "Gemm":
            b = b / layer.node.attrs.get("beta", 1.0)
        new = gs.Constant(shared.name, b.astype(shared.values.dtype))
        for n in layer.nodes:
            n.inputs[2] = new
        return
    for n in layer.nodes:
        if not own_bias(layer, n):
            continue
        own = per_node.get(n.name, cm)
        b = own.mean_y - own.x.mean @ w
        if n.op == "MatMul":
            layer.reader(n).add_bias(b)
        else:
            layer.reader(n).set_bias(b, base=n.name + ".pq_bias")


# ----------------------------------------------------------------------------- float weights as fp16
# the readers a float constant left float may be stored as fp16 for: products, elementwise
# arithmetic, slopes and normalisations, whose constant inputs are values, not shapes or scales
# that shape inference reads (Resize, Pad, Clip, Range, ...)
HALF_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "PRelu",
                "BatchNormalization", "InstanceNormalization", "LayerNormalization"}
HALF_ERROR = 1e-6   # the largest relative squared error of a constant stored as fp16 (rounding alone: ~1e-8)
HALF_SUFFIX = ".pq_half"


def half_error(values: np.ndarray) -> float:
    """The relative squared error of ``values`` rounded to fp16 (inf where fp16 cannot hold them)."""
    v = values.astype(np.float64)
    if not np.isfinite(v).all() or np.abs(v).max(initial=0.0) > np.finfo(np.float16).max:
        return float("inf")
    den = float((v ** 2).sum())
    return float(((v - v.astype(np.float16).astype(np.float64)) ** 2).sum()) / den if den > 0 else 0.0


def store_half(graph: gs.Graph, limit: float = HALF_ERROR, kept=frozenset(), short_names: bool = False) -> int:
    """The float32 constants of the main graph that only ``HALF_READERS`` read (weights left float:
    the first Conv, small heads, biases, PReLU slopes) stored as fp16 and Cast back to float32 at
    load, where that takes fewer serialized bytes than the constant (the Cast node counted) and the
    rounding's relative squared error is within ``limit`` (at most ``HALF_ERROR``; pq passes its
    per-layer budget where that is tighter) and no reader is in ``kept`` (node names that stay as
    they are: the accuracy search's protected nodes); the readers read the Cast (its bytes counted
    with the short names ``graph.compact_names`` gives it later where ``short_names``). Returns
    the float32 bytes a runtime holds for them (the Cast is folded at load)."""
    from .sizes import element_bytes, tensor_bytes
    outs, taken = {t.name for t in graph.outputs}, set(graph.tensors()) | {n.name for n in graph.nodes}
    held = 0
    for t in list(graph.tensors().values()):
        if not isinstance(t, gs.Constant) or t.values.dtype != np.float32 or t.name in outs or not t.outputs \
                or {t.name + HALF_SUFFIX, t.name + ".f"} & taken:
            continue
        if not all(n.op in HALF_READERS and n.name not in kept for n in t.outputs):
            continue
        if t.values.size < 8 or half_error(t.values) > min(limit, HALF_ERROR):   # 8 values: 16 bytes, under a Cast's
            continue
        half = t.values.astype(np.float16)
        inner = "q000" if short_names else t.name + ".f"
        cast = onnx.helper.make_node("Cast", [t.name + HALF_SUFFIX], [inner], name=inner, to=onnx.TensorProto.FLOAT)
        if tensor_bytes(t.name + HALF_SUFFIX, half) + element_bytes(cast) >= tensor_bytes(t.name, t.values):
            continue
        out = gs.Variable(t.name + ".f", dtype=np.float32, shape=list(t.values.shape))
        graph.nodes.append(gs.Node("Cast", t.name + ".f", {"to": onnx.TensorProto.FLOAT},
                                   [gs.Constant(t.name + HALF_SUFFIX, half)], [out]))
        for n in list(t.outputs):
            for i, x in enumerate(n.inputs):
                if x is t:
                    n.inputs[i] = out
        held += t.values.nbytes
    return held

