"""pq: store weights as product-quantized codebooks, decoded in the graph.

Product quantization of a weight layer ("Compressing Deep Convolutional Networks using Vector
Quantization"; "Compression of Deep Neural Networks on the Fly"): write the layer as y = x W (W: d_in × d_out, the rows of W in the
order of the layer's input features). Each output's column w_j is cut into sub-vectors of length
d along the input features, w_j = [w_1j; …; w_Bj] (B = d_in / d; for a k×k Conv one sub-vector is
one kernel, d = k·k). One codebook C = {c_1 … c_K} (K ≤ 256) per layer; each sub-vector is
replaced by a centroid, stored as a one-byte code, or for K ≤ 16 two 4-bit codes a byte.
Bytes: d_in·d_out·4 → d_in·d_out/d (÷ 2 when packed) + K·d·(2|4).

Activation-aware assignment ("And the Bit Goes Down: Revisiting the Quantization of Neural
Networks"): the layer's output
error on calibration inputs is ‖X (W − Ŵ)‖² = Σ_j (w_j − ŵ_j)ᵀ H (w_j − ŵ_j), H = Cov(x) + λI
(λ = damp · mean input variance). Steps, per layer:
1. plain k-means on the sub-vectors (k-means++ seeding, vectorised Lloyd steps) initialises C;
2. EM with the diagonal blocks H_b of H: E-step argmin_k (w − c_k)ᵀ H_b (w − c_k), M-step
   c_k = (Σ_{i∈k} H_b(i))⁻¹ Σ_{i∈k} H_b(i) w_i;
3. assignment block by block with error feedback on the full H (optimal brain quantization, as
   in GPTQ/GPTVQ): after block F is assigned, W_R −= U_FRᵀ U_FF⁻ᵀ (W_F − Ŵ_F), H⁻¹ = UᵀU;
4. the codebook refit by least squares on the full H with the codes fixed (conjugate gradient).
Layers are done in topological levels (sequential reconstruction): the target of a layer is
W* = argmin ‖X̃ W* − Y‖² + λ‖W* − W‖², with X̃ its inputs in the already-quantized network and Y
its outputs in the original one, and its bias is refit as b = E[y] − E[x̃]ᵀŴ. ``pq.aware=false``
keeps plain k-means on the weights (still with the bias refit).

In the graph: Gather(codebook (Cast fp16 → fp32 when stored as fp16), Cast(codes int8 → int32)
(+ 128 when K > 128)) → Reshape (→ Transpose) → the node's weight input (int8, not uint8, codes:
TensorRT's ONNX parser refuses UINT8). Packed 4-bit codes (``pq.bits``; auto packs K ≤ 16
where it saves bytes) are unpacked without BitShift, which that parser lacks: byte =
16·hi + lo − 128, v = Cast(int32) + 128, hi = v / 16, lo = v − 16·hi, Concat → the same Gather.
All standard ops on constants: runtimes fold them once at load time, so inference runs at the
original speed. Small layers (codes + codebook would not
save bytes) and the model's first Conv stay dense by default.

Size budget (``--target-size``): each layer gets candidate (d, K) settings with their output
error and bytes; a Lagrangian search picks per layer the setting minimising Σ relative output
error + λ·bytes, bisecting λ until the serialized model meets the goal.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import export_model, import_graph
from ..reconstruct import conv_attrs, deterministic, layer_stats_request, shared_levels
from ..registry import Pass, PassReport, Plan, Skip, register
from ..stats import CrossMoments

CODEBOOK_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass
class PqConfig:
    block: int = 0                 # sub-vector length d; 0 = per layer type (kernel k·k, else 4)
    centroids: int = 256           # K, centroids per layer codebook (2..256)
    codebook_dtype: str = "fp16"   # fp16 or fp32
    aware: bool = True             # activation-aware EM (False: plain k-means on the weights)
    iters: int = 8                 # activation-aware EM rounds
    gptq: bool = True              # assign block by block with error feedback (full covariance)
    refine: int = 15               # conjugate-gradient steps refitting the codebook (full covariance)
    sequential: bool = True        # targets: original outputs, inputs from the already-quantized net
    kmeans_iters: int = 8          # plain Lloyd rounds (the initialisation)
    damp: float = 0.01             # metric damping, relative to the mean input variance
    bias_correct: bool = True      # absorb the mean output shift into the bias
    first_conv: bool = False       # also quantize the first Conv of the model
    positions: int = 16            # Conv: sampled output positions per calibration sample
    bits: str = "auto"             # code width: 8, 4 (two codes a byte, K ≤ 16), auto (4 where K ≤ 16 saves bytes)
    max_error: float = 3e-4        # per-layer budget on the relative output error; a layer over it is
                                   # redone with shorter sub-vectors (down to 1: scalar codes), else stays float
                                   # (0 = no budget: the first setting is kept whatever its error)
    min_bytes: int = 4096          # layers whose dense weight is smaller stay float (little to gain)
    rounds: int = 4                # sequential: at most this many statistics rounds (consecutive
                                   # topological levels share one; 0 = one round per level)

    def __post_init__(self):
        if self.block < 0 or self.block > 64:
            raise ValueError(f"pq.block must be 0 (auto) or 1..64, got {self.block}")
        if not 2 <= self.centroids <= 256:
            raise ValueError(f"pq.centroids must be in 2..256 (one-byte codes), got {self.centroids}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ValueError(f"pq.codebook_dtype must be fp16 or fp32, got '{self.codebook_dtype}'")
        if self.iters < 0 or self.kmeans_iters < 1 or self.refine < 0:
            raise ValueError("pq.iters and pq.refine must be ≥ 0, pq.kmeans_iters ≥ 1")
        if self.damp < 0:
            raise ValueError(f"pq.damp must be ≥ 0, got {self.damp}")
        self.bits = str(self.bits).lower()
        if self.bits not in ("auto", "4", "8"):
            raise ValueError(f"pq.bits must be 4, 8 or auto, got '{self.bits}'")
        if self.max_error < 0:
            raise ValueError(f"pq.max_error must be ≥ 0 (0: no budget), got {self.max_error}")
        if self.rounds < 0:
            raise ValueError(f"pq.rounds must be ≥ 0 (0: one per level), got {self.rounds}")
        if self.min_bytes < 0:
            raise ValueError(f"pq.min_bytes must be ≥ 0, got {self.min_bytes}")
        if self.bits == "4" and self.centroids > 16:
            raise ValueError(f"pq.bits=4 holds at most 16 centroids, got pq.centroids={self.centroids}")


# ----------------------------------------------------------------------------- layers
@dataclass
class Layer:
    """A weight layer seen as T (rows × d_in): row r holds the weights of output r (per group).
    ``nodes``: every node that reads the weight (several when the weight is shared: an unrolled
    RNN's time steps, tied matrices); the weight is quantized once and they all read the one
    decoded tensor."""

    nodes: list
    weight: gs.Constant
    rows_of: str          # "natural" (T = W.reshape(rows, -1)) or "transpose" (T = W.T)
    aware: bool           # LayerStats can give the input covariance (group-1 Conv, Gemm, MatMul)
    kernel: int           # k·k of a Conv/ConvTranspose kernel, 1 otherwise

    @property
    def node(self) -> gs.Node:
        return self.nodes[0]

    @property
    def shape(self):
        return tuple(self.weight.values.shape)

    def matrix(self) -> np.ndarray:
        w = self.weight.values
        if self.rows_of == "transpose":
            return w.T
        return w.reshape(w.shape[0], -1)

    @property
    def d_in(self):
        return self.matrix().shape[1]

    @property
    def n_weights(self):
        return int(np.prod(self.shape))


def _layer(node: gs.Node, graph_outputs) -> tuple[Layer | None, str | None]:
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None, None
    if len(node.inputs) < 2:
        return None, "no weight input"
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        if node.op == "MatMul":
            return None, "MatMul whose right operand is computed at run time (no constant weight)"
        return None, "weights are not constants"
    if not np.issubdtype(w.values.dtype, np.floating):
        return None, f"weights of dtype {w.values.dtype}, not float"
    if w.name in graph_outputs:
        return None, "weights are a graph output"
    if any(t is w for i, t in enumerate(node.inputs) if i != 1):
        return None, "the weight is also another input of the node"
    shape = w.values.shape
    if node.op == "MatMul":
        if len(shape) != 2:
            return None, f"MatMul weight of rank {len(shape)} (only 2-D right operands)"
        return Layer([node], w, "transpose", True, 1), None
    if node.op == "Gemm":
        if len(shape) != 2:
            return None, "Gemm weight is not 2-D"
        trans = bool(node.attrs.get("transB", 0))
        return Layer([node], w, "natural" if trans else "transpose", True, 1), None
    kernel = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if node.op == "Conv":
        try:
            attrs = conv_attrs(node, shape)
        except ValueError as e:
            return None, str(e)
        return Layer([node], w, "natural", attrs["group"] == 1, kernel), None
    return Layer([node], w, "natural", False, kernel), None  # ConvTranspose: weight space


def _shared_layer(layer: Layer, graph_outputs) -> tuple[Layer | None, str | None]:
    """The layer of a weight several nodes read: one Layer over all of them when every reader is a
    weight layer of the same kind and layout (the same matrix view, so their input statistics
    pool), else None and why."""
    readers = list(layer.weight.outputs)
    nodes = []
    for n in readers:
        other, reason = _layer(n, graph_outputs)
        if other is None:
            return None, (f"weights shared by {len(readers)} nodes, one of them {n.name} ({n.op}) "
                          f"{'is not a weight layer' if reason is None else 'cannot be rewritten: ' + reason}")
        if (n.op, other.rows_of, other.aware) != (layer.node.op, layer.rows_of, layer.aware) or \
                (n.op == "Gemm" and n.attrs.get("alpha", 1.0) != layer.node.attrs.get("alpha", 1.0)):
            return None, (f"weights shared by {len(readers)} nodes of different kinds or layouts "
                          f"({layer.node.name} {layer.node.op}, {n.name} {n.op})")
        nodes.append(n)
    return Layer(nodes, layer.weight, layer.rows_of, layer.aware, layer.kernel), None


def _weight_bytes(graph: gs.Graph, skip: str | None = None) -> int:
    """Bytes of the float constants of the graph (``skip``: leave out those whose name holds it)."""
    return int(sum(t.values.nbytes for t in graph.tensors().values()
                   if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating)
                   and (skip is None or skip not in t.name)))


def _non_finite(values) -> bool:
    return not np.isfinite(values).all()


def _default_block(layer: Layer, cfg: PqConfig) -> int:
    d_in = layer.d_in
    if cfg.block:
        return cfg.block
    # a kernel of up to 16 taps is one sub-vector; a longer one (a 1-D filter bank, an STFT as
    # Conv) is cut like a dense row: a 512-long sub-vector would need as many centroids as rows
    if layer.kernel > 1 and (layer.kernel <= 16 or int(layer.shape[-1]) <= 16):
        return layer.kernel if layer.kernel <= 16 else int(layer.shape[-1])
    for d in (4, 8, 2):
        if d_in % d == 0:
            return d
    return 1


def _element_bytes(proto) -> int:
    """Serialized bytes of one element of a repeated GraphProto field (tag, length, message)."""
    n = proto.ByteSize()
    return 1 + _varint_len(n) + n


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _tensor_bytes(name: str, values: np.ndarray) -> int:
    return _element_bytes(onnx.numpy_helper.from_array(np.ascontiguousarray(values), name))


def _dense_bytes(layer: Layer) -> int:
    return _tensor_bytes(layer.weight.name, layer.weight.values)


def _packed(layer: Layer, d: int, k: int, dtype, cfg: PqConfig) -> bool:
    """Whether k centroids of length d are stored as 4-bit codes (two a byte): always with
    pq.bits=4, never with 8; with auto where k ≤ 16 and the packed codes and their longer decode
    take fewer bytes than one byte a code (tiny layers: the extra decode nodes cost more)."""
    if cfg.bits != "auto":
        return cfg.bits == "4"
    if k > 16:
        return False
    refit = layer.aware and cfg.bias_correct
    return _pq_bytes(layer, d, k, dtype, refit, True) < _pq_bytes(layer, d, k, dtype, refit, False)


def _pq_bytes(layer: Layer, d: int, k: int, dtype, bias_refit: bool, packed: bool = False) -> int:
    """Serialized bytes of the layer's weight stored as k centroids of length d: the decode
    nodes, their initializers and type information, and the bias where the refit adds or widens
    one, measured on the protos the export writes, so that size budgets are exact."""
    rows = layer.matrix().shape[0]
    scratch = gs.Graph()
    out = _decode(scratch, layer, np.zeros((k, d), dtype), np.zeros((rows, layer.d_in // d), np.uint8), packed)
    probe = gs.Variable("probe", dtype=out.dtype)  # a consumer, so the weight is typed like in the model
    scratch.nodes.append(gs.Node("Identity", name="probe", inputs=[out], outputs=[probe]))
    scratch.outputs = [probe]
    g = export_model(scratch).graph
    nodes = [n for n in g.node if n.name != "probe"]
    pq = sum(_element_bytes(p) for p in (*nodes, *g.initializer, *g.value_info))
    if bias_refit:
        shared = _shared_bias(layer)
        for node in ([] if shared is not None else layer.nodes):
            target = _bias_target(layer, node)
            if target is None or target[0] != "input":
                continue
            if len(node.inputs) > 2:
                bias = node.inputs[2]
                if len(bias.outputs) > 1:  # a bias other nodes share: this node gets its own copy
                    pq += _tensor_bytes(node.name + ".pq_bias", np.zeros(rows, bias.values.dtype))
                    continue
                new = _tensor_bytes(bias.name, np.zeros(rows, bias.values.dtype))
                old = _tensor_bytes(bias.name, bias.values)
            else:
                new, old = _tensor_bytes(node.name + ".pq_bias", np.zeros(rows, layer.weight.values.dtype)), 0
            pq += max(new - old, 0)
    return pq


# ----------------------------------------------------------------------------- k-means / EM
def _sqdist_argmin(x, c, chunk=4096):
    """Nearest centroid (Euclidean) of each row of x; float32 products in cache-sized chunks."""
    if c.shape[1] == 1:
        return _nearest_scalar(x[:, 0], c[:, 0])
    x32 = x.astype(np.float32)
    ct = (-2.0 * c.T).astype(np.float32)
    cc = (c.astype(np.float32) ** 2).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        scores = x32[s:s + chunk] @ ct
        scores += cc
        out[s:s + chunk] = scores.argmin(1)
    return out


def _nearest_scalar(v, c):
    """Index of the nearest of the scalar centroids c for each v (ties to the lower index), by
    binary search in the sorted centroids: O(n log k) instead of the n × k distance table."""
    order = np.argsort(c, kind="stable")
    cs = c[order]
    mids = 0.5 * (cs[1:] + cs[:-1])
    pos = np.searchsorted(mids, v, side="left")
    # equal centroids: the lowest index among them, as argmin would
    first = order[np.searchsorted(cs, cs, side="left")]
    return first[pos].astype(np.int64)


def _kmeanspp(x, k, rng, sample=20000):
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), size=sample, replace=False))]
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(len(x))]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:
            centers[i:] = centers[0]
            break
        j = int(np.searchsorted(np.cumsum(d2), rng.random() * total))
        centers[i] = x[min(j, len(x) - 1)]
        d2 = np.minimum(d2, ((x - centers[i]) ** 2).sum(1))
    return centers


def _bincount_rows(codes, vals, k):
    """Σ of the rows of vals per code: (k, d)."""
    return np.stack([np.bincount(codes, weights=vals[:, e], minlength=k) for e in range(vals.shape[1])], axis=1)


def kmeans(x, k, iters, rng, sample=65536):
    """Plain k-means (k-means++ seeding, Lloyd steps on at most ``sample`` points, then one
    assignment of all points) -> (centroids k×d, codes)."""
    c = _kmeanspp(x, k, rng)
    full = x
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), size=sample, replace=False))]
    codes = _sqdist_argmin(x, c)
    for _ in range(iters):
        counts = np.bincount(codes, minlength=k)
        sums = _bincount_rows(codes, x, k)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
        new = _sqdist_argmin(x, c)
        if np.array_equal(new, codes):
            break
        codes = new
    return c, (codes if x is full else _sqdist_argmin(full, c))


def _metric_assign(hx, nb, c, hblocks, chunk=4096):
    """argmin_k c_kᵀH_b c_k − 2 (H_b w)ᵀ c_k for each sub-vector; hx = H_b w, ordered (row, block)."""
    k, d = c.shape
    if d == 1:  # h_b (c − w)² with h_b > 0: the nearest centroid to w = hx / h_b
        hb = hblocks.reshape(nb)
        return _nearest_scalar((hx.reshape(-1, nb) / hb[None, :]).reshape(-1), c[:, 0])
    c2 = (-2.0 * c.T).astype(np.float32)
    q = np.einsum("kd,bde,ke->bk", c, hblocks, c).astype(np.float32)  # (B, K)
    hx3 = hx.astype(np.float32).reshape(-1, nb, d)
    per = max(1, chunk // nb)
    out = np.empty((len(hx3), nb), dtype=np.int64)
    for s in range(0, len(hx3), per):
        scores = hx3[s:s + per] @ c2
        scores += q[None]
        out[s:s + per] = np.argmin(scores, axis=2)
    return out.reshape(-1)


def aware_em(x, blk, hblocks, c, codes, iters):
    """EM under per-block metrics: returns (centroids, codes). x: (rows·B, d), blk = i mod B."""
    k, d = c.shape
    nb = len(hblocks)
    hx = np.einsum("bde,rbe->rbd", hblocks, x.reshape(-1, nb, d)).reshape(-1, d)
    for _ in range(iters):
        counts = np.bincount(blk * k + codes, minlength=nb * k).reshape(nb, k)
        hsum = np.einsum("bk,bde->kde", counts.astype(np.float64), hblocks)
        rhs = _bincount_rows(codes, hx, k)
        nz = counts.sum(0) > 0
        if nz.any():
            c = c.copy()
            c[nz] = np.linalg.solve(hsum[nz], rhs[nz][..., None])[..., 0]
        new = _metric_assign(hx, nb, c, hblocks)
        if np.array_equal(new, codes):
            break
        codes = new
    return c, codes


def gptq_assign(t, d, c, h, group=256):
    """Assign sub-vectors block by block along the input features with a fixed codebook,
    feeding each block's error forward to the blocks not yet assigned (optimal brain
    quantization with H⁻¹ = UᵀU, U upper Cholesky): metric G = (U_FFᵀU_FF)⁻¹ for block F, update
    W_R −= U_FRᵀ U_FF⁻ᵀ Δ_F. t: rows × d_in (row = one output). Updates beyond the current group
    of blocks are applied once per group (lazy batch)."""
    rows, d_in = t.shape
    nb = d_in // d
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(0.5 * (hinv + hinv.T)).T  # upper: hinv = uᵀ u
    w = t.T.copy()  # d_in × rows
    codes = np.empty((rows, nb), dtype=np.int64)
    per = max(1, group // d)
    ct = c.T.copy()
    for g0 in range(0, nb, per):
        g1 = min(nb, g0 + per)
        lo, hi = g0 * d, g1 * d
        wg = w[lo:hi].copy()
        zs = np.empty_like(wg)
        for b in range(g0, g1):
            f = slice(b * d - lo, (b + 1) * d - lo)
            fa = slice(b * d, (b + 1) * d)
            uff = u[fa, fa]
            gm = np.linalg.inv(uff.T @ uff)
            gm = 0.5 * (gm + gm.T)
            wf = wg[f]
            q = np.einsum("kd,de,ke->k", c, gm, c)
            cb = np.argmin(q[None, :] - 2.0 * (wf.T @ gm) @ ct, axis=1)
            codes[:, b] = cb
            z = np.linalg.solve(uff.T, wf - ct[:, cb])
            zs[f] = z
            if b + 1 < g1:
                wg[f.stop:] -= u[fa, (b + 1) * d:hi].T @ z
        if hi < d_in:
            w[hi:] -= u[lo:hi, hi:].T @ zs
    return codes


def refine_codebook(t, codes, c, h, steps):
    """Least squares for the codebook with the assignments fixed, on the full covariance:
    min_C Σ_r (t̂_r(C) − t_r)ᵀ H (t̂_r(C) − t_r); preconditioned conjugate gradient."""
    rows, nb = codes.shape
    k, d = c.shape
    flat = codes.reshape(-1)

    def scatter(g):  # rows × d_in -> k × d
        return _bincount_rows(flat, g.reshape(-1, d), k)

    def op(cc):
        return scatter(cc[flat].reshape(rows, nb * d) @ h)

    hb = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
    counts = np.bincount(np.tile(np.arange(nb), rows) * k + flat, minlength=nb * k).reshape(nb, k)
    pre = np.einsum("bk,bde->kde", counts.astype(np.float64), hb)
    used = counts.sum(0) > 0
    pre[~used] = np.eye(d)
    pinv = np.linalg.inv(pre)
    rhs = scatter(t @ h)
    x = c.copy()
    r = rhs - op(x)
    r[~used] = 0
    z = np.einsum("kde,ke->kd", pinv, r)
    p = z.copy()
    rz = float((r * z).sum())
    for _ in range(steps):
        ap = op(p)
        denom = float((p * ap).sum())
        if denom <= 0 or rz <= 0:
            break
        alpha = rz / denom
        x += alpha * p
        r -= alpha * ap
        r[~used] = 0
        z = np.einsum("kde,ke->kd", pinv, r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def _merge_levels(levels: list, rounds: int) -> list:
    """Consecutive topological levels joined into at most ``rounds`` groups of about equal layer
    counts: each group's statistics come from one run of the network quantized up to the groups
    before it (fewer calibration runs on deep models; 0 keeps one group per level)."""
    if rounds <= 0 or len(levels) <= rounds:
        return levels
    total = sum(len(lv) for lv in levels)
    out, cur, done = [], [], 0
    for lv in levels:
        cur = cur + list(lv)
        done += len(lv)
        if done * rounds >= total * (len(out) + 1) and len(out) < rounds - 1:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _rel_error(t, t_hat, h):
    """Relative output error under the metric h, or relative weight error without one."""
    if h is not None:
        return output_error(t, t_hat, h)
    return float(((t - t_hat) ** 2).sum() / max((t ** 2).sum(), 1e-30))


def _ladder(layer: Layer, d: int) -> list:
    """Sub-vector lengths tried in turn under pq.max_error: the default d, then shorter ones (a
    Conv kernel row or half the length, 2), down to 1 (scalar codes, 8 bits a weight)."""
    out = [d]
    if layer.kernel > 1 and d == layer.kernel and 1 < int(layer.shape[-1]) < d:
        out.append(int(layer.shape[-1]))
    elif d > 2 and layer.d_in % (d // 2) == 0:
        out.append(d // 2)
    if out[-1] > 2 and layer.d_in % 2 == 0:
        out.append(2)  # 4 bits a weight with 256 centroids
    if out[-1] > 1:
        out.append(1)
    return out


def output_error(t, t_hat, h):
    """Σ_r (t̂_r − t_r)ᵀ H (t̂_r − t_r) / Σ_r t_rᵀ H t_r."""
    delta = t - t_hat
    return float(((delta @ h) * delta).sum() / max(((t @ h) * t).sum(), 1e-30))


def quantize(t, d, k, h, cfg, rng, dtype):
    """T (rows × d_in) -> (codebook K'×d in ``dtype``, codes rows × B uint8, T̂).

    h: the damped input covariance (d_in × d_in) for activation-aware layers, else None."""
    rows, d_in = t.shape
    nb = d_in // d
    x = t.reshape(rows * nb, d).astype(np.float64)
    # at most k distinct sub-vectors: they are the codebook. Sorting every row to find out costs
    # more than the k-means of a large layer, so the first 4k + 1 rows are looked at first.
    few = len(np.unique(x[: 4 * k + 1], axis=0)) <= k
    uniq, inv = np.unique(x, axis=0, return_inverse=True) if few else (None, None)
    if few and len(uniq) <= k:
        c, codes = uniq, inv.reshape(-1)
    else:
        c, codes = kmeans(x, k, cfg.kmeans_iters, rng)
        if h is not None and cfg.aware:
            hblocks = h.reshape(nb, d, nb, d)[np.arange(nb), :, np.arange(nb), :]
            if cfg.iters:
                c, codes = aware_em(x, np.tile(np.arange(nb), rows), hblocks, c, codes, cfg.iters)
            if cfg.gptq:
                codes = gptq_assign(t, d, c, h).reshape(-1)
            if cfg.refine:
                c = refine_codebook(t, codes.reshape(rows, nb), c, h, cfg.refine)
        # drop unused centroids (fewer bytes, same weights)
        used = np.unique(codes)
        remap = np.zeros(len(c), dtype=np.int64)
        remap[used] = np.arange(len(used))
        c, codes = c[used], remap[codes]
    cb = c.astype(dtype)
    t_hat = cb.astype(np.float64)[codes].reshape(rows, d_in)
    return cb, codes.reshape(rows, nb).astype(np.uint8), t_hat


# ----------------------------------------------------------------------------- graph
def code_offset(k: int) -> int:
    """Codes are stored as int8 ``code − offset``: TensorRT's ONNX parser (8.x) has no UINT8
    tensors and Cast only between FP32/FP16/INT32/INT8/BOOL, so uint8 codes could not be parsed.
    Codebooks of up to 128 centroids need no offset; larger ones store code − 128 and the decode
    adds 128 back after the Cast to int32."""
    return 128 if k > 128 else 0


def stored_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """The int8 initializer for codes 0..k−1 (see ``code_offset``)."""
    return (codes.astype(np.int16) - code_offset(k)).astype(np.int8)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (0..15) two a byte, as int8 (TensorRT parses no UINT8): the n codes in
    row-major order are cut in halves, the first ⌈n/2⌉ give the high nibbles, the rest (padded
    with one 0 when n is odd) the low ones, and byte i = 16·hi_i + lo_i − 128. Halves rather than
    neighbours, so the decode joins them with one Concat instead of interleaving."""
    flat = codes.reshape(-1).astype(np.int16)
    if flat.size and flat.max() > 15:
        raise ValueError("4-bit codes must be < 16")
    h = (flat.size + 1) // 2
    lo = np.zeros(h, dtype=np.int16)
    lo[:flat.size - h] = flat[h:]
    return (16 * flat[:h] + lo - 128).astype(np.int8)


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The n codes ``pack_codes`` stored (int64), in numpy: what the decode subgraph computes."""
    v = packed.astype(np.int64) + 128
    hi = v // 16
    return np.concatenate([hi, v - 16 * hi])[:n]


def _decode(graph: gs.Graph, layer: Layer, codebook: np.ndarray, codes: np.ndarray,
            packed: bool = False) -> gs.Variable:
    """Cast(int8 codes → int32) (→ Add offset) → Gather(codebook (→ Cast)) → Reshape
    (→ Transpose): the weight tensor, from ops and types TensorRT's ONNX parser accepts.
    Packed 4-bit codes: v = Cast(int32) + 128, hi = v / 16 (integer division, floor as v ≥ 0),
    lo = v − 16·hi, Concat(hi, lo) (→ Slice to n when n is odd) → the same Gather."""
    base = layer.weight.name
    wdtype = layer.weight.values.dtype
    k, d = codebook.shape
    rows, nb = codes.shape
    n = rows * nb

    def add(op, inputs, suffix, dtype, shape, **attrs):
        out = gs.Variable(f"{base}.pq{suffix}", dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node(op, name=f"{base}.pq{suffix}_{op.lower()}", attrs=attrs,
                                   inputs=inputs, outputs=[out]))
        return out

    def const(suffix, value):
        return gs.Constant(base + ".pq_" + suffix, np.ascontiguousarray(value))

    cb = const("codebook", codebook)
    if packed:
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
        return add("Transpose", [flat], "", wdtype, shape, perm=[1, 0])
    return add("Reshape", [gathered, const("shape", np.array(shape, dtype=np.int64))], "", wdtype, shape)


def decoded_weight(layer_shape, rows_of, codebook, stored) -> np.ndarray:
    """The weight the decode subgraph computes from the stored (int8) codes, in numpy; 1-D
    ``stored`` are packed 4-bit codes (``pack_codes``), 2-D ones a byte a code."""
    cb = codebook.astype(np.float32)
    if stored.ndim == 1:
        n = int(np.prod(layer_shape)) // cb.shape[1]
        rows = layer_shape[1] if rows_of == "transpose" else layer_shape[0]
        codes = unpack_codes(stored, n).reshape(rows, -1)
    else:
        codes = stored.astype(np.int64) + code_offset(len(codebook))
    t = cb[codes].reshape(codes.shape[0], -1)
    return t.T.copy() if rows_of == "transpose" else t.reshape(layer_shape)


def _bias_target(layer: Layer, node: gs.Node):
    """(kind, tensor holder) where ``node``'s bias correction can go: ("input", node) for
    Conv/Gemm, ("add", add_node, const_index) for a MatMul followed by an Add of a constant vector."""
    n_out = layer.matrix().shape[0]
    if node.op == "Conv":
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            return None
        return ("input", node)
    if node.op == "Gemm":
        if node.attrs.get("beta", 1.0) == 0:
            return None
        if len(node.inputs) > 2 and (not isinstance(node.inputs[2], gs.Constant)
                                     or node.inputs[2].values.size not in (1, n_out)
                                     or len(node.inputs[2].outputs) > 1):
            return None
        return ("input", node)
    if node.op == "MatMul":
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            for i, t in enumerate(add.inputs):
                if (isinstance(t, gs.Constant) and t.values.shape == (n_out,) and len(t.outputs) == 1):
                    return ("add", add, i)
    return None


def _shared_bias(layer: Layer):
    """The bias constant of a shared-weight layer when every reader of the weight reads that one
    bias (Conv/Gemm input 2, same Gemm beta) and nothing else reads it: it is refit once, from the
    pooled statistics. None otherwise (each reader's bias is refit on its own)."""
    if len(layer.nodes) < 2 or layer.node.op not in ("Conv", "Gemm"):
        return None
    n_out = layer.matrix().shape[0]
    first = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
    if not isinstance(first, gs.Constant) or first.values.size not in (1, n_out):
        return None
    beta = layer.node.attrs.get("beta", 1.0)
    if beta == 0 or any(len(n.inputs) < 3 or n.inputs[2] is not first or n.attrs.get("beta", 1.0) != beta
                        for n in layer.nodes):
        return None
    if {id(n) for n in first.outputs} != {id(n) for n in layer.nodes}:
        return None
    return first


def _write_bias(layer: Layer, node: gs.Node, target, b_new: np.ndarray):
    """Conv/Gemm: b_new is the whole bias of the output y; MatMul + Add: y excludes the Add's
    constant, so b_new is added to it."""
    dtype = layer.weight.values.dtype
    if target[0] == "add":
        _, add, i = target
        c = add.inputs[i]
        add.inputs[i] = gs.Constant(c.name, (c.values.astype(np.float64) + b_new).astype(c.values.dtype))
        return
    if node.op == "Gemm":
        b_new = b_new / node.attrs.get("beta", 1.0)
    if len(node.inputs) > 2:
        c = node.inputs[2]
        name = c.name if len(c.outputs) == 1 else node.name + ".pq_bias"  # a shared bias stays as it is
        node.inputs[2] = gs.Constant(name, b_new.astype(c.values.dtype))
    else:
        node.inputs.append(gs.Constant(node.name + ".pq_bias", b_new.astype(dtype)))


def _write_shared_bias(layer: Layer, bias: gs.Constant, b_new: np.ndarray):
    if layer.node.op == "Gemm":
        b_new = b_new / layer.node.attrs.get("beta", 1.0)
    new = gs.Constant(bias.name, b_new.astype(bias.values.dtype))
    for n in layer.nodes:
        n.inputs[2] = new


def _bias_fit(layer: Layer, cfg) -> bool:
    """Whether the layer's output shift can be absorbed into a bias (of some reader)."""
    if not cfg.bias_correct:
        return False
    return _shared_bias(layer) is not None or any(_bias_target(layer, n) is not None for n in layer.nodes)


def _fixed_bias(layer: Layer, node: gs.Node):
    """The constant bias a Conv/Gemm adds to its product (d_out), or None."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return None
    n_out = layer.matrix().shape[0]
    b = node.inputs[2].values.astype(np.float64).reshape(-1)
    if b.size not in (1, n_out):
        return None
    if node.op == "Gemm":
        b = b * float(node.attrs.get("beta", 1.0))
    return np.broadcast_to(b, (n_out,)).copy()


def _without_bias(cm, b):
    """The moments of (x, y − b): the target of a layer whose bias stays as it is is its product."""
    if b is None or not np.any(b):
        return cm
    out = CrossMoments(len(cm.x.mean), len(cm.sum_y))
    out.x.merge(cm.x)
    n = cm.n
    out.sum_y = cm.sum_y - n * b
    out.xy = cm.xy - np.outer(cm.x.sum, b)
    out.yy = cm.yy - 2 * b * cm.sum_y + n * b * b
    return out


# ----------------------------------------------------------------------------- the pass
@register
class Pq(Pass):
    name = "pq"
    summary = "store weights as product-quantized codebooks decoded in the graph"
    Config = PqConfig
    needs_data = True
    budgets = ("bytes",)

    def _scan(self, graph, cfg):
        """[(layer, d)] to quantize and [Skip]."""
        outs = {t.name for t in graph.outputs}
        first_conv = next((n.name for n in graph.nodes if n.op in ("Conv", "ConvTranspose")), None)
        dtype = CODEBOOK_DTYPES[cfg.codebook_dtype]
        todo, skipped, seen = [], [], set()

        def skip(layer, reason):
            skipped.extend(Skip(n.name, reason) for n in layer.nodes)

        for node in graph.nodes:
            layer, reason = _layer(node, outs)
            if layer is None:
                if reason:
                    skipped.append(Skip(node.name, reason))
                continue
            if id(layer.weight) in seen:
                continue  # a shared weight: handled with its first reader
            seen.add(id(layer.weight))
            if len(layer.weight.outputs) > 1:
                shared, reason = _shared_layer(layer, outs)
                if shared is None:
                    for n in layer.weight.outputs:
                        skipped.append(Skip(n.name, reason))
                    continue
                layer = shared
            if _non_finite(layer.weight.values):
                skip(layer, f"weights contain NaN or Inf values ({layer.weight.name}): not quantized")
                continue
            if first_conv in {n.name for n in layer.nodes} and not cfg.first_conv:
                skip(layer, "first conv stays dense (pq.first_conv=true to quantize it)")
                continue
            if layer.n_weights * layer.weight.values.dtype.itemsize < cfg.min_bytes:
                skip(layer, f"small layer: {layer.n_weights * layer.weight.values.dtype.itemsize} B of weights "
                            f"< pq.min_bytes={cfg.min_bytes}, stays float (little to gain)")
                continue
            d = _default_block(layer, cfg)
            if layer.d_in % d:
                skip(layer, f"sub-vector length {d} does not divide the {layer.d_in} input features")
                continue
            k = min(cfg.centroids, layer.n_weights // d)
            dense = _dense_bytes(layer)
            pq_bytes = _pq_bytes(layer, d, k, dtype, layer.aware and cfg.bias_correct, _packed(layer, d, k, dtype, cfg))
            if pq_bytes >= dense:
                skip(layer, f"small layer: codes + codebook ({pq_bytes} B) would not save "
                            f"bytes over the dense weight ({dense} B)")
                continue
            todo.append((layer, d))
        return todo, skipped

    def plan(self, model, cfg):
        todo, skipped = self._scan(import_graph(model), cfg)
        return Plan(targets=[n.name for layer, _ in todo for n in layer.nodes], skipped=skipped)

    def _stats(self, ctx, layers, cfg, model_x):
        """({layer name: CrossMoments pooled over its readers}, {reader name: CrossMoments}): the
        input features (from ``model_x``) and the outputs in the reference model of every reader."""
        reqs = [layer_stats_request(n, "pq:" + n.name, n.inputs[0].name, n.outputs[0].name, positions=cfg.positions)
                for layer in layers for n in layer.nodes]
        if not reqs:
            return {}, {}
        got = ctx.collect(reqs, model_x=model_x, model_y=ctx.reference, desc="pq statistics")
        per_node = {}
        for layer in layers:
            fixed = not _bias_fit(layer, cfg)
            for n in layer.nodes:
                cm = got["pq:" + n.name]
                per_node[n.name] = _without_bias(cm, _fixed_bias(layer, n)) if fixed else cm
        return {layer.node.name: CrossMoments.pooled([per_node[n.name] for n in layer.nodes]) for layer in layers}, per_node

    def _layer_problem(self, layer, d, cm, cfg):
        """(target T* rows × d_in, metric H or None, bias refit or not, exact): what to quantize."""
        t = layer.matrix().astype(np.float64)
        if cm is None:
            return t, None, False, True
        node = layer.node
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        bias = _bias_fit(layer, cfg)
        n = max(cm.n, 1)
        if bias:
            h = cm.x.cov
            cxy = cm.xy / n - np.outer(cm.x.mean, cm.mean_y)
        else:
            h = cm.x.second
            cxy = cm.xy / n
        lam = cfg.damp * max(float(np.trace(h)) / len(h), 1e-12)
        hd = h + lam * np.eye(len(h))
        m = alpha * t.T
        exact = np.linalg.norm(cxy - h @ m) <= 1e-5 * max(np.linalg.norm(cxy), 1e-30)
        if cfg.sequential and cfg.aware and not exact:
            m = np.linalg.solve(hd, cxy + lam * m)
            t = m.T / alpha
        return t, hd, bias, exact

    def _refit_biases(self, layer, t_hat, cm, per_node):
        """b = E[y] − E[x̃]ᵀŴ: once from the pooled statistics for a bias all readers share,
        else per reader from its own."""
        node = layer.node
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        w = alpha * t_hat.T
        shared = _shared_bias(layer)
        if shared is not None:
            _write_shared_bias(layer, shared, cm.mean_y - cm.x.mean @ w)
            return
        for n in layer.nodes:
            target = _bias_target(layer, n)
            own = per_node.get(n.name, cm)
            if target is not None:
                _write_bias(layer, n, target, own.mean_y - own.x.mean @ w)

    def _candidates(self, layer, cfg):
        """(d, K) settings tried by the size search."""
        if layer.kernel > 1 and layer.node.op == "Conv":
            ds = [layer.kernel, int(layer.shape[-1]), 2 * layer.kernel]
        else:
            ds = [2, 4, 8, 16]
        ds = sorted({d for d in ds if layer.d_in % d == 0})
        ks = {min(cfg.centroids, 32), cfg.centroids}
        if cfg.bits != "8":
            ks.add(min(cfg.centroids, 16))  # 4-bit codes: half the bytes of the codes
        if cfg.bits == "4":
            ks = {min(cfg.centroids, 16)}
        ks = sorted(ks)
        return [(d, min(k, layer.n_weights // d)) for d in ds for k in ks if layer.n_weights // d > k]

    def _search(self, ctx, model, blocks, cfg, goal):
        """Per layer (d, K) or None (dense) minimising Σ relative output error subject to the
        serialized size ≤ goal: Lagrangian relaxation, bisection on λ. Errors are measured on the
        reference statistics with a quick quantization (few rounds)."""
        dtype = CODEBOOK_DTYPES[cfg.codebook_dtype]
        quick = PqConfig(block=cfg.block, centroids=cfg.centroids, codebook_dtype=cfg.codebook_dtype,
                         aware=cfg.aware, iters=min(cfg.iters, 2), kmeans_iters=min(cfg.kmeans_iters, 3),
                         gptq=cfg.gptq, refine=min(cfg.refine, 2), sequential=False, damp=cfg.damp,
                         positions=cfg.positions, bias_correct=cfg.bias_correct, bits=cfg.bits)
        layers = {n: b[0] for n, b in blocks.items()}
        aware = [l for l in layers.values() if l.aware and (cfg.aware or cfg.bias_correct)]
        stats = self._stats(ctx, aware, quick, ctx.reference)[0] if aware else {}
        options = {}
        bar = ctx.bar(total=len(layers), desc="pq size search")
        for name, layer in sorted(layers.items()):
            bar.update(0, postfix=name)
            refit = layer.aware and cfg.bias_correct
            opts = [(None, 0.0, _dense_bytes(layer))]
            t, h, _, _ = self._layer_problem(layer, 0, stats.get(name), quick)  # the same for every (d, K)
            for d, k in self._candidates(layer, cfg):
                rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])
                with ctx.timed("search"), deterministic():
                    cb, codes, t_hat = quantize(t, d, k, h if cfg.aware else None, quick, rng, dtype)
                err = output_error(t, t_hat, h) if h is not None else float(
                    ((t - t_hat) ** 2).sum() / max((t ** 2).sum(), 1e-30))
                # k, not len(cb): the final quantization may keep more centroids than this quick one
                opts.append(((d, k), err, _pq_bytes(layer, d, k, dtype, refit, _packed(layer, d, k, dtype, cfg))))
            options[name] = opts
            bar.update(1)
        bar.close()
        fixed = ctx.cost(model)["bytes"] - sum(o[0][2] for o in options.values())

        def pick(lam):
            choice = {n: min(o, key=lambda c: (c[1] + lam * c[2], c[2])) for n, o in options.items()}
            return choice, fixed + sum(c[2] for c in choice.values())

        lo, hi = 0.0, 1.0
        choice, size = pick(hi)
        while size > goal and hi < 1e12:
            hi *= 10
            choice, size = pick(hi)
        if size <= goal:
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                c, sz = pick(mid)
                if sz <= goal:
                    hi, choice, size = mid, c, sz
                else:
                    lo = mid
        chosen = {n: c[0] for n, c in choice.items()}
        search = {"goal_bytes": int(goal), "estimated_bytes": int(size),
                  "choice": {n: (list(c[0]) if c[0] else "dense") for n, c in choice.items()},
                  "estimated_rel_error": {n: round(c[1], 6) for n, c in choice.items()}}
        return chosen, search

    def apply(self, model, cfg, ctx):
        graph = import_graph(model)
        report = PassReport(self.name)
        todo, skipped = self._scan(graph, cfg)
        report.skipped.extend(skipped)
        dtype = CODEBOOK_DTYPES[cfg.codebook_dtype]
        blocks = {layer.node.name: (layer, d, min(cfg.centroids, layer.n_weights // d)) for layer, d in todo}
        use_stats = cfg.aware or cfg.bias_correct
        searched = "bytes" in ctx.goals and bool(blocks)
        if "bytes" in ctx.goals and blocks:
            chosen, search = self._search(ctx, model, blocks, cfg, ctx.goals["bytes"].target)
            report.details["size_search"] = search
            for name in sorted(blocks):
                if chosen[name] is None:
                    report.skip(name, "kept dense by the size budget (no other setting lowers the error for its bytes)")
                    del blocks[name]
                else:
                    blocks[name] = (blocks[name][0],) + chosen[name]
        if cfg.sequential and cfg.aware:
            levels = _merge_levels(shared_levels(graph, {n: [x.name for x in b[0].nodes] for n, b in blocks.items()}),
                                   cfg.rounds)
        else:
            levels = [sorted(blocks)]
        info_all = {}
        current = model
        runtime = {"before": _weight_bytes(graph), "decoded": 0, "stored": 0}
        file_before = ctx.cost(model)["bytes"]
        bar = ctx.bar(total=len(blocks), desc="pq")
        for level in levels:
            aware = [blocks[n][0] for n in level if blocks[n][0].aware and use_stats]
            stats, per_node = self._stats(ctx, aware, cfg, current) if aware else ({}, {})
            for name in level:
                layer, d, k = blocks[name]
                cm = stats.get(name)
                t, h, fit, exact = self._layer_problem(layer, d, cm, cfg)
                tq = time.perf_counter()
                budget = cfg.max_error if (cfg.max_error > 0 and not searched) else None
                tried = []
                for d_try in (_ladder(layer, d) if budget is not None else [d]):
                    k_try = min(k, layer.n_weights // d_try)
                    rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])
                    with ctx.timed("fit"), deterministic():
                        cb, codes, t_hat = quantize(t, d_try, k_try, h if cfg.aware else None, cfg, rng, dtype)
                    err = _rel_error(t, t_hat, h)
                    tried.append((d_try, len(cb), err))
                    if budget is None or err <= budget:
                        d = d_try
                        break
                seconds = time.perf_counter() - tq
                if budget is not None and tried[-1][2] > budget:
                    report.skip(name, "kept float: relative output error over pq.max_error=%g at every "
                                "setting tried (%s)" % (budget, ", ".join(f"d={a} K={b}: {e:.4g}" for a, b, e in tried)))
                    bar.update(1, postfix=f"{name}: float")
                    continue
                packed = _packed(layer, d, len(cb), dtype, cfg)
                if budget is not None and _pq_bytes(layer, d, len(cb), dtype, fit, packed) >= _dense_bytes(layer):
                    report.skip(name, f"kept float: the setting within pq.max_error (d={d} K={len(cb)}) "
                                      "would not save bytes")
                    bar.update(1, postfix=f"{name}: float")
                    continue
                t0 = layer.matrix().astype(np.float64)
                info = {"block": d, "centroids": int(len(cb)),
                        "metric": "activation" if (h is not None and cfg.aware) else "weights",
                        "rel_weight_error": round(float(((t0 - t_hat) ** 2).sum() / max((t0 ** 2).sum(), 1e-30)), 6)}
                if len(layer.nodes) > 1:
                    info["shared_by"] = [n.name for n in layer.nodes]
                    info["weight"] = layer.weight.name
                if h is not None:
                    info["rel_output_error"] = round(output_error(t, t_hat, h), 6)
                if len(tried) > 1:
                    info["tried"] = [{"block": a, "centroids": b, "rel_error": round(e, 6)} for a, b, e in tried]
                if fit:
                    self._refit_biases(layer, t_hat, cm, per_node)
                    info["bias_refit"] = True
                decoded = _decode(graph, layer, cb, codes, packed)
                for n in layer.nodes:
                    n.inputs[1] = decoded
                dense = layer.n_weights * layer.weight.values.dtype.itemsize
                stored = int((codes.size + 1) // 2 if packed else codes.nbytes) + int(cb.nbytes)
                runtime["decoded"] += dense
                runtime["stored"] += stored
                info["bits"] = 4 if packed else 8
                info["bytes"] = [dense, stored]
                info["seconds"] = round(seconds, 2)
                info_all[name] = info
                report.changed.extend(n.name for n in layer.nodes)
                bar.update(1, postfix=f"{name}: d={d} K={len(cb)}")
            if len(levels) > 1 and level is not levels[-1]:
                with ctx.timed("export"):
                    current = export_model(graph, like=model)
        bar.close()
        report.details["layers"] = info_all
        report.details["codebook_dtype"] = cfg.codebook_dtype
        with ctx.timed("export"):
            out = export_model(graph, like=model)
        after = _weight_bytes(import_graph(out), skip=".pq_codebook")
        report.details["memory"] = {
            "file_bytes": {"before": int(file_before), "after": int(ctx.cost(out)["bytes"])},
            "runtime_weight_bytes": {"before": int(runtime["before"]), "after": int(after + runtime["decoded"])},
            "note": ("ONNX Runtime folds the decode subgraphs at load: the weights it holds are the decoded "
                     "float tensors, as large as the original ones (runtime_weight_bytes); pq makes the file "
                     "smaller, not the resident memory"),
        }
        return out, report
