"""Graph helpers over onnx-graphsurgeon.

``normalize`` puts a loaded model into the one form passes see:
- every node has a unique name (reports and skips refer to nodes by name);
- a Conv's ``auto_pad`` becomes explicit ``pads`` where that holds for every input size (stride 1)
  or the input size is known (tf2onnx and Keras exports use SAME_UPPER);
- weights held in Constant nodes, or reaching a node through Identity, become initializers
  (gs.Constant), as many exporters keep weights in Constant nodes;
- shapes are inferred.

Large models (see ``model_io``): ``import_graph`` gives their on-disk weights values that are read
from the file when a pass asks for them, and ``export_model`` writes big rewritten weights to the
active spill store (the current ``shrink`` call's, see ``model_io.spilling``) as it exports, so a
pass's output does not hold a second in-memory copy of the weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import threading
import weakref
from collections import Counter, OrderedDict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, shape_inference
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import model_io
from .model_io import has_lazy, is_lazy, read_external, spill_array

class ExternalValues(LazyValues):
    """Values of a large model's weight, read from its file when first used."""

    def load(self):
        return read_external(self.tensor)


def _constants(graph: gs.Graph):
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            yield t
    for node in graph.nodes:
        for v in node.attrs.values():
            if isinstance(v, gs.Constant):
                yield v


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    if has_lazy(model):
        for t in _constants(graph):
            if type(t._values) is LazyValues and is_lazy(t._values.tensor):
                t._values = ExternalValues(t._values.tensor)
    return graph


def _spill_constants(graph: gs.Graph) -> None:
    """In a large graph, write big in-memory weights to the spill file, one at a time."""
    consts = list(_constants(graph))
    in_memory = [t for t in consts if isinstance(t._values, np.ndarray)]
    if not in_memory:
        return
    large = (any(isinstance(t._values, ExternalValues) for t in consts)
             or sum(t._values.nbytes for t in in_memory) > model_io.EXTERNAL_THRESHOLD)
    if not large:
        return
    for t in in_memory:
        if t._values.nbytes >= model_io.LAZY_MIN_BYTES and t._values.dtype != object:
            t._values = ExternalValues(spill_array(t.name, t._values))
        elif t.data_location == onnx.TensorProto.EXTERNAL:  # a rewritten weight, now small: inline
            t.data_location = None


def export_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Clean up, sort and export. Shapes of intermediate tensors are dropped (a rewrite may have
    changed them; stale value_info would contradict shape inference), graph inputs and outputs
    keep theirs."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    boundary = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in boundary:
            t.shape = None
    _spill_constants(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        model.ir_version = like.ir_version
        del model.opset_import[:]
        model.opset_import.extend(like.opset_import)
        model.producer_name = like.producer_name or "onnxshrink"
        for p in like.metadata_props:
            model.metadata_props.add().CopyFrom(p)
    return model


def _constant_node_value(node: gs.Node):
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


FOLD_MAX_ELEMENTS = 1 << 20   # a layout op on a larger constant is left to run (its values stay on disk)
# (and one on a constant of more than one dim over 1: a table read through a Reshape, which pq quantizes)


def _layout_of_constant(node: gs.Node):
    """The value of a layout-only node (Reshape, Unsqueeze, Squeeze, Flatten, Transpose) or a Cast whose
    inputs are all constants, the first a vector (at most one dim over 1), or None: Paddle2ONNX writes a
    Conv's bias as ``Add(conv, Reshape(b, [1, C, 1, 1]))`` and a Reshape target's tail as ``Cast([C])``,
    which the channel analysis would otherwise see as computed at run time."""
    if node.op not in ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Cast"):
        return None
    ins = [t for t in node.inputs if t is not None and t.name != ""]
    if not ins or not all(isinstance(t, gs.Constant) for t in ins):
        return None
    if int(np.prod(ins[0].shape)) > FOLD_MAX_ELEMENTS or sum(int(d) > 1 for d in ins[0].shape) > 1:
        return None   # vectors only: a table read through a Reshape stays one (pq quantizes such tables)
    x = np.asarray(read_values(ins[0]))
    second = np.asarray(read_values(ins[1])).astype(np.int64).ravel() if len(ins) > 1 else None
    try:
        if node.op == "Cast":
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        if node.op == "Reshape":
            shape = [int(x.shape[i]) if d == 0 and not node.attrs.get("allowzero", 0) else int(d)
                     for i, d in enumerate(second)]
            return x.reshape(shape)
        if node.op == "Unsqueeze":
            axes = list(second) if second is not None else list(node.attrs.get("axes", []))
            out_rank = x.ndim + len(axes)
            return np.expand_dims(x, tuple(sorted(int(a) % out_rank for a in axes)))
        if node.op == "Squeeze":
            axes = list(second) if second is not None else node.attrs.get("axes")
            return np.squeeze(x) if axes is None else np.squeeze(x, tuple(int(a) % x.ndim for a in axes))
        if node.op == "Flatten":
            axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        perm = node.attrs.get("perm")
        return np.transpose(x, None if perm is None else [int(a) for a in perm])
    except Exception:  # noqa: BLE001 - an op numpy cannot reproduce (a dtype it lacks, bad axes) stays an op
        return None


def _fold_to_constants(graph: gs.Graph, out_names: set, value_of) -> bool:
    """Replace each single-output node whose ``value_of(node)`` is not None (and whose output is not a
    graph output) by an initializer holding that value, named after the output; nodes are visited in
    graph order, so a chain's later node sees its input folded. True where something changed."""
    changed, taken = False, None   # the graph's tensor names, kept up to date (one scan, not one per node)
    for node in list(graph.nodes):
        if len(node.outputs) != 1 or node.outputs[0].name in out_names:
            continue
        value = value_of(node)
        if value is None:
            continue
        taken = set(graph.tensors()) if taken is None else taken
        old = node.outputs[0].name
        const = gs.Constant(fresh_name(taken, old + "_const"), np.asarray(value))
        _replace_tensor(graph, node.outputs[0], const)
        node.outputs.clear()
        taken.discard(old)   # no longer in the graph once its node has no output
        changed = True
    return changed


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = import_graph(model)
    seen = Counter()
    names = {node.name for node in graph.nodes if node.name}
    renamed = False
    for i, node in enumerate(graph.nodes):
        if not node.name or seen[node.name]:
            base = node.name or f"{node.op}_{i}"
            name = base
            k = 1
            while name in names:
                name = f"{base}_{k}"
                k += 1
            node.name = name
            names.add(name)
            renamed = True
        seen[node.name] += 1
    changed = renamed
    for node in graph.nodes:
        if node.op == "Conv" and _explicit_pads(node):
            changed = True
    out_names = {t.name for t in graph.outputs}
    if _fold_to_constants(graph, out_names, lambda n: _constant_node_value(n) if n.op == "Constant" else None):
        changed = True
    for node in list(graph.nodes):
        if (node.op == "Identity" and isinstance(node.inputs[0], gs.Constant)
                and node.outputs[0].name not in out_names):
            _replace_tensor(graph, node.outputs[0], node.inputs[0])
            node.outputs.clear()
            changed = True
    if _fold_to_constants(graph, out_names, _layout_of_constant):
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        new = export_model(graph, like=model)
    else:
        new = model
    try:
        inferred = _with_shapes(new)
    except Exception:
        return new
    # keep the graph's declared interface as the exporter wrote it (inference would name
    # anonymous dims "unk__N" or fill in shapes the user left open)
    declared = {vi.name: vi for vi in list(model.graph.input) + list(model.graph.output)}
    for vi in list(inferred.graph.input) + list(inferred.graph.output):
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    return inferred


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``shape_inference.infer_shapes(model, data_prop=True)`` without handing inference the large
    weights (serialized into it and back, a third of a second for a 100 MB model): inference runs
    on the copy ``_without_weight_data`` makes (they stand in as inputs of their dtype and dims,
    all inference reads of them), and its value_info and outputs go into a copy of ``model``.
    A model with subgraphs or functions (value_info inside them), or whose weights are all small
    or kept in files, is inferred as it is."""
    light = None
    if not len(model.functions) and not has_lazy(model) and not any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        light = _without_weight_data(model)
    if light is None or len(light.graph.initializer) == len(model.graph.initializer):
        return shape_inference.infer_shapes(model, data_prop=True)
    inferred = shape_inference.infer_shapes(light, data_prop=True)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in out.graph.output:
        o.CopyFrom(outputs[o.name])
    return out


def _explicit_pads(node: gs.Node) -> bool:
    """Replace a Conv's ``auto_pad`` by the explicit ``pads`` it stands for, where that does not
    depend on the input size (stride 1) or the input size is known. Returns True if changed."""
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET" or len(node.inputs) < 2 or node.inputs[1].shape is None:
        return False
    kernel = list(node.attrs.get("kernel_shape", node.inputs[1].shape[2:]))
    nd = len(kernel)
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    in_shape = node.inputs[0].shape
    begins, ends = [], []
    for i in range(nd):
        if auto == "VALID":
            total = 0
        elif strides[i] == 1:
            total = dil[i] * (kernel[i] - 1)
        elif in_shape is not None and len(in_shape) == nd + 2 and isinstance(in_shape[2 + i], int):
            size = in_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - size)
        else:
            return False  # depends on a dynamic input size: passes that need pads skip it with a reason
        low = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begins.append(low)
        ends.append(total - low)
    node.attrs["pads"] = begins + ends
    node.attrs.pop("auto_pad", None)
    return True


def _replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for j, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[j] = new


def read_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values without caching them on the tensor: a large model's weight read from
    disk is freed as soon as the caller drops it (a replaced Constant may live on in reference
    cycles until the next garbage collection)."""
    v = tensor._values
    return v.load() if isinstance(v, LazyValues) else v


def fresh_name(where, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: a tensor name not yet used in ``where`` (a gs.Graph,
    or a gs.Node: the tensors of the graph it is connected to), or a name not in ``where`` when it
    is a set of names, to which the name returned is then added (a builder's running record)."""
    if isinstance(where, set):
        taken = where
    else:
        taken = set(where.tensors()) if isinstance(where, gs.Graph) else _connected_tensor_names(where)
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    if isinstance(where, set):
        where.add(name)
    return name


def _connected_tensor_names(node: gs.Node) -> set:
    names, seen, todo = set(), {id(node)}, [node]
    while todo:
        for t in (n := todo.pop()).inputs + n.outputs:
            if t.name in names:
                continue
            names.add(t.name)
            for m in list(t.inputs) + list(t.outputs):
                if id(m) not in seen:
                    seen.add(id(m))
                    todo.append(m)
    return names


def set_constant_input(node: gs.Node, index: int, values: np.ndarray, where=None, base: str | None = None) -> None:
    """Give ``node.inputs[index]`` (or a new last input) these values. A constant only this node
    reads is replaced under its own name; one other nodes share, or a new input, gets a fresh name
    from ``base`` (so the other readers keep the old values and no two tensors share a name)."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if isinstance(old, gs.Constant) and old.name and len(old.outputs) == 1:
        name = old.name
    else:
        name = fresh_name(where if where is not None else node, base or (old.name if old is not None else node.name))
    const = gs.Constant(name, np.ascontiguousarray(values))
    if old is None:
        node.inputs.append(const)
    else:
        node.inputs[index] = const


def node_by_name(graph: gs.Graph, name: str) -> gs.Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def concrete_input_shapes(model: onnx.ModelProto, sample_shapes: dict | None = None, batch: int = 1):
    """Input shapes with dynamic dims fixed: from ``sample_shapes`` when known (a shape of the
    input's full rank is used as it is; one of rank − 1 is a per-sample shape, the batch
    prepended), else batch/1."""
    init = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        rank = len(vi.type.tensor_type.shape.dim)
        if sample_shapes and vi.name in sample_shapes:
            given = tuple(int(d) for d in sample_shapes[vi.name])
            shapes[vi.name] = given if len(given) == rank else (batch,) + given
            continue
        dims = []
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if i == 0 else 1)
        shapes[vi.name] = tuple(dims)
    return shapes


# Shapes from running: while a ShapeObserver is active (the pipeline sets one over the calibration
# data), shapes static inference leaves unknown are taken from running the model on a feed of the
# requested input shapes.
_OBSERVER: contextvars.ContextVar = contextvars.ContextVar("onnxshrink_shape_observer", default=None)


@contextlib.contextmanager
def observing(observer):
    """Within the block, ``infer_shapes`` fills shapes static inference leaves unknown from
    ``observer.observe(model, input_shapes)`` (None: no observation)."""
    token = _OBSERVER.set(observer)
    try:
        yield observer
    finally:
        _OBSERVER.reset(token)


_FOLD_MAX = 4096   # elements: only small constant-only subgraphs (pads, shapes, axes) are folded


def _fold_small_constants(m: onnx.ModelProto) -> None:
    """Replace, in ``m`` (a copy made for shape inference), the nodes of the default domain whose
    inputs are all small constants by initializers of their values (the reference evaluator), so
    shapes that depend on them (a TF-style Pad whose pads are computed from constants, which static
    inference does not propagate) are known without running the model."""
    from onnx.reference import ReferenceEvaluator
    small = {t.name: t for t in m.graph.initializer if int(np.prod(t.dims)) <= _FOLD_MAX}
    values, keep, added = {}, [], []
    for node in m.graph.node:
        ins = [i for i in node.input if i]
        if not ins or node.domain not in ("", "ai.onnx") or node.op_type.startswith("Random") \
                or node.op_type == "Multinomial" or node.attribute and any(a.g.node or a.graphs for a in node.attribute) \
                or not all(i in small or i in values for i in ins):
            keep.append(node)
            continue
        try:
            feed = {i: values[i] if i in values else numpy_helper.to_array(small[i]) for i in ins}
            outs = ReferenceEvaluator(node).run(None, feed)
        except Exception:   # an op the evaluator lacks: leave it to inference
            keep.append(node)
            continue
        if any(not isinstance(v, np.ndarray) or v.size > _FOLD_MAX for v in outs):
            keep.append(node)
            continue
        for name, v in zip(node.output, outs):
            if name:
                values[name] = v
                added.append(numpy_helper.from_array(v, name))
    if added:
        del m.graph.node[:]
        m.graph.node.extend(keep)
        m.graph.initializer.extend(added)


def _static_inference(m: onnx.ModelProto, rounds: int = 16) -> onnx.ModelProto:
    """``shape_inference.infer_shapes`` (data propagation on) of ``m`` (a copy: it is changed),
    repeated while it pays: small constant-only subgraphs are folded and each ``Shape`` whose
    input's shape became known is replaced by its value, so shapes computed from other shapes
    (pads, Expand targets) resolve without running the model. The original graph is unchanged."""
    inferred = m
    for _ in range(rounds):
        _fold_small_constants(m)
        try:
            inferred = shape_inference.infer_shapes(m, data_prop=True)
        except Exception:
            return inferred
        known = {}
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                known[vi.name] = [d.dim_value for d in tt.shape.dim]
        known.update({t.name: list(t.dims) for t in m.graph.initializer})
        if all(o in known for n in m.graph.node for o in n.output if o):
            return inferred   # every shape known: nothing left to resolve
        replaced = False
        for node in m.graph.node:
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in known:
                attrs = {a.name: a.i for a in node.attribute}
                value = np.array(known[node.input[0]], dtype=np.int64)[attrs.get("start", 0):attrs.get("end", None)]
                m.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                node.op_type = "Identity__folded"   # dropped below
                replaced = True
        if not replaced:
            return inferred
        keep = [n for n in m.graph.node if n.op_type != "Identity__folded"]
        del m.graph.node[:]
        m.graph.node.extend(keep)
    return inferred


def observed_input_shapes() -> dict | None:
    """The input shapes of the active observer's first feed (None without an observer): what a
    pass's plan analyses at, so that shapes taken from running are found (``observing``)."""
    feeds = getattr(_OBSERVER.get(), "feeds", None)
    return {k: tuple(np.shape(v)) for k, v in feeds[0].items()} if feeds else None


_SHAPE_ONLY = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)   # values static inference may read


def _without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for static inference: initializers of more than ``_FOLD_MAX`` elements
    that are not integer (weights; inference reads only their type and dims, folding only small
    ones) become graph inputs of that type and shape, so the weights are neither copied nor
    serialized for inference; everything else as it is."""
    m = onnx.ModelProto()
    model_io.copy_fields(model, m, skip=("graph",))
    model_io.copy_fields(model.graph, m.graph, skip=("initializer", "input"))
    stand_in = {}
    for t in model.graph.initializer:
        if t.data_type not in _SHAPE_ONLY and int(np.prod(t.dims)) > _FOLD_MAX:
            stand_in[t.name] = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        else:
            m.graph.initializer.append(t)
    m.graph.input.extend(stand_in.pop(vi.name, vi) for vi in model.graph.input)
    m.graph.input.extend(stand_in.values())
    return m


_SHAPES_KEPT = 16   # ``infer_shapes`` results kept (the latest), by what they are computed from
_shapes_memo: OrderedDict = OrderedDict()   # digest -> (weakref to the observer or None, answer)
_shapes_lock = threading.Lock()


def infer_shapes(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """name -> (shape tuple or None, numpy dtype) for every tensor, with inputs fixed to
    ``input_shapes`` (default: dynamic dims set to 1). Shapes static inference cannot resolve
    come from running the model when an observer is active (see ``observing``).

    The answer depends only on what inference reads: the graph without its large non-integer
    weights (those stand in as inputs of their dtype and dims, ``_without_weight_data``) with the
    inputs at ``input_shapes``, and the active observer. A digest of that serialized copy names
    the answer, and the last ``_SHAPES_KEPT`` answers are kept: a model counted again, or
    another with the same structure and dims (a pass's input costed by the pipeline and by the
    pass, a refit's weights-only candidates), is not inferred again. The caller gets a copy."""
    m = _without_weight_data(model)
    shapes = input_shapes or concrete_input_shapes(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            shp = vi.type.tensor_type.shape
            del shp.dim[:]
            for d in shapes[vi.name]:
                shp.dim.add().dim_value = int(d)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    observer = _OBSERVER.get()
    key = hashlib.sha1(m.SerializeToString(deterministic=True)).digest()
    with _shapes_lock:
        kept = _shapes_memo.get(key)
        if kept is not None and (kept[0] is None if observer is None else kept[0] is not None and kept[0]() is observer):
            _shapes_memo.move_to_end(key)
            return dict(kept[1])
    info = _inferred(model, m, shapes, observer)
    with _shapes_lock:
        _shapes_memo[key] = (None if observer is None else weakref.ref(observer), info)
        _shapes_memo.move_to_end(key)
        while len(_shapes_memo) > _SHAPES_KEPT:
            _shapes_memo.popitem(last=False)
    return dict(info)


def _inferred(model, m, shapes, observer) -> dict:
    """``infer_shapes``' answer for ``model`` from ``m``, its copy prepared for inference."""
    m = _static_inference(m)
    info = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            shape = tuple(dims) if all(d is not None for d in dims) else None
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        except Exception:
            dtype = None
        info[vi.name] = (shape, dtype)
    for t in m.graph.initializer:   # the weights stood in as inputs: their dims came with them above
        info[t.name] = (tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    if observer is not None:
        unknown = [o for n in model.graph.node for o in n.output if o and info.get(o, (None,))[0] is None]
        if unknown:
            seen = observer.observe(model, shapes) or {}
            for name in unknown:
                if name in seen:
                    info[name] = (tuple(seen[name]), info.get(name, (None, None))[1])
    return info


# Layers already quantized in QOperator form (ONNX's and ONNX Runtime's contrib ops): their
# weights are integer codes with scales; no pass rewrites them.
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd",
    "QLinearMul", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
    "MatMulBnb4", "QOrderedMatMul", "QLinearConvTranspose", "DynamicQuantizeLSTM", "QLinearSoftmax",
})


def is_quantized_layer(node) -> bool:
    """A node (onnx NodeProto or graphsurgeon Node) of a layer in QOperator form."""
    return getattr(node, "op_type", None) in QUANTIZED_OPS or getattr(node, "op", None) in QUANTIZED_OPS


# ----------------------------------------------------------------------------- building nodes
class Emitter:
    """The one node builder: appends nodes to a graphsurgeon graph, every new node, tensor and
    constant named through ``fresh_name`` (checked against the graph's tensor and node names and
    the names this builder made). Names are ``{prefix}/{base}_{k}`` (k counts this builder's
    names) unless a ``name=`` is given, which is kept when free. Constants built through
    ``shared_const`` are made once per key and reused (``shared``: a dict several builders share).

        em = Emitter(graph, node.name + "/fastfood", dtype=np.float32, opset=17)
        y = em.op("MatMul", [x, em.const(w, "W")])
    """

    def __init__(self, graph: gs.Graph, prefix: str = "", shared: dict | None = None, dtype=np.float32,
                 opset: int = 17):
        self.graph, self.prefix, self.dtype, self.opset = graph, prefix, dtype, opset
        self.shared = {} if shared is None else shared
        self.nodes = []
        self._k = 0
        self._taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def name(self, base: str, exact: str | None = None) -> str:
        """A fresh name: ``exact`` when free, else ``{prefix}/{base}_{k}``."""
        if exact is not None:
            return fresh_name(self._taken, exact)
        self._k += 1
        return fresh_name(self._taken, f"{self.prefix}/{base}_{self._k}" if self.prefix else f"{base}_{self._k}")

    _name = name

    def const(self, value, base="const", dtype=None, name: str | None = None) -> gs.Constant:
        value = np.ascontiguousarray(np.asarray(value, dtype=dtype or self.dtype))
        return gs.Constant(self.name(base, name), value)

    def ints(self, values, base="shape", name: str | None = None) -> gs.Constant:
        return gs.Constant(self.name(base, name), np.asarray(values, dtype=np.int64))

    def shared_const(self, key, make, name: str) -> gs.Constant:
        """The constant for ``key`` in ``shared``, made once from ``make()`` under ``name``."""
        if key not in self.shared:
            self.shared[key] = gs.Constant(fresh_name(self._taken, name), make())
        return self.shared[key]

    def variable(self, base: str, dtype=None, name: str | None = None) -> gs.Variable:
        return gs.Variable(self.name(base, name), dtype=dtype or self.dtype)

    def op(self, op, inputs, attrs=None, out=None, dtype=None, name: str | None = None):
        """Append ``op`` (inputs, attrs) and return its output: ``out`` when given, else a new
        variable named after the node (``{node}_out``). ``name``: the node's name, when free."""
        node_name = self.name(op, name)
        y = out if out is not None else gs.Variable(fresh_name(self._taken, node_name + "_out"),
                                                    dtype=dtype or self.dtype)
        node = gs.Node(op, node_name, attrs or {}, inputs, [y])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return y

    # ------------------------------------------------------------------ building blocks
    def reshape(self, x, shape):
        return self.op("Reshape", [x, self.ints(shape)])

    def swap_last(self, x, rank):
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.op("Transpose", [x], {"perm": perm})

    def pad_last(self, x, rank, amount):
        pads = [0] * rank + [0] * (rank - 1) + [amount]
        return self.op("Pad", [x, self.ints(pads, "pads")], {"mode": "constant"})

    def reduce_sum(self, x, axis):
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints([axis], "axes")], {"keepdims": 0})
        return self.op("ReduceSum", [x], {"axes": [axis], "keepdims": 0})

    def slice_last(self, x, stop):
        return self.op("Slice", [x, self.ints([0], "starts"), self.ints([stop], "ends"), self.ints([-1], "axes")])


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_graphs(g)


def _names(model: onnx.ModelProto) -> tuple[set, set]:
    """(node names, tensor names) of the model, its subgraphs included."""
    nodes, tensors = set(), set()
    for g in all_graphs(model.graph):
        nodes.update(n.name for n in g.node)
        for n in g.node:
            tensors.update(n.input)
            tensors.update(n.output)
        tensors.update(t.name for t in g.initializer)
        tensors.update(t.values.name for t in g.sparse_initializer)
        tensors.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
    return nodes, tensors


def compact_names(model: onnx.ModelProto, before: onnx.ModelProto, prefix: str = "q", keep=None) -> int:
    """Rename, in place, the nodes and the inner tensors ``model`` has and ``before`` (the model a
    pass started from) has not, to short unique names (``q0``, ``q1``, ... base 36): a pass's
    decode subgraphs cost their names' bytes in the file (mtcnn_rnet's pq: 2.1 of 53 kB). Kept:
    every name ``before`` has, initializers (the stored weights, named after what they encode), the
    graphs' inputs and outputs and the tensor names ``keep(name)`` is true of. Returns the number of
    names changed."""
    old_nodes, old_tensors = _names(before)
    graphs = list(all_graphs(model.graph))
    kept = old_tensors | {t.name for g in graphs for t in g.initializer} \
        | {t.values.name for g in graphs for t in g.sparse_initializer} \
        | {v.name for g in graphs for v in list(g.input) + list(g.output)}
    taken = old_nodes | old_tensors | set().union(*_names(model))
    fresh = (prefix + np.base_repr(i, 36).lower() for i in itertools.count())   # never the same twice

    def short() -> str:
        return next(name for name in fresh if name not in taken)

    renamed: dict = {}
    for g in graphs:
        for n in g.node:
            for name in list(n.output) + list(n.input):
                if name and name not in kept and name not in renamed and not (keep and keep(name)):
                    renamed[name] = short()
    changed = len(renamed)
    for g in graphs:
        for n in g.node:
            if n.name not in old_nodes:
                n.name = short()
                changed += 1
            for i, name in enumerate(n.input):
                if name in renamed:
                    n.input[i] = renamed[name]
            for i, name in enumerate(n.output):
                if name in renamed:
                    n.output[i] = renamed[name]
        for v in g.value_info:
            if v.name in renamed:
                v.name = renamed[v.name]
    return changed
