"""pq's view of a weight layer (``layers.WeightLayer``): every reader of one weight, quantized once,
and the order the weight's stored elements are cut into sub-vectors.

T (rows × d_in), row r the weights of output r, in the weight's storage order (the decode rebuilds
the stored tensor from T): Conv/ConvTranspose W.reshape(rows, −1) (a sub-vector of length k·k is one
kernel; a ConvTranspose's rows are its input channels: weight space, it has no statistics); Gemm
with transB=1: B; Gemm with transB=0 and MatMul: Bᵀ. For a group-1 Conv, a Gemm and a MatMul,
alpha·Tᵀ is ``WeightLayer.matrix()``, whose rows match the layer statistics ("aware").
A weight several nodes read (an unrolled RNN's time steps, tied matrices) is one layer over all of
them when they are alike. The bias rule, bias values and bias writes are ``WeightLayer``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ...layers import LAYER_OPS, WeightLayer, explicit_pads, float_weights, per_column_bias
from ...registry import Skip


@dataclass(eq=False)
class Layer:
    """A weight layer seen as T (rows × d_in); ``nodes``: every node that reads the weight (the
    first is ``layer``'s); they all read the one decoded tensor."""

    layer: WeightLayer
    nodes: list = field(default_factory=list)
    inner: bool = False   # its readers are inside a subgraph (If/Loop/Scan body): no statistics there
    outer_x: str | None = None   # inside a subgraph: a main-graph tensor holding its input (``target.outer_twin``)

    weight: gs.Constant = field(init=False)  # the weight as found (the readers then read its decode)

    def __post_init__(self):
        self.nodes = self.nodes or [self.layer.node]
        self.weight = self.layer.weight

    @property
    def node(self) -> gs.Node:
        return self.layer.node

    @property
    def shape(self):
        return tuple(self.weight.values.shape)

    @property
    def rows_of(self) -> str:
        """"natural" (T = W.reshape(rows, −1)) or "transpose" (T = Wᵀ)."""
        trans = self.node.op == "MatMul" or (self.node.op == "Gemm" and not self.node.attrs.get("transB", 0))
        return "transpose" if trans else "natural"

    @property
    def aware(self) -> bool:
        """The layer statistics give T's input covariance (group-1 Conv, Gemm, MatMul, outside
        subgraphs: a subgraph's tensors cannot be model outputs)."""
        if self.inner:
            return False
        return self.node.op in ("Gemm", "MatMul") or (self.node.op == "Conv" and self.layer.group == 1)

    @property
    def kernel(self) -> int:
        """k·k of a Conv/ConvTranspose kernel, 1 otherwise."""
        return int(np.prod(self.shape[2:])) if len(self.shape) > 2 else 1

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

    @property
    def alpha(self) -> float:
        """Gemm's alpha (the product the layer computes is alpha · x W), 1 otherwise."""
        return float(self.node.attrs.get("alpha", 1.0)) if self.node.op == "Gemm" else 1.0

    def reader(self, node: gs.Node) -> WeightLayer:
        """The WeightLayer of one reader."""
        return self.layer if node is self.node else WeightLayer(node, self.layer.graph)


@dataclass(eq=False)
class Table:
    """A float constant that data-movement nodes read (an embedding table a Gather looks rows up
    in, a positional-encoding table a Slice cuts): no product with an input, so no statistics;
    quantized in weight space like a ConvTranspose. T = W.reshape(−1, last dimension) (a 1-D
    table: one row); the decode rebuilds W in its shape, and every reader reads it."""

    weight: gs.Constant
    nodes: list

    rows_of = "natural"
    aware = False
    inner = False
    outer_x = None
    kernel = 1
    alpha = 1.0

    @property
    def node(self) -> gs.Node:
        return self.nodes[0]

    @property
    def shape(self):
        return tuple(self.weight.values.shape)

    def matrix(self) -> np.ndarray:
        w = self.weight.values
        return w.reshape(-1, w.shape[-1]) if w.ndim > 1 else w.reshape(1, -1)

    @property
    def d_in(self):
        return self.matrix().shape[1]

    @property
    def n_weights(self):
        return int(self.weight.values.size)


# op → the input that holds the table; Reshape: a positional-encoding table reshaped before it is
# interpolated or added (vit_focus: 1369 × 384 positions, 2.1 MB, 2 % of the file)
TABLE_READERS = {"Gather": 0, "Slice": 0, "Reshape": 0}


def tables(graph: gs.Graph, taken: set) -> list:
    """The float constants (other than the weights in ``taken``, by id) that only Gather, Slice
    and Reshape (as their data) read, and that are no graph output: one Table each."""
    outs = {t.name for t in graph.outputs}
    found = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or id(t) in taken or t.name in outs or not t.outputs:
            continue
        if not np.issubdtype(t.values.dtype, np.floating) or t.values.size < 2:
            continue
        if all(n.op in TABLE_READERS and len(n.inputs) > TABLE_READERS[n.op]
               and n.inputs[TABLE_READERS[n.op]] is t
               and sum(x is t for x in n.inputs) == 1 for n in t.outputs):
            found.append(Table(t, list(t.outputs)))
    return found


# ----------------------------------------------------------------------------- finding layers
def _not_an_output(layer: WeightLayer) -> str | None:
    outs = {t.name for t in layer.graph.outputs} if layer.graph is not None else set()
    return "weights are a graph output" if layer.weight.name in outs else None


def _read_once(layer: WeightLayer) -> str | None:
    w = layer.weight
    return "the weight is also another input of the node" if any(
        t is w for i, t in enumerate(layer.node.inputs) if i != 1) else None


CHECKS = (float_weights, _not_an_output, _read_once, explicit_pads, per_column_bias)


def layer_of(node: gs.Node, graph: gs.Graph) -> tuple[Layer | None, str | None]:
    """(the node's layer, None), or (None, why it cannot be quantized), or (None, None) for a
    node that is not a weight layer."""
    if node.op not in LAYER_OPS:
        return None, None
    found = WeightLayer.of(node, graph, *CHECKS)
    if isinstance(found, Skip):
        return None, found.reason
    return Layer(found), None


def shared_layer(layer: Layer) -> tuple[Layer | None, str | None]:
    """The layer of a weight several nodes read: one Layer over all of them when every reader is a
    weight layer of the same kind and layout (the same matrix view, so their input statistics
    pool), else None and why."""
    readers = layer.layer.shared
    for n in readers:
        other, reason = layer_of(n, layer.layer.graph)
        if other is None:
            return None, (f"weights shared by {len(readers)} nodes, one of them {n.name} ({n.op}) "
                          f"{'is not a weight layer' if reason is None else 'cannot be rewritten: ' + reason}")
        if (n.op, other.rows_of, other.aware) != (layer.node.op, layer.rows_of, layer.aware) or \
                (n.op == "Gemm" and other.alpha != layer.alpha):
            return None, (f"weights shared by {len(readers)} nodes of different kinds or layouts "
                          f"({layer.node.name} {layer.node.op}, {n.name} {n.op})")
    return Layer(layer.layer, readers, layer.inner), None


def subgraph_nodes(graph: gs.Graph):
    """(node, its subgraph) for every node inside the subgraphs (If branches, Loop/Scan bodies)
    of ``graph``'s nodes, at any depth."""
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in (value if isinstance(value, list) else [value]):
                if isinstance(sub, gs.Graph):
                    for n in sub.nodes:
                        yield n, sub
                    yield from subgraph_nodes(sub)


# ----------------------------------------------------------------------------- sub-vector lengths
def default_block(layer: Layer, cfg) -> int:
    """The sub-vector length d: ``pq.block``, else a Conv kernel of up to 16 taps, else 4, 8 or 2
    (the first that divides d_in), else 1."""
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


def ladder(layer: Layer, d: int, k: int, cfg) -> list:
    """(d, K) settings tried in turn under pq.max_error, fewest bytes first (before a Log, with
    pq.bits auto, only 8-bit scalar codes, ``before_log``): the default (d, K),
    shorter sub-vectors (a Conv kernel row or half the length, 2), pairs with 64 centroids (3 bits
    a weight, layers with statistics, pq.bits auto), scalar codes with 16 centroids (4 bits a
    weight, packed two a byte), with 32 (5⅓ bits, six in four bytes; pq.bits auto), with 64 (6 bits,
    four in three bytes; pq.bits 6 or auto) and with K (8 bits a weight). The first within the
    budget is kept."""
    from .sizes import setting_bytes
    if cfg.bits == "auto" and k > 64 and before_log(layer):
        # before a Log only 8-bit scalar codes: fewer bits move the quiet values the log spreads out
        # (oww_melspec's mel MatMul at 4-bit, within pq.max_error: 1 - worst rel. L2 0.976 -> 0.736)
        return [(1, min(k, layer.n_weights))]
    ds = [d]
    if layer.kernel > 1 and d == layer.kernel and 1 < int(layer.shape[-1]) < d:
        ds.append(int(layer.shape[-1]))
    elif d > 2 and layer.d_in % (d // 2) == 0:
        ds.append(d // 2)
    if ds[-1] > 2 and layer.d_in % 2 == 0:
        ds.append(2)  # 4 bits a weight with 256 centroids
    if ds[-1] > 1:
        ds.append(1)
    settings = [(x, min(k, layer.n_weights // x)) for x in ds]
    if cfg.bits != "8" and k > 16:
        settings.append((1, min(16, layer.n_weights)))  # 4-bit scalar codes: a small codebook
    if k > 64 and (cfg.bits == "6" or (cfg.bits == "auto" and not before_log(layer) and six_bit_saves(layer, cfg))):
        # 6-bit scalar codes (once kept out of the per-layer rule: oww_embedding's worst cosine fell
        # to 0.949, from the sequential targets fitted on too few rows, ``target.ROWS_PER_FEATURE``;
        # with W as their target there it is 0.9995 at file 0.249)
        settings.append((1, min(64, layer.n_weights)))
        if six_bit_saves(layer, cfg, 5):
            # 5-bit scalar codes (six in four bytes): a sixth fewer code bytes than 6-bit ones, at
            # about four times their error (captcha_crnn's 3x3 Convs: 16 centroids err 8e-4, 64 5e-5)
            settings.append((1, min(32, layer.n_weights)))
    if (layer.aware or layer.outer_x) and cfg.bits == "auto" and k > 64 and layer.d_in % 2 == 0 \
            and not before_log(layer):
        # pairs in packed codes, between 4-bit scalar codes and 4-long sub-vectors: 3 bits a weight
        # (64 centroids, 6-bit codes; mtcnn_onet's 1152 x 256 Dense within 3e-4 there: 147 -> 111 KB)
        # and, for the allocation only, 2 (16 centroids, 4-bit codes; within 3e-4 on no zoo layer)
        if six_bit_saves(layer, cfg):
            # (not with 32 centroids in 5-bit codes, 2⅔ bits: mtcnn_onet's Dense, captcha_crnn's
            # forward LSTM Gemm and oww_hey_jarvis's first Gemm erred 2.0–7.4 times their 3-bit error,
            # over the budget each time, and a fit of captcha_crnn's 6.5 MB Gemm is costly)
            settings += [(2, min(64, layer.n_weights // 2))]
        if cfg.allocate:
            settings += [(2, min(16, layer.n_weights // 2))]
    settings = list(dict.fromkeys(settings))
    order = {s: i for i, s in enumerate(settings)}
    return sorted(settings, key=lambda s: (setting_bytes(layer, s[0], s[1], cfg), order[s]))


def six_bit_saves(layer, cfg, bits: int = 6) -> bool:
    """Whether 2^bits (64; 32 with ``bits`` 5) centroids would be stored as packed ``bits``-bit
    codes (``sizes.code_width``): on a tiny layer the decode of packed codes costs more than it
    saves, and 64 centroids in one-byte codes save only the codebook's bytes (mtcnn_pnet: 2 % of
    its file, box recall 0.985 → 0.956)."""
    from .sizes import code_width
    return code_width(layer, 1, min(1 << bits, layer.n_weights), cfg.dtype, cfg) == bits


def before_log(layer, limit: int = 16) -> bool:
    """Whether the layer's outputs reach a Log within the ``limit`` nodes nearest downstream, with
    no other weight layer (a Conv, Gemm or MatMul with a constant weight) between: a log spectrum
    turns the relative error of quiet values into a large absolute one, which the relative output
    error of the layer does not see (oww_melspec: its STFT Convs, then power, mel MatMul, Clip, Log;
    the mel MatMul at 4-bit codes, within pq.max_error: 1 − worst rel. L2 0.976 → 0.736). A weight
    layer between sums the noise over its inputs: the STFT Convs at 6-bit codes keep the task
    (1 − worst rel. L2 0.9965, range error 0.04; measured since their sequential targets left the
    mel MatMul alone, ``target.MIN_REFIT_CHANGE``)."""
    seen, todo = set(), [t for n in layer.nodes for t in n.outputs]
    while todo and len(seen) < limit:
        for node in todo.pop(0).outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Log":
                return True
            if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 \
                    and isinstance(node.inputs[1], gs.Constant):
                continue   # a weight layer: its own ladder answers for the Log
            todo.extend(node.outputs)
    return False


def candidates(layer: Layer, cfg) -> list:
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


# ----------------------------------------------------------------------------- which biases the refit writes
def own_bias(layer: Layer, node: gs.Node) -> bool:
    """Whether the refit writes ``node``'s bias on its own: a Conv's or Gemm's input 2 (a Gemm's
    only when beta ≠ 0 and no other node reads it), a MatMul's ``bias_add``."""
    if node.op == "Conv":
        return True
    if node.op == "Gemm":
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return node.attrs.get("beta", 1.0) != 0 and (c is None or len(c.outputs) == 1)
    if node.op == "MatMul":
        return layer.reader(node).bias_add is not None
    return False


def shared_bias(layer: Layer):
    """The bias constant of a shared-weight layer when every reader of the weight reads that one
    bias (Conv/Gemm input 2, same Gemm beta) and nothing else reads it: it is refit once, from the
    pooled statistics. None otherwise (each reader's bias is refit on its own)."""
    if len(layer.nodes) < 2 or layer.node.op not in ("Conv", "Gemm"):
        return None
    first = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
    if not isinstance(first, gs.Constant):
        return None
    beta = layer.node.attrs.get("beta", 1.0)
    if beta == 0 or any(len(n.inputs) < 3 or n.inputs[2] is not first or n.attrs.get("beta", 1.0) != beta
                        for n in layer.nodes):
        return None
    if {id(n) for n in first.outputs} != {id(n) for n in layer.nodes}:
        return None
    return first


def bias_fit(layer: Layer, cfg) -> bool:
    """Whether the layer's output shift can be absorbed into a bias (of some reader)."""
    if not cfg.bias_correct:
        return False
    return shared_bias(layer) is not None or any(own_bias(layer, n) for n in layer.nodes)


def fixed_bias(layer: Layer, node: gs.Node):
    """The constant bias a Conv/Gemm adds to its product (d_out), or None (a MatMul's Add is not
    part of its output)."""
    return layer.reader(node).bias() if node.op in ("Conv", "Gemm") else None
