"""Channel coupling: which tensors must lose the same channels when filters are removed.

Removing output channel c of a weight layer (Conv filter, Gemm/MatMul neuron) removes channel c
from every tensor it flows into, up to the weight layers that consume it. Each source channel is a
*component*; components are tied (union–find) where two tensors must lose channels together:

    y = f(x) channel-wise          (BN, activations, per-channel constants, pooling, depthwise
                                   Conv, Dropout/Identity, Transpose/Squeeze axis moves)
    y = a ⊕ b, both computed        (residual Add / SE Mul): comp(a)[i] ≡ comp(b)[i]
    y = Concat(a, b) on channels    comp(y) = comp(a) ‖ comp(b)        (offsets)
    y = Split/Slice on channels     comp(y) = comp(x)[s:e]
    y = Flatten/Reshape(x) → (N, C·S)   comp(y) = repeat(comp(x), S)   (H·W column blocks)
    y = Pad(x) on channels (constant)   comp(y) = fixed ‖ comp(x) ‖ fixed  (fixed: pinned)
    y = Reshape(x) (…, d) → (…, h, dh)  a head's dh columns are one component; comp(y) = heads
    y = A @ B, channels on a batch axis comp(A) ≡ comp(B) (attention heads: Q·Kᵀ, scores·V)
    y = scores ⊕ m, m computed over the heads   m is indexed to the kept heads (a mask)
    y = Reshape(x) (…, k·d) → (…, k, d), the k axis only Gathered  (packed Q/K/V: in_proj)
                                    comp(x)[j·d + c] ≡ comp(x)[c]; comp(y) = comp(x)[:d]
    y = Gather(x) on another axis   comp(y) = comp(x)
    y = grouped Conv(x), G groups       a group's input channels are one component, its outputs
                                        repeat it (channels go by whole groups)

A *group* is a connected set of sources (weight layers whose output channels are created by a
weight matrix) and their components: every tensor and parameter that carries them must lose the
same channels. A group is *pinned* (left whole) when any of its channels reaches a graph output or
an op the analysis does not understand, or when a tensor carrying them is read inside an
If/Loop/Scan body (those are not analysed); each pin names the node and the reason. This is the
dependency-graph idea of structured pruning (e.g. DepGraph, Fang et al. 2023) specialised to ONNX.

Use::

    an = analyze(model, sample_shapes)        # ChannelAnalysis
    for g in an.groups: g.size, g.pinned, g.pins, g.sources, g.consumers, g.observations
    pruned = an.prune(model, {g.index: kept_indices})   # every coupled tensor rewritten
    an.output_mask(node_name, keep)           # which output channels of a source survive
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import concrete_input_shapes, export_model, import_graph, infer_shapes, opset
from .layers import WeightLayer

UNARY = {
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Tanh", "Erf", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast",
}
POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceProd",
          "ReduceLogSumExp", "ReduceSumSquare"}


@dataclass
class Pin:
    """Why a group is left whole: the node where its channels meet something that cannot lose them."""
    node: str
    reason: str


@dataclass
class Source:
    """A node whose output channels are created by weights (or an opaque, pinned origin)."""
    node: str
    op: str
    tensor: str
    comps: np.ndarray
    prunable: bool = True


@dataclass
class Observation:
    """A tensor whose responses describe some of a group's channels: ``positions`` along its
    channel axis hold the group's channels ``indices``; ``reduce`` is the stats reduction."""
    tensor: str
    reduce: str
    positions: np.ndarray
    indices: np.ndarray


@dataclass
class Group:
    index: int
    classes: np.ndarray                      # component roots, in the group's channel order
    sources: list = field(default_factory=list)
    consumers: list = field(default_factory=list)   # weight layers whose input columns shrink
    observations: list = field(default_factory=list)
    pins: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def pinned(self) -> bool:
        return bool(self.pins) or not any(s.prunable for s in self.sources)

    @property
    def name(self) -> str:
        return "+".join(s.node for s in self.sources)


@dataclass
class _Map:
    """A tracked tensor: channel axis (non-negative), rank, component per channel position."""
    axis: int
    rank: int
    comps: np.ndarray
    origin: tuple | None = None   # (tensor, _Map) before a Flatten/Reshape, for responses
    heads: bool = False           # attention scores: the channels are heads on a batch axis


class _UF:
    """Components (channel positions) and the ties between them, recorded as they are found and
    joined once at the end (``roots``): the classes are the connected components of the ties, each
    named by its smallest component (what a union-find that links the larger root under the
    smaller one gives, whatever the order of the unions)."""

    def __init__(self):
        self.count = 0
        self._a: list = []
        self._b: list = []

    def new(self, n: int) -> np.ndarray:
        start = self.count
        self.count += int(n)
        return np.arange(start, start + n, dtype=np.int64)

    def tie(self, a, b) -> None:
        """Tie component ``a[i]`` to ``b[i]`` for every i (arrays of the same length)."""
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        b = np.asarray(b, dtype=np.int64).reshape(-1)
        if len(a):
            self._a.append(a)
            self._b.append(b)

    def roots(self) -> np.ndarray:
        """The smallest component of each component's class (int64, one per component)."""
        return _class_minimum(self.count, self._a, self._b)


def _class_minimum(n: int, a: list, b: list) -> np.ndarray:
    """For each of ``n`` nodes, the smallest node of its connected component under the edges
    (a[k][i], b[k][i])."""
    idx = np.arange(n, dtype=np.int64)
    if n == 0 or not a:
        return idx
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    ea, eb = np.concatenate(a), np.concatenate(b)
    adj = coo_matrix((np.ones(len(ea), dtype=np.int8), (ea, eb)), shape=(n, n))
    _, labels = connected_components(adj, directed=False)
    low = np.full(int(labels.max()) + 1, n, dtype=np.int64)
    np.minimum.at(low, labels, idx)
    return low[labels]


def _ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def _no_ones(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def _axes(node):
    """The axes of a Squeeze/Unsqueeze/Reduce*: from the input (opset ≥ 13/18) or the attribute."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = _const(node.inputs[1])
        if v is None:
            raise _Unsupported(f"{node.op} with computed axes")
        return _ints(v)
    return _ints(node.attrs.get("axes", []))


def _subgraphs(node):
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (g for g in v if isinstance(g, gs.Graph))


def _outer_reads(node) -> set:
    """Names of the tensors that ``node``'s subgraphs (recursively) read from an enclosing scope."""
    reads = set()
    for g in _subgraphs(node):
        local = {t.name for t in g.inputs}
        for n in g.nodes:
            local.update(o.name for o in n.outputs)
        inner = set()
        for n in g.nodes:
            inner.update(t.name for t in n.inputs if t.name and not isinstance(t, gs.Constant))
            inner |= _outer_reads(n)
        inner.update(t.name for t in g.outputs if not isinstance(t, gs.Constant))
        reads |= inner - local
    return reads


def _const(t):
    return t.values if isinstance(t, gs.Constant) else None


# ----------------------------------------------------------------------------- edits
def _replace_const(node: gs.Node, idx: int, values: np.ndarray) -> None:
    old = node.inputs[idx]
    shared = len(old.outputs) > 1
    name = f"{old.name}__{node.name}" if shared else old.name
    node.inputs[idx] = gs.Constant(name, np.ascontiguousarray(values.astype(old.values.dtype, copy=False)))


def _slice_input(node, idx, axis, mask):
    if idx >= len(node.inputs) or not isinstance(node.inputs[idx], gs.Constant):
        return
    v = node.inputs[idx].values
    if mask.all() or v.ndim == 0 or v.shape[axis] != len(mask):
        return
    _replace_const(node, idx, np.compress(mask, v, axis=axis))


@dataclass
class _Edit:
    kind: str          # out | in | param | depthwise | grouped | split | slice | reshape | dim | gather
    node: str
    comps: object      # np.ndarray, or a list of arrays (split)
    idx: int = 0
    axis: int = 0
    extra: tuple = ()
    path: tuple = ()   # reshape: nodes from the Reshape's target down to ``node``, copied per reader if shared
    reader: str = ""   # reshape: the Reshape whose target this edit rewrites

    def apply(self, node: gs.Node, alive: np.ndarray, ops: int) -> None:
        k = self.kind
        if k == "split":
            sizes = [int(alive[c].sum()) for c in self.comps]
            if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                _replace_const(node, 1, np.asarray(sizes, np.int64))
            elif ops >= 13:   # sizes as the second input (replacing an omitted one), not num_outputs
                node.attrs.pop("num_outputs", None)
                while len(node.inputs) > 1:
                    node.inputs.pop()
                node.inputs.append(gs.Constant(node.name + "_split", np.asarray(sizes, np.int64)))
            else:
                node.attrs["split"] = sizes
            return
        mask = alive[self.comps]
        if k == "grouped":
            if mask.all():
                return
            _slice_input(node, 1, 0, alive[self.extra[0]] if self.extra[1] else mask)
            _slice_input(node, 2, 0, mask)
            node.attrs["group"] = int(mask.sum()) // self.idx
            return
        if k == "slice":
            start, stop = self.extra
            new_start = int(mask[:start].sum())
            new_stop = new_start + int(mask[start:stop].sum())
            for inp, val in ((1, new_start), (2, new_stop)):
                v = node.inputs[inp].values.copy()
                v[self.idx] = val
                _replace_const(node, inp, v)
            return
        if k in ("reshape", "dim"):   # a shape constant's entry for the channel axis
            at = self.extra[0] if self.extra else 1
            v = node.inputs[at].values.copy()
            v.reshape(-1)[self.idx] = int(mask.sum())
            _replace_const(node, at, v)
            return
        if mask.all():
            return
        if k == "param":
            _slice_input(node, self.idx, self.axis, mask)
        elif k == "depthwise":
            _slice_input(node, 1, 0, mask)
            _slice_input(node, 2, 0, mask)
            node.attrs["group"] = int(mask.sum())
        elif k == "out":
            if node.op == "ConvTranspose":
                _slice_input(node, 1, 1, mask)
                _slice_input(node, 2, 0, mask)
            elif node.op == "Conv":
                _slice_input(node, 1, 0, mask)
                _slice_input(node, 2, 0, mask)
            elif node.op == "Gemm":
                _slice_input(node, 1, 0 if node.attrs.get("transB", 0) else 1, mask)
                if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.ndim:
                    _slice_input(node, 2, node.inputs[2].values.ndim - 1, mask)
            else:  # MatMul
                _slice_input(node, 1, node.inputs[1].values.ndim - 1, mask)
        elif k == "in":
            if node.op == "ConvTranspose":
                _slice_input(node, 1, 0, mask)
            elif node.op == "Conv":
                _slice_input(node, 1, 1, mask)
            elif node.op == "Gemm":
                _slice_input(node, 1, 1 if node.attrs.get("transB", 0) else 0, mask)
            else:
                _slice_input(node, 1, node.inputs[1].values.ndim - 2, mask)


def _own_paths(graph: gs.Graph, nodes: dict, edits: list, alive: np.ndarray) -> list:
    """Edits of a Reshape target reached through nodes that other readers share (one ``Concat`` of
    shape dims read by the Q, K and V Reshapes of several layers, a head count ``Mul`` also read by a
    mask's Reshape): each reader gets its own copy of that path, so that readers of different groups
    are rewritten apart (a group that keeps all its channels writes the same values: no copy).
    Returns the edits, re-pointed at the copies."""
    copies: dict = {}
    out = []
    for e in edits:
        if not e.path or alive[e.comps].all():
            out.append(e)
            continue
        prev = nodes[e.reader]
        for name in e.path:
            key = (e.reader, name)
            if key not in copies:
                pn = nodes[name]
                t = pn.outputs[0]
                if len(t.outputs) > 1:   # read by others too: this reader's own copy
                    cp = gs.Node(pn.op, name=f"{pn.name}__{e.reader}", attrs=dict(pn.attrs), inputs=list(pn.inputs),
                                 outputs=[gs.Variable(f"{t.name}__{e.reader}", dtype=t.dtype)])
                    graph.nodes.append(cp)
                    nodes[cp.name] = cp
                    for k, i in enumerate(prev.inputs):
                        if i is t:
                            prev.inputs[k] = cp.outputs[0]
                    pn = cp
                copies[key] = pn
            prev = copies[key]
        out.append(_Edit(e.kind, prev.name, e.comps, e.idx, e.axis, e.extra))
    return out


def _gather_inputs(graph: gs.Graph, nodes: dict, edits: list, alive: np.ndarray) -> list:
    """``gather`` edits: a computed operand broadcast over the heads (an attention mask expanded to
    the head count) is indexed to the kept heads by a Gather inserted before the node. Returns the
    other edits."""
    rest = []
    for e in edits:
        if e.kind != "gather":
            rest.append(e)
            continue
        mask = alive[e.comps]
        if mask.all():
            continue
        node = nodes[e.node]
        t = node.inputs[e.idx]
        idx = gs.Constant(f"{node.name}_heads{e.idx}", np.nonzero(mask)[0].astype(np.int64))
        y = gs.Variable(f"{t.name}__{node.name}", dtype=t.dtype)
        graph.nodes.append(gs.Node("Gather", name=f"{node.name}_gather{e.idx}", attrs={"axis": int(e.axis)},
                                   inputs=[t, idx], outputs=[y]))
        node.inputs[e.idx] = y
    return rest


# ----------------------------------------------------------------------------- analysis
class ChannelAnalysis:
    """The coupling groups of a model and the edits that remove channels from them."""

    def __init__(self, model: onnx.ModelProto, sample_shapes: dict | None = None):
        self.opset = opset(model)
        self.info = infer_shapes(model, concrete_input_shapes(model, sample_shapes, batch=1))
        self.uf = _UF()
        self.sources: list[Source] = []
        self.edits: list[_Edit] = []
        self.comp_pins: dict[int, list[Pin]] = {}
        self.consumer_obs: list[tuple[str, str, _Map]] = []   # (consumer node, observed tensor, map)
        self._run(import_graph(model))
        self._finish()

    # -- helpers
    def _shape(self, t):
        if isinstance(t, gs.Constant):
            return tuple(t.values.shape)
        return self.info.get(t.name, (None, None))[0]

    def _rank(self, t, default=None):
        s = self._shape(t)
        return len(s) if s is not None else default

    def pin(self, m: _Map | None, node, reason: str) -> None:
        if m is None:
            return
        name = getattr(node, "name", node)
        for c in np.unique(m.comps):
            self.comp_pins.setdefault(int(c), []).append(Pin(name, reason))

    def _source(self, node, tensor, n, rank, axis, prunable=True, reason=None) -> _Map:
        comps = self.uf.new(n)
        self.sources.append(Source(node.name, node.op, tensor.name, comps, prunable))
        m = _Map(axis, rank, comps)
        if prunable:
            self.edits.append(_Edit("out", node.name, comps))
        else:
            self.pin(m, node, reason or f"{node.op} output channels cannot be removed")
        return m

    def _tie(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.tie(a, b)

    def _tie_parts(self, comps: np.ndarray, k: int) -> np.ndarray:
        """Column c of each of the ``k`` equal parts of ``comps`` goes with the first part's (packed
        Q/K/V); returns the first part."""
        d = len(comps) // k
        for j in range(1, k):
            self._tie(comps[:d], comps[j * d:(j + 1) * d])
        return comps[:d]

    def _tie_heads(self, comps: np.ndarray, dh: int) -> np.ndarray:
        """A head's ``dh`` consecutive columns go together; returns one component per head."""
        for j in range(len(comps) // dh):
            self._tie(np.full(dh - 1, comps[j * dh]), comps[j * dh + 1:(j + 1) * dh])
        return comps[::dh]

    # -- propagation
    def _run(self, graph: gs.Graph) -> None:
        graph.toposort()
        self.tmap: dict[str, _Map] = {}
        for node in graph.nodes:
            tracked = [(i, self.tmap[t.name]) for i, t in enumerate(node.inputs)
                       if not isinstance(t, gs.Constant) and t.name in self.tmap]
            if not tracked and node.op not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                continue
            try:
                handler = self._handler(node.op)
                handler(node, tracked)
            except _Unsupported as e:
                for _, m in tracked:
                    self.pin(m, node, str(e))
                for o in node.outputs:
                    self.tmap.pop(o.name, None)
        for t in graph.outputs:
            if t.name in self.tmap:
                prod = t.inputs[0].name if t.inputs else t.name
                self.pin(self.tmap[t.name], prod, f"channels reach graph output '{t.name}'")
        for node in graph.nodes:   # If/Loop/Scan bodies read main-graph tensors through outer scope
            for name in sorted(_outer_reads(node)):
                if name in self.tmap:
                    self.pin(self.tmap[name], node,
                             f"'{name}' is read inside a {node.op} subgraph (not analysed)")

    def _handler(self, op):
        if op in ("Conv", "Gemm", "MatMul"):
            return getattr(self, "_" + op.lower())
        if op == "Clip":
            return self._clip
        if op in UNARY:
            return self._unary
        if op in POOL:
            return self._pool
        if op in ELEMENTWISE:
            return self._elementwise
        table = {"BatchNormalization": self._bn, "InstanceNormalization": self._bn, "Concat": self._concat,
                 "Split": self._split, "Slice": self._slice, "Flatten": self._flatten, "Reshape": self._reshape,
                 "Transpose": self._transpose, "Squeeze": self._squeeze, "Unsqueeze": self._squeeze,
                 "Softmax": self._axis_op, "LogSoftmax": self._axis_op, "LayerNormalization": self._layernorm,
                 "Pad": self._pad, "Resize": self._resize, "Upsample": self._resize, "Shape": self._shape_of,
                 "Size": self._shape_of, "ConvTranspose": self._conv_transpose,
                 "GroupNormalization": self._groupnorm, "Gather": self._gather, "Expand": self._expand}
        if op in table:
            return table[op]
        if op in REDUCE:
            return self._reduce
        return self._unknown

    def _unknown(self, node, tracked):
        if tracked:
            raise _Unsupported(f"{node.op} is not understood by the channel analysis")

    def _set(self, node, m: _Map, k=0):
        self.tmap[node.outputs[k].name] = m

    def _one(self, node, tracked, at=0):
        if len(tracked) != 1 or tracked[0][0] != at:
            raise _Unsupported(f"{node.op} with channels on input {[i for i, _ in tracked]}")
        return tracked[0][1]

    def _unary(self, node, tracked):
        m = self._one(node, tracked)
        for t in node.inputs[1:]:
            if not isinstance(t, gs.Constant) and t.name:
                raise _Unsupported(f"{node.op} with a computed parameter")
        self._set(node, _Map(m.axis, m.rank, m.comps))

    def _clip(self, node, tracked):
        m = self._one(node, tracked)
        for t in node.inputs[1:]:   # min/max: constants (opset ≥ 11 inputs), or per-sample scalars
            if t.name and not isinstance(t, gs.Constant) and self._rank(t) != 0:
                raise _Unsupported("Clip with a computed non-scalar bound")
            if isinstance(t, gs.Constant) and t.values.size != 1:
                raise _Unsupported("Clip with a non-scalar bound")
        self._set(node, _Map(m.axis, m.rank, m.comps))

    def _shape_of(self, node, tracked):
        """Shape/Size read the (pruned) tensor at run time: nothing to rewrite, nothing tracked."""
        return

    def _pad(self, node, tracked):
        """Spatial pads leave channels alone; constant pads on the channel axis add fixed channels
        around the tracked ones (their own, pinned, components)."""
        m = self._one(node, tracked)
        if len(node.inputs) > 1 and node.inputs[1].name:
            pads = _const(node.inputs[1])
            if pads is None:
                raise _Unsupported("Pad with computed pads")
            pads = _ints(pads)
        else:
            pads = _ints(node.attrs.get("pads", []))
        axes = list(range(m.rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            a = _const(node.inputs[3])
            if a is None:
                raise _Unsupported("Pad with computed axes")
            axes = [x + m.rank if x < 0 else x for x in _ints(a)]
        if len(pads) != 2 * len(axes):
            raise _Unsupported("Pad with pads that do not match its axes")
        begin = dict(zip(axes, pads[:len(axes)]))
        end = dict(zip(axes, pads[len(axes):]))
        lo, hi = begin.get(m.axis, 0), end.get(m.axis, 0)
        if lo == 0 and hi == 0:
            self._set(node, _Map(m.axis, m.rank, m.comps))
            return
        if node.attrs.get("mode", "constant") not in ("constant", b"constant") or lo < 0 or hi < 0:
            raise _Unsupported("Pad that copies or crops channels (reflect/edge or negative pads on the channel axis)")
        parts = [self._source(node, gs.Variable(f"{node.name}:pad{k}"), n, m.rank, m.axis, prunable=False,
                              reason="Pad's constant channels cannot be removed").comps
                 for k, n in enumerate((lo, hi))]
        self._set(node, _Map(m.axis, m.rank, np.concatenate([parts[0], m.comps, parts[1]])))

    def _reads_own_shape(self, t, pos, m: _Map, depth=0) -> bool:
        """True when entry ``pos`` of the 1-D int tensor ``t`` is computed from ``Shape`` of a
        tensor carrying the same channels (PyTorch: sizes = Concat(Shape(x)[:2], spatial)): it
        follows the pruned tensor at run time."""
        if depth > 8 or isinstance(t, gs.Constant) or not t.inputs:
            return False
        p = t.inputs[0]
        if p.op == "Shape":
            src = self.tmap.get(p.inputs[0].name)
            start = int(p.attrs.get("start", 0))
            return src is not None and np.array_equal(src.comps, m.comps) and pos + start == src.axis
        if p.op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return self._reads_own_shape(p.inputs[0], pos, m, depth + 1)
        if p.op == "Concat":
            off = 0
            for i in p.inputs:
                shp = self._shape(i)
                if shp is None or len(shp) != 1 or shp[0] is None:
                    return False
                if pos < off + shp[0]:
                    return self._reads_own_shape(i, pos - off, m, depth + 1)
                off += shp[0]
            return False
        if p.op == "Slice":
            starts, axes = _const(p.inputs[1]), _const(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3].name else None
            steps = _const(p.inputs[4]) if len(p.inputs) > 4 and p.inputs[4].name else None
            if starts is None or (axes is not None and _ints(axes) != [0]) or (steps is not None and _ints(steps) != [1]):
                return False
            start = _ints(starts)[0]
            if start < 0:   # from the end (INT64_MIN: from the start, as torch.dynamo writes [:-2])
                n = self._shape(p.inputs[0])
                if n is None or len(n) != 1 or n[0] is None:
                    return False
                start = max(start + n[0], 0)
            return self._reads_own_shape(p.inputs[0], pos + start, m, depth + 1)
        if p.op == "Gather":
            idx = _const(p.inputs[1])
            if idx is None or int(p.attrs.get("axis", 0)) != 0:
                return False
            idx = np.asarray(idx).reshape(-1)
            return pos < len(idx) and idx[pos] >= 0 and self._reads_own_shape(p.inputs[0], int(idx[pos]), m, depth + 1)
        return False

    def _resize(self, node, tracked):
        """Resize/Upsample over spatial axes: the channel axis must keep its size (scale 1, or a
        ``sizes`` entry that is a constant, which is rewritten, or read from the tensor's Shape)."""
        m = self._one(node, tracked)
        n = len(m.comps)
        axes = node.attrs.get("axes")
        if axes is not None:   # opset ≥ 18: scales/sizes only for these axes
            if m.axis not in [a + m.rank if a < 0 else a for a in _ints(axes)]:
                self._set(node, _Map(m.axis, m.rank, m.comps))
                return
            raise _Unsupported(f"{node.op} with the channel axis in its axes")
        if node.op == "Upsample" and "scales" in node.attrs:
            scales, sizes = node.attrs["scales"], None
        else:
            ins = list(node.inputs) + [gs.Variable("")] * 4
            scales_t = ins[1] if node.op == "Upsample" else (ins[2] if self.opset >= 11 else ins[1])
            sizes_t = ins[3] if node.op == "Resize" and self.opset >= 11 else None
            scales = sizes = None
            if scales_t.name:
                scales = _const(scales_t)
                if scales is None:
                    out = self._shape(node.outputs[0])
                    if out is None or out[m.axis] != n:
                        raise _Unsupported(f"{node.op} with computed scales that may scale the channel axis")
                    scales = np.ones(m.rank)
            if sizes_t is not None and sizes_t.name:
                sizes = _const(sizes_t)
                if sizes is None:
                    if not self._reads_own_shape(sizes_t, m.axis, m):
                        raise _Unsupported(f"{node.op} with computed sizes not read from its input's Shape")
                    self._set(node, _Map(m.axis, m.rank, m.comps))
                    return
        if sizes is not None and np.size(sizes):
            if int(np.asarray(sizes).reshape(-1)[m.axis]) != n:
                raise _Unsupported(f"{node.op} that changes the channel count")
            self.edits.append(_Edit("dim", node.name, m.comps, idx=m.axis, extra=(3,)))
        elif scales is not None and np.size(scales) and float(np.asarray(scales).reshape(-1)[m.axis]) != 1.0:
            raise _Unsupported(f"{node.op} that scales the channel axis")
        self._set(node, _Map(m.axis, m.rank, m.comps))

    def _groupnorm(self, node, tracked):
        raise _Unsupported("GroupNormalization: channels can only go by whole groups (not supported yet)")

    def _pool(self, node, tracked):
        m = self._one(node, tracked)
        if m.axis != 1 or m.rank < 3:
            raise _Unsupported(f"{node.op} over the channel axis")
        self._set(node, _Map(1, m.rank, m.comps))

    def _bn(self, node, tracked):
        m = self._one(node, tracked)
        if m.axis != 1 or len(node.outputs) != 1 or node.attrs.get("training_mode", 0):
            raise _Unsupported(f"{node.op} not on channel axis 1 or in training mode")
        for i in range(1, len(node.inputs)):
            v = _const(node.inputs[i])
            if v is None or v.shape != (len(m.comps),):
                raise _Unsupported(f"{node.op} with non-constant or non-per-channel parameters")
            self.edits.append(_Edit("param", node.name, m.comps, idx=i, axis=0))
        self._set(node, _Map(1, m.rank, m.comps))

    def _elementwise(self, node, tracked):
        maps = {i: m for i, m in tracked}
        ranks = []
        for i, t in enumerate(node.inputs):
            r = maps[i].rank if i in maps else (t.values.ndim if isinstance(t, gs.Constant) else self._rank(t))
            if r is None:
                raise _Unsupported(f"{node.op} with an operand of unknown rank")
            ranks.append(r)
        out_rank = max(ranks)
        first = tracked[0][1]
        neg = first.axis - first.rank
        for i, m in tracked[1:]:
            if m.axis - m.rank != neg or len(m.comps) != len(first.comps):
                raise _Unsupported(f"{node.op} combines channels that do not line up")
            self._tie(first.comps, m.comps)
        n = len(first.comps)
        for i, t in enumerate(node.inputs):
            if i in maps:
                continue
            shape = self._shape(t)
            pos = ranks[i] + neg
            if shape is None:
                raise _Unsupported(f"{node.op} with an operand of unknown shape")
            if pos < 0 or shape[pos] == 1:
                continue
            if shape[pos] != n:
                raise _Unsupported(f"{node.op} operand does not broadcast per channel")
            if not isinstance(t, gs.Constant):
                if first.heads:
                    # attention scores with a computed operand broadcast over the heads (a mask
                    # expanded to the head count): the operand is indexed to the kept heads
                    self.edits.append(_Edit("gather", node.name, first.comps, idx=i, axis=pos))
                    continue
                raise _Unsupported(f"{node.op} with a computed full-channel operand '{t.name}'")
            self.edits.append(_Edit("param", node.name, first.comps, idx=i, axis=pos))
        self._set(node, _Map(out_rank + neg, out_rank, first.comps))

    def _concat(self, node, tracked):
        maps = dict(tracked)
        first = tracked[0][1]
        axis = int(node.attrs.get("axis", 1))
        axis = axis + first.rank if axis < 0 else axis
        if any(m.rank != first.rank or m.axis != first.axis for _, m in tracked):
            raise _Unsupported("Concat of inputs with different channel axes")
        if axis != first.axis:
            if len(tracked) != len(node.inputs) or any(len(m.comps) != len(first.comps) for _, m in tracked):
                raise _Unsupported("Concat on a non-channel axis with untracked inputs")
            for _, m in tracked[1:]:
                self._tie(first.comps, m.comps)
            self._set(node, _Map(first.axis, first.rank, first.comps))
            return
        parts = []
        for i, t in enumerate(node.inputs):
            if i in maps:
                parts.append(maps[i].comps)
                continue
            shape = self._shape(t)
            if shape is None:
                raise _Unsupported("Concat with an input of unknown shape")
            m = self._source(node, t, shape[axis], first.rank, axis, prunable=False,
                             reason=f"Concat input '{t.name}' has channels of unknown origin")
            parts.append(m.comps)
        self._set(node, _Map(axis, first.rank, np.concatenate(parts)))

    def _split(self, node, tracked):
        m = self._one(node, tracked)
        axis = int(node.attrs.get("axis", 0))
        axis = axis + m.rank if axis < 0 else axis
        if axis != m.axis:
            for k in range(len(node.outputs)):
                self._set(node, _Map(m.axis, m.rank, m.comps), k)
            return
        n = len(m.comps)
        if len(node.inputs) > 1 and node.inputs[1].name:
            v = _const(node.inputs[1])
            if v is None:
                raise _Unsupported("Split with computed sizes")
            sizes = _ints(v)
        elif "split" in node.attrs:
            sizes = _ints(node.attrs["split"])
        else:
            k = len(node.outputs)
            step = -(-n // k)
            sizes = [min(step, n - i * step) for i in range(k)]
        if sum(sizes) != n:
            raise _Unsupported("Split sizes do not cover the channels")
        offs = np.cumsum([0] + sizes)
        parts = [m.comps[offs[i]:offs[i + 1]] for i in range(len(sizes))]
        self.edits.append(_Edit("split", node.name, parts))
        for k, p in enumerate(parts):
            self._set(node, _Map(m.axis, m.rank, p), k)

    def _slice(self, node, tracked):
        m = self._one(node, tracked)
        vals = [_const(t) if t.name else None for t in node.inputs[1:]]
        if any(v is None for v in vals[:2]) or any(
                v is None for v, t in zip(vals[2:], node.inputs[3:]) if t.name):
            raise _Unsupported("Slice with computed bounds")
        starts, ends = _ints(vals[0]), _ints(vals[1])
        axes = _ints(vals[2]) if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
        steps = _ints(vals[3]) if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
        axes = [a + m.rank if a < 0 else a for a in axes]
        comps = m.comps
        if m.axis in axes:
            j = axes.index(m.axis)
            if steps[j] != 1:
                raise _Unsupported("Slice with a step on the channel axis")
            n = len(comps)
            s, e = starts[j], ends[j]
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            e = max(e, s)
            self.edits.append(_Edit("slice", node.name, comps, idx=j, extra=(s, e)))
            comps = comps[s:e]
        self._set(node, _Map(m.axis, m.rank, comps))

    def _flatten_to(self, node, m: _Map, in_tensor, out_rank, keep_rank_dims=False):
        """(N, C, *S) → (N, C·S): columns of channel c are the block c·S … (c+1)·S − 1."""
        shape = self._shape(in_tensor)
        if shape is None:
            raise _Unsupported(f"{node.op} of a tensor of unknown shape")
        s = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        origin = m.origin or (in_tensor.name, m)
        return _Map(1, out_rank, np.repeat(m.comps, s), origin), s

    def _flatten(self, node, tracked):
        m = self._one(node, tracked)
        axis = int(node.attrs.get("axis", 1))
        axis = axis + m.rank if axis < 0 else axis
        if m.rank == 2 and axis == 1:
            self._set(node, _Map(1, 2, m.comps, m.origin))
            return
        if axis != 1 or m.axis != 1:
            raise _Unsupported("Flatten that does not keep (batch, channels·spatial)")
        out, _ = self._flatten_to(node, m, node.inputs[0], 2)
        self._set(node, out)

    def _reshape_target(self, node):
        """(entries, where) of a Reshape's target shape: a constant, or a ``Concat`` of constants and
        computed parts (torch exports: ``Concat(Shape(x)[0], Shape(x)[1], [heads, head size])``). A
        computed entry reads as the dim seen at run time; ``where[i]`` is (node, input, offset, path,
        reader) of the constant holding entry i, None where computed. A computed entry that is a
        constant times dims that are 1 here (``Mul(batch, heads)``, as torch.dynamo writes the
        ``bsz * num_heads`` of ``nn.MultiheadAttention``) is held by that constant. A Concat (or
        Mul) other nodes read too is copied for this Reshape when rewritten (``path``).
        (None, None) when neither form, or the shapes are unknown."""
        t = node.inputs[1]
        v = _const(t)
        if v is not None:
            vals = _ints(v)
            return vals, [(node.name, 1, i, (), "") for i in range(len(vals))]
        out_shape = self._shape(node.outputs[0])
        p = t.inputs[0] if t.inputs else None
        via = ()   # Casts between the Concat and its reader (jax2tf writes Cast(Concat(...)) as a target)
        while p is not None and p.op in ("Cast", "Identity") and len(via) < 4 and p.inputs[0].inputs:
            via += (p.name,)
            p = p.inputs[0].inputs[0]
        if p is None or p.op != "Concat" or out_shape is None:
            return None, None
        vals, where = [], []
        for k, i in enumerate(p.inputs):
            c = _const(i)
            if c is not None:
                for j, x in enumerate(_ints(c)):
                    vals.append(x)
                    where.append((p.name, k, j, via + (p.name,), node.name))
                continue
            shp = self._shape(i)
            if shp is None or len(shp) != 1 or shp[0] is None:
                return None, None
            held = self._scaled_entry(i, out_shape[len(vals)]) if shp[0] == 1 and len(vals) < len(out_shape) else None
            vals.extend([None] * shp[0])
            where.extend([None] * shp[0] if held is None else
                         [(held[0], held[1], 0, via + (p.name,) + held[2], node.name)])
        if len(vals) != len(out_shape) or any(x is None and out_shape[i] is None for i, x in enumerate(vals)):
            return None, None
        return [int(out_shape[i]) if x is None else x for i, x in enumerate(vals)], where

    def _scaled_entry(self, t, value):
        """(Mul node, constant input, path) when the 1-element tensor ``t`` is ``Mul(dims, c)``
        (through Reshape/Unsqueeze/Squeeze/Cast) with a scalar constant ``c`` equal to the entry's
        ``value`` here (the other factor is 1 at these shapes); else None."""
        path = []
        for _ in range(4):
            q = t.inputs[0] if t.inputs else None
            if q is None or isinstance(t, gs.Constant):
                return None
            path.append(q.name)
            if q.op in ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"):
                t = q.inputs[0]
                continue
            if q.op != "Mul" or len(q.inputs) != 2:
                return None
            for at in (0, 1):
                c = _const(q.inputs[at])
                if c is not None and c.size == 1 and _const(q.inputs[1 - at]) is None and int(c.reshape(-1)[0]) == value:
                    return q.name, at, tuple(path)
            return None
        return None

    @staticmethod
    def _shape_edit(where, comps, i) -> _Edit:
        """The edit that writes the kept count of ``comps`` into entry ``i`` of a Reshape's target."""
        if where[i] is None:
            raise _Unsupported("Reshape whose channel-axis entry is computed at run time")
        node, at, off, path, reader = where[i]
        return _Edit("reshape", node, comps, idx=off, extra=(at,) if at != 1 else (), path=path, reader=reader)

    def _reshape(self, node, tracked):
        m = self._one(node, tracked)
        target, where = self._reshape_target(node)
        in_shape, out_shape = self._shape(node.inputs[0]), self._shape(node.outputs[0])
        if target is None or in_shape is None or out_shape is None:
            raise _Unsupported("Reshape with a computed or unknown shape")
        if tuple(in_shape) == tuple(out_shape):
            self._set(node, _Map(m.axis, m.rank, m.comps, m.origin))
            return
        n = len(m.comps)
        if m.axis == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == int(np.prod(in_shape[1:])):
            out, s = self._flatten_to(node, m, node.inputs[0], 2)
            if target[1] > 0:
                self.edits.append(self._shape_edit(where, out.comps, 1))
            self._set(node, out)
            return
        if (m.axis == 1 and len(in_shape) >= 2 and len(out_shape) >= 2 and out_shape[0] == in_shape[0]
                and out_shape[1] == n and all(d == 1 for d in out_shape[2:]) and all(d == 1 for d in in_shape[2:])):
            if target[1] > 0:
                self.edits.append(self._shape_edit(where, m.comps, 1))
            self._set(node, _Map(1, len(out_shape), m.comps, m.origin))
            return
        copies_channels = any(t == 0 and i >= m.rank - 1 for i, t in enumerate(target[:-1]))
        if (m.axis == m.rank - 1 and out_shape[-1] == n and target[-1] in (n, -1)
                and not (target[-1] == -1 and copies_channels)):
            # rows regrouped, features kept last: (N, T, d) ↔ (N·T, d) around a Gemm (torch.export)
            if target[-1] == n:
                self.edits.append(self._shape_edit(where, m.comps, len(target) - 1))
            self._set(node, _Map(len(out_shape) - 1, len(out_shape), m.comps))
            return
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        r, R = m.rank, len(out_shape)
        if len(target) != R:
            raise _Unsupported("Reshape whose target does not match its output's rank")
        if (m.axis == r - 1 and R == r and r >= 2 and out_shape[:r - 2] == in_shape[:r - 2]
                and out_shape[r - 1] % n == 0 and out_shape[r - 1] > n
                and in_shape[r - 2] == out_shape[r - 2] * (out_shape[r - 1] // n)):
            # k consecutive rows merged into the features, channels fastest (…, T, d) → (…, T/k, k·d)
            # (Magika's Dense → Reshape(N, 512, 4·64) → Conv): channel c is column j·d + c of each row
            comps = np.tile(m.comps, out_shape[r - 1] // n)
            if target[r - 1] > 0:
                self.edits.append(self._shape_edit(where, comps, r - 1))
            elif target[r - 2] <= 0:
                raise _Unsupported("Reshape merging rows into the features with neither count given")
            self._set(node, _Map(r - 1, r, comps))
            return
        if (m.axis == r - 1 and R == r + 1 and out_shape[:r - 1] == in_shape[:r - 1]
                and out_shape[r - 1] * out_shape[r] == n and out_shape[r - 1] > 1
                and self._indexed_only(node.outputs[0], r - 1)):
            # packed projections (…, k·d) → (…, k, d), the k axis only indexed (Gather): Q, K and V
            # of nn.MultiheadAttention's in_proj; column c of each part goes with the others'
            part = self._tie_parts(m.comps, out_shape[r - 1])
            if target[r] > 0:
                self.edits.append(self._shape_edit(where, part, r))
            elif target[r - 1] <= 0:
                raise _Unsupported("Reshape into packed parts with neither the part count nor the width given")
            self._set(node, _Map(r, r + 1, part))
            return
        if (m.axis == r - 1 and R == r + 2 and out_shape[:r - 1] == in_shape[:r - 1]
                and out_shape[r - 1] * out_shape[r] * out_shape[r + 1] == n and out_shape[r - 1] > 1
                and out_shape[r] > 1 and self._indexed_only(node.outputs[0], r - 1)):
            # packed projections straight into heads (…, k·h·dh) → (…, k, h, dh), the k axis only
            # indexed (Paddle's SVTR/ViT attention: Reshape(0, T, 3, h, dh), a Slice per part): the
            # parts' columns go together and a head's columns go together
            heads = self._tie_heads(self._tie_parts(m.comps, out_shape[r - 1]), out_shape[r + 1])
            if target[r] > 0:
                self.edits.append(self._shape_edit(where, heads, r))
            elif target[r] != -1 and target[r + 1] <= 0:
                raise _Unsupported("Reshape into packed heads with neither the head count nor the head size given")
            elif target[r - 1] <= 0:
                raise _Unsupported("Reshape into packed heads without the part count")
            self._set(node, _Map(r, R, heads))
            return
        if (m.axis == r - 1 and R >= 2 and _no_ones(out_shape[:R - 2]) == _no_ones(in_shape[:r - 1])
                and out_shape[R - 2] * out_shape[R - 1] == n and out_shape[R - 2] > 1):
            # features → (heads, head size): a head's columns go together (attention heads); unit
            # dims before them may go or come ((T, 1, d) → (T, 1·heads, head size): dynamo's MHA)
            dh = out_shape[R - 1]
            heads = m.comps[::dh]
            if target[R - 2] > 0:
                edit = self._shape_edit(where, heads, R - 2)
            elif target[R - 2] != -1 and target[R - 1] <= 0:
                raise _Unsupported("Reshape into heads with neither the head count nor the head size given")
            else:
                edit = None
            self._tie_heads(m.comps, dh)
            if edit is not None:
                self.edits.append(edit)
            self._set(node, _Map(R - 2, R, heads))
            return
        if (m.axis == r - 2 and _no_ones(out_shape[:R - 1]) == _no_ones(in_shape[:r - 2])
                and out_shape[R - 1] == n * in_shape[r - 1]):
            # (…, heads, head size) → (…, features): each head spans head-size consecutive columns
            comps = np.repeat(m.comps, in_shape[r - 1])
            if target[R - 1] > 0:
                self.edits.append(self._shape_edit(where, comps, R - 1))
            self._set(node, _Map(R - 1, R, comps))
            return
        if n > 1 and _no_ones(in_shape) == _no_ones(out_shape):
            # unit dims inserted or dropped ((B·heads, T, dh) ↔ (B, heads, T, dh) at batch 1)
            k = sum(d != 1 for d in in_shape[:m.axis])
            axis = [i for i, d in enumerate(out_shape) if d != 1][k]
            if target[axis] > 0 and not (where[axis] is None and self._reads_own_shape(node.inputs[1], axis, m)):
                self.edits.append(self._shape_edit(where, m.comps, axis))
            elif target[axis] == 0 and (node.attrs.get("allowzero", 0) or axis != m.axis):
                raise _Unsupported("Reshape that copies another dim into the channel axis")
            self._set(node, _Map(axis, R, m.comps))
            return
        raise _Unsupported("Reshape that splits or merges the channel axis")

    def _expand(self, node, tracked):
        """Expand of the tracked data to a shape that keeps the channel axis (jax2tf's BroadcastTo in
        a decomposed LayerNorm): the channels pass; a target entry naming the channel count is rewritten
        (one of 1 broadcasts)."""
        m = self._one(node, tracked)
        target, where = self._reshape_target(node)
        out_shape = self._shape(node.outputs[0])
        if target is None or out_shape is None:
            raise _Unsupported("Expand with a computed or unknown shape")
        R = len(out_shape)
        pos = m.axis + R - m.rank
        if out_shape[pos] != len(m.comps):
            raise _Unsupported("Expand that broadcasts the channel axis")
        i = pos - (R - len(target))
        if 0 <= i < len(target) and target[i] > 1:
            self.edits.append(self._shape_edit(where, m.comps, i))
        self._set(node, _Map(pos, R, m.comps))

    def _transpose(self, node, tracked):
        m = self._one(node, tracked)
        perm = _ints(node.attrs.get("perm", list(range(m.rank))[::-1]))
        self._set(node, _Map(perm.index(m.axis), m.rank, m.comps))

    def _indexed_only(self, t, axis, depth=0) -> bool:
        """True when axis ``axis`` of ``t`` is, through Unsqueeze/Squeeze/Transpose, only indexed by
        Gathers with constant indices (the parts of a packed projection taken one by one)."""
        if depth > 8 or not t.outputs:
            return False
        rank = self._rank(t)
        for c in t.outputs:
            if c.op == "Gather" and c.inputs[0] is t:
                a = int(c.attrs.get("axis", 0))
                if (a + rank if a < 0 else a) != axis or _const(c.inputs[1]) is None:
                    return False
            elif c.op == "Slice" and c.inputs[0] is t:
                if not self._one_index(c, rank, axis):
                    return False
            elif c.op == "Transpose":
                perm = _ints(c.attrs.get("perm", list(range(rank))[::-1]))
                if not self._indexed_only(c.outputs[0], perm.index(axis), depth + 1):
                    return False
            elif c.op in ("Squeeze", "Unsqueeze") and c.inputs[0] is t:
                try:
                    axes = _axes(c)
                except _Unsupported:
                    return False
                if c.op == "Squeeze":
                    axes = [a + rank if a < 0 else a for a in axes]
                    if not axes or axis in axes:
                        return False
                    pos = axis - sum(a < axis for a in axes)
                else:
                    out_rank = rank + len(axes)
                    pos = axis
                    for a in sorted(a + out_rank if a < 0 else a for a in axes):
                        if a <= pos:
                            pos += 1
                if not self._indexed_only(c.outputs[0], pos, depth + 1):
                    return False
            else:
                return False
        return True

    @staticmethod
    def _one_index(node, rank, axis) -> bool:
        """True when the Slice ``node`` takes one index of axis ``axis`` and leaves the other axes
        whole (constant bounds: a part of a packed projection taken as ``x[k:k+1]``)."""
        vals = [_const(t) if t.name else None for t in node.inputs[1:]]
        if len(vals) < 2 or any(v is None for v in vals[:2]) or any(
                v is None for v, t in zip(vals[2:], node.inputs[3:]) if t.name):
            return False
        starts, ends = _ints(vals[0]), _ints(vals[1])
        axes = _ints(vals[2]) if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
        steps = _ints(vals[3]) if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
        axes = [a + rank if a < 0 else a for a in axes]
        return (axes == [axis] and steps[0] == 1 and starts[0] >= 0 and ends[0] == starts[0] + 1)

    def _gather(self, node, tracked):
        """Gather with constant indices on a non-channel axis of the tracked data (one part of a packed
        Q/K/V projection): the channels pass through; the axis goes (scalar index) or stays."""
        m = self._one(node, tracked)
        idx = _const(node.inputs[1])
        axis = int(node.attrs.get("axis", 0))
        axis = axis + m.rank if axis < 0 else axis
        if idx is None or axis == m.axis:
            raise _Unsupported("Gather on the channel axis or with computed indices")
        q = idx.ndim
        self._set(node, _Map(m.axis if m.axis < axis else m.axis - 1 + q, m.rank - 1 + q, m.comps))

    def _squeeze(self, node, tracked):
        m = self._one(node, tracked)
        axes = _axes(node)
        if node.op == "Squeeze":
            if not axes:
                shape = self._shape(node.inputs[0])
                if shape is None:
                    raise _Unsupported("Squeeze without axes of an unknown shape")
                axes = [i for i, d in enumerate(shape) if d == 1]
            axes = [a + m.rank if a < 0 else a for a in axes]
            if m.axis in axes:
                raise _Unsupported("Squeeze of the channel axis")
            self._set(node, _Map(m.axis - sum(a < m.axis for a in axes), m.rank - len(axes), m.comps, m.origin))
        else:
            r = m.rank + len(axes)
            axes = sorted(a + r if a < 0 else a for a in axes)
            pos = m.axis
            for a in axes:
                if a <= pos:
                    pos += 1
            self._set(node, _Map(pos, r, m.comps, m.origin))

    def _reduce(self, node, tracked):
        m = self._one(node, tracked)
        axes = _axes(node)
        if not axes:
            raise _Unsupported(f"{node.op} over all axes")
        axes = [a + m.rank if a < 0 else a for a in axes]
        if m.axis in axes:
            raise _Unsupported(f"{node.op} over the channel axis")
        if node.attrs.get("keepdims", 1):
            self._set(node, _Map(m.axis, m.rank, m.comps))
        else:
            self._set(node, _Map(m.axis - sum(a < m.axis for a in axes), m.rank - len(axes), m.comps))

    def _axis_op(self, node, tracked):
        m = self._one(node, tracked)
        axis = int(node.attrs.get("axis", -1))
        axis = axis + m.rank if axis < 0 else axis
        if axis == m.axis:
            raise _Unsupported(f"{node.op} over the channel axis")
        self._set(node, _Map(m.axis, m.rank, m.comps))

    def _layernorm(self, node, tracked):
        m = self._one(node, tracked)
        axis = int(node.attrs.get("axis", -1))
        axis = axis + m.rank if axis < 0 else axis
        if m.axis >= axis:
            raise _Unsupported("LayerNormalization over the channel axis")
        self._set(node, _Map(m.axis, m.rank, m.comps))

    # -- weight layers: consumers of tracked channels and sources of new ones
    def _consume(self, node, m: _Map, x_tensor):
        self.edits.append(_Edit("in", node.name, m.comps))
        obs_tensor, obs_map = m.origin if m.origin is not None else (x_tensor.name, m)
        self.consumer_obs.append((node.name, obs_tensor, obs_map))

    @staticmethod
    def _conv_parts(node, tracked):
        """(layer, bias is a constant or absent, tracked input map) of a Conv/ConvTranspose;
        computed weights are not understood."""
        if _const(node.inputs[1]) is None or any(i != 0 for i, _ in tracked):
            raise _Unsupported(f"{node.op} with computed weights")
        bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
        return WeightLayer(node), bias_ok, tracked[0][1] if tracked else None

    def _conv(self, node, tracked):
        layer, bias_ok, m = self._conv_parts(node, tracked)
        c_in, o, group, shared, rank = layer.c_in, layer.d_out, layer.group, layer.is_shared, len(layer.weight.shape)
        if m is not None and (m.axis != 1 or len(m.comps) != c_in):
            raise _Unsupported("Conv input channels do not match the tracked axis")
        if group == 1:
            return self._ungrouped(node, m, o, rank, shared, bias_ok)
        self._grouped_or_pinned(node, m, rank, group, c_in, o, shared or not bias_ok,
                                depthwise=c_in == group and o == c_in, weight_axis_in=False)

    def _ungrouped(self, node, m, o, rank, shared, bias_ok):
        """A group-1 Conv/ConvTranspose: it consumes the tracked channels (pinned when its weight is
        shared) and is the source of its output channels."""
        if m is not None:
            if shared:
                self.pin(m, node, f"{node.op} weights are shared with another node")
            else:
                self._consume(node, m, node.inputs[0])
        self._set(node, self._source(node, node.outputs[0], o, rank, 1, prunable=not shared and bias_ok,
                                     reason=f"{node.op} weights are shared or its bias is computed"))

    def _grouped_or_pinned(self, node, m, rank, group, c_in, o, fixed, depthwise, weight_axis_in):
        """A Conv/ConvTranspose with 1 < group: depthwise (the tracked channels pass through), by
        whole groups, or pinned when its weight is shared or its bias computed (``fixed``)."""
        if m is not None and not fixed and depthwise and group == c_in:
            self.edits.append(_Edit("depthwise", node.name, m.comps))
            self._set(node, _Map(1, m.rank, m.comps))
            return
        if m is not None and not fixed:
            self._grouped(node, m, group, c_in, o, weight_axis_in=weight_axis_in)
            return
        if m is not None:
            self.pin(m, node, f"grouped {node.op} (group={group}) with shared weights or a computed bias")
        self._set(node, self._source(node, node.outputs[0], o, rank, 1, prunable=False,
                                     reason=f"grouped {node.op} (group={group}) output"))

    def _grouped(self, node, m: _Map, group: int, c_in: int, o: int, weight_axis_in: bool):
        """A grouped Conv/ConvTranspose (1 < group): output group j reads input group j only, so its
        channels go by whole groups: one component per group, spanning the group's input and output
        channels (depthwise with a channel multiplier: group = C_in)."""
        ci, co = c_in // group, o // group
        for j in range(group):
            self._tie(np.full(ci - 1, m.comps[j * ci]), m.comps[j * ci + 1:(j + 1) * ci])
        per_group = m.comps[::ci]
        out = np.repeat(per_group, co)
        self.edits.append(_Edit("grouped", node.name, out, idx=co, extra=(m.comps, weight_axis_in)))
        self._set(node, _Map(1, m.rank, out))

    def _conv_transpose(self, node, tracked):
        """ConvTranspose, W (C_in, C_out/group, k…): input channels are W's rows, outputs its columns."""
        layer, bias_ok, m = self._conv_parts(node, tracked)
        c_in, o, group, shared, rank = layer.c_in, layer.d_out, layer.group, layer.is_shared, len(layer.weight.shape)
        if m is not None and (m.axis != 1 or len(m.comps) != c_in):
            raise _Unsupported("ConvTranspose input channels do not match the tracked axis")
        if "output_shape" in node.attrs:
            if m is not None:
                self.pin(m, node, "ConvTranspose with an output_shape attribute")
            self._set(node, self._source(node, node.outputs[0], o, rank, 1, prunable=False,
                                         reason="ConvTranspose with an output_shape attribute"))
            return
        if group == 1:
            return self._ungrouped(node, m, o, rank, shared, bias_ok)
        self._grouped_or_pinned(node, m, rank, group, c_in, o, shared or not bias_ok,
                                depthwise=o == group, weight_axis_in=True)

    def _gemm(self, node, tracked):
        if _const(node.inputs[1]) is None or any(i != 0 for i, _ in tracked):
            raise _Unsupported("Gemm with computed weights or bias")
        layer = WeightLayer(node)
        d_in, d_out, shared = layer.d_in, layer.d_out, layer.is_shared
        m = tracked[0][1] if tracked else None
        if m is not None:
            if node.attrs.get("transA", 0) or m.axis != 1 or m.rank != 2 or len(m.comps) != d_in:
                raise _Unsupported("Gemm input is transposed or does not match the tracked channels")
            if shared:
                self.pin(m, node, "Gemm weights are shared with another node")
            else:
                self._consume(node, m, node.inputs[0])
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        c_ok = c is None or (isinstance(c, gs.Constant) and (c.values.ndim == 0 or c.values.shape[-1] in (1, d_out))
                             and (c.values.ndim < 2 or c.values.shape[0] == 1))
        self._set(node, self._source(node, node.outputs[0], d_out, 2, 1, prunable=not shared and c_ok,
                                     reason="Gemm weights are shared or its bias is not per-neuron"))

    def _matmul(self, node, tracked):
        b = _const(node.inputs[1])
        if b is None:
            if _const(node.inputs[0]) is not None:
                raise _Unsupported("MatMul with the weight on the left (W @ x)")
            return self._batched_matmul(node, tracked)
        if b.ndim != 2:
            raise _Unsupported(f"MatMul with a {b.ndim}-D weight")
        layer = WeightLayer(node)
        shared = layer.is_shared
        m = tracked[0][1] if tracked else None
        rank = m.rank if m is not None else self._rank(node.inputs[0])
        if rank is None:
            raise _Unsupported("MatMul input of unknown rank")
        if m is not None:
            if m.axis != m.rank - 1 or len(m.comps) != layer.d_in:
                raise _Unsupported("MatMul input channels are not on the last axis")
            if shared:
                self.pin(m, node, "MatMul weights are shared with another node")
            else:
                self._consume(node, m, node.inputs[0])
        self._set(node, self._source(node, node.outputs[0], layer.d_out, max(rank, 2), max(rank, 2) - 1,
                                     prunable=not shared, reason="MatMul weights are shared"))

    def _batched_matmul(self, node, tracked):
        """A @ B between computed tensors: channels on a batch axis (attention heads) pass through
        and tie A's to B's; channels on the matrix axes cannot be removed here."""
        if not tracked:
            return
        maps = dict(tracked)
        ranks = [maps[i].rank if i in maps else self._rank(node.inputs[i]) for i in range(2)]
        if any(r is None or r < 3 for r in ranks):
            raise _Unsupported("MatMul between computed tensors")
        neg = None
        for i, m in tracked:
            if m.axis >= m.rank - 2:
                raise _Unsupported("MatMul between computed tensors (channels on a matrix axis)")
            if neg is not None and (m.axis - m.rank != neg or len(m.comps) != len(tracked[0][1].comps)):
                raise _Unsupported("MatMul between computed tensors with channels that do not line up")
            neg = m.axis - m.rank
        first = tracked[0][1]
        for i in range(2):
            if i in maps:
                continue
            shape = self._shape(node.inputs[i])
            pos = ranks[i] + neg
            if shape is None or (pos >= 0 and shape[pos] != 1):
                raise _Unsupported("MatMul between a tracked and a computed full-channel tensor")
        if len(tracked) == 2:
            self._tie(first.comps, tracked[1][1].comps)
        out_rank = max(ranks)
        self._set(node, _Map(out_rank + neg, out_rank, first.comps, heads=True))

    # -- groups
    def _finish(self) -> None:
        n = self.uf.count
        self.roots = self.uf.roots()
        # a group: the classes its sources' channels belong to, joined over every source
        ties = [self.roots[s.comps] for s in self.sources if len(s.comps) > 1]
        group_root = _class_minimum(n, [r[:1].repeat(len(r) - 1) for r in ties], [r[1:] for r in ties])
        gid_of_root = {}
        self.groups: list[Group] = []
        for s in self.sources:
            if len(s.comps) == 0:
                continue
            g = int(group_root[self.roots[s.comps[0]]])
            if g not in gid_of_root:
                gid_of_root[g] = len(self.groups)
                self.groups.append(Group(len(self.groups), np.zeros(0, np.int64)))
            grp = self.groups[gid_of_root[g]]
            grp.sources.append(s)
        self.class_group = np.full(n, -1, dtype=np.int64)
        self.class_index = np.full(n, -1, dtype=np.int64)
        for grp in self.groups:   # a group's classes in the order its sources first show them
            cat = np.concatenate([self.roots[s.comps] for s in grp.sources])
            _, first = np.unique(cat, return_index=True)
            seen = cat[np.sort(first)]
            self.class_index[seen] = np.arange(len(seen), dtype=np.int64)
            self.class_group[seen] = grp.index
            grp.classes = seen.astype(np.int64)
        for c, pins in self.comp_pins.items():
            grp = self.groups[self.class_group[self.roots[c]]]
            for p in pins:
                if p not in grp.pins:
                    grp.pins.append(p)
        for consumer, tensor, m in self.consumer_obs:
            cls = self.roots[m.comps]
            gids = self.class_group[cls]
            reduce = "spatial_max" if (m.axis == 1 and m.rank > 2) else ("rows" if m.axis == m.rank - 1 else None)
            for g in np.unique(gids):
                grp = self.groups[g]
                if consumer not in grp.consumers:
                    grp.consumers.append(consumer)
                if reduce is None or any(o.tensor == tensor for o in grp.observations):
                    continue
                pos = np.nonzero(gids == g)[0]
                grp.observations.append(Observation(tensor, reduce, pos, self.class_index[cls[pos]]))
        for grp in self.groups:  # groups nobody consumes: observe their sources' outputs
            if grp.observations:
                continue
            for s in grp.sources:
                m = self.tmap.get(s.tensor)
                if m is None:
                    continue
                reduce = "spatial_max" if (m.axis == 1 and m.rank > 2) else ("rows" if m.axis == m.rank - 1 else None)
                if reduce:
                    grp.observations.append(Observation(s.tensor, reduce, np.arange(len(s.comps)),
                                                        self.class_index[self.roots[s.comps]]))

    # -- public
    @property
    def pins(self) -> list[Pin]:
        return [p for g in self.groups for p in g.pins]

    def group_of(self, node_name: str) -> Group | None:
        for g in self.groups:
            if any(s.node == node_name for s in g.sources):
                return g
        return None

    def alive(self, keep: dict) -> np.ndarray:
        """Boolean per component: True where the channel survives ``keep`` ({group: kept indices})."""
        class_alive = np.ones(len(self.roots), dtype=bool)
        for gi, kept in keep.items():
            grp = self.groups[gi]
            if grp.pinned:
                continue
            mask = np.zeros(grp.size, dtype=bool)
            mask[np.asarray(kept, dtype=np.int64)] = True
            class_alive[grp.classes] = mask
        return class_alive[self.roots]

    def output_mask(self, node_name: str, keep: dict) -> np.ndarray | None:
        """Kept output channels of a source node under ``keep`` (None if it is not a source)."""
        alive = self.alive(keep)
        for s in self.sources:
            if s.node == node_name:
                return alive[s.comps]
        return None

    def prune(self, model: onnx.ModelProto, keep: dict) -> onnx.ModelProto:
        """A copy of ``model`` with the channels not in ``keep`` ({group index: kept channel
        indices}) removed from every coupled tensor. Groups not in ``keep`` and pinned groups stay
        whole. Kept indices must be non-empty."""
        for gi, kept in keep.items():
            if len(kept) == 0 and not self.groups[gi].pinned:
                raise ValueError(f"group {gi} would lose all its channels")
        alive = self.alive(keep)
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        edits = _gather_inputs(graph, nodes, _own_paths(graph, nodes, self.edits, alive), alive)
        for e in edits:
            e.apply(nodes[e.node], alive, self.opset)
        return export_model(graph, like=model)   # which drops the intermediate shapes the edits made stale


class _Unsupported(Exception):
    pass


def analyze(model: onnx.ModelProto, sample_shapes: dict | None = None) -> ChannelAnalysis:
    """Coupling groups of a (normalised) model; ``sample_shapes`` fixes dynamic input dims."""
    return ChannelAnalysis(model, sample_shapes)
