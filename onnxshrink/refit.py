"""The sequential refit loop: collect on the rewritten model → solve → write → next level.

After a structural change, each weight layer downstream is refit so that, fed by the *rewritten*
network's activations, it reproduces the *reference* network's output (``lstsq``). A layer's
inputs depend on the layers before it, so layers are refit in topological levels: a layer's level
is 1 + the highest level of a refit layer upstream of it (``refit_order``). Layers of one level do
not feed each other, so one calibration run of the model as rewritten so far serves the whole
level; the level's edits are then exported and the next level collects on that model (sequential
reconstruction, as in ThiNet and the channel-pruning papers, and layer-wise as in GPTQ). A level
whose edits replaced weights only (no node, name or attribute changed) has its model made by
replacing those initializers in the last one, not by exporting the whole graph again; the targets
the reference gives every level are fetched once where that gives the same values
(``PassContext.want_reference``).

``refit_levels`` is that loop; a pass gives what differs: the requests of a layer, ``solve`` and
``write`` (into the graph). Options cover the variants the passes need: a second round in the
same level (``Again``: e.g. refit the second factor of a split layer on its own new inputs), levels
given by the pass (merged for fewer runs), requests of later levels gathered ahead in one run while
nothing upstream changes (``ahead``), and a graph re-imported from each level's model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .graph import export_model, import_graph
from .model_io import EXTERNAL_THRESHOLD, has_lazy, weight_bytes
from .parallel import ordered_map


def refit_order(graph: gs.Graph, names) -> list[list[str]]:
    """Group nodes to refit into levels: a node's level is 1 + the highest level of a refit node
    upstream of it. Nodes in one level do not feed each other, so one calibration run serves them
    all; levels are refit in order (sequential reconstruction)."""
    names = set(names)
    level = {}
    upstream_level = {}  # tensor name -> max level of refit nodes upstream
    for node in graph.nodes:  # graph must be toposorted
        lv_in = max([upstream_level.get(t.name, -1) for t in node.inputs if not isinstance(t, gs.Constant)] + [-1])
        if node.name in names:
            level[node.name] = lv_in + 1
            lv_out = lv_in + 1
        else:
            lv_out = lv_in
        for t in node.outputs:
            upstream_level[t.name] = lv_out
    groups = {}
    for n, lv in level.items():
        groups.setdefault(lv, []).append(n)
    return [sorted(groups[k]) for k in sorted(groups)]


def shared_levels(graph: gs.Graph, groups: dict) -> list[list[str]]:
    """``refit_order`` for layers that may span several nodes (a weight shared by several readers):
    ``groups`` maps a layer key to its nodes' names; a layer's level is that of its earliest reader
    (its statistics are gathered with the weight itself still as it was), levels renumbered 0, 1, …"""
    order = refit_order(graph, [n for names in groups.values() for n in names])
    level_of = {n: i for i, names in enumerate(order) for n in names}
    first = {key: min(level_of[n] for n in names) for key, names in groups.items()}
    out = {}
    for key, lv in first.items():
        out.setdefault(lv, []).append(key)
    return [sorted(out[k]) for k in sorted(out)]


@dataclass
class Again:
    """Returned by ``write`` (or ``solve`` alone): once the level's edits are exported, collect ``requests`` on that model
    (one run for all of a level's ``Again``s) and call ``fit(stats, graph)``."""

    requests: list
    fit: Callable


@dataclass
class Level:
    """Where the loop is, for ``solve``/``write``: level ``index`` of ``count``, its layer ``keys``, and the
    model the level's statistics were collected on."""

    index: int
    count: int
    keys: list
    model: onnx.ModelProto


def refit_levels(ctx, model: onnx.ModelProto, layers, solve: Callable, write: Callable | None = None,
                 requests: Callable | None = None, *,
                 levels: list | None = None, graph: gs.Graph | None = None, desc: str = "refit",
                 reimport: bool = False, ahead: Callable | None = None, like: onnx.ModelProto | None = None,
                 model_y: onnx.ModelProto | None = None, export_copy: bool = False,
                 parallel: bool | None = None) -> onnx.ModelProto:
    """Refit ``layers`` level by level and return the rewritten model (``model`` when no level
    changed anything).

    - ``layers``: {key: [node names]} (a layer that spans several nodes, e.g. a shared weight, is at
      the level of its earliest reader) or an iterable of node names (each its own key); ignored
      when ``levels`` ([[key]] in order) is given.
    - ``requests(key, graph) -> [stats.Request]``: what to collect for a layer (x from the model as
      rewritten so far, y from ``model_y``, default ``ctx.reference``); None or [] for none. A level
      without requests is not collected.
    - ``solve(key, stats, graph, level) -> result``: ``stats`` is {request key: accumulator} of the
      level (``level``: a ``Level``); ``write(key, result, graph, level) -> None | bool | Again``
      puts the result into ``graph``. Without ``write``, ``solve`` writes too and its return is
      read as write's: False when the graph was left as it was (no export; statistics gathered
      ahead stay valid), an ``Again`` for a second round in this level, else None/True.
    - ``graph``: the graph the edits go into (default: imported from ``model``); with
      ``reimport=True`` a fresh graph is imported from each level's model instead, except where
      ``graph`` is the one that model was exported from (the same graph, as re-importing gives).
    - ``ahead(levels_left) -> n``: gather the requests of the next n levels (≥ 1) in one run; their
      statistics are used while no level between changes the graph (default 1: one run a level).
    - ``like``: the model whose opsets and metadata exports keep (default ``model``);
      ``desc``: the progress label ("{desc} {i}/{n}").
    - ``export_copy``: export a copy of ``graph`` at each level, leaving the graph itself as the
      pass built it (its node order, its tensors' shapes); by default the export cleans up, sorts
      and drops intermediate shapes in place.
    - ``parallel``: with ``write``, solve the keys of a level at once (``parallel.ordered_map``),
      then write them in key order (False: one after the other). ``solve`` must then leave the
      graph as it is and run no calibration (it computes, ``write`` edits): the results do not
      depend on the worker count.

    Timing (``ctx.timed``): ``solve``/``write`` and an ``Again``'s fit count as "fit", the level
    exports as "export", the runs as calibration/statistics/session; a pass times only what it does
    inside ``solve`` that is another part (a structure search: "search"), which nested blocks
    subtract from the enclosing "fit".
    """
    like = model if like is None else like
    model_y = ctx.reference if model_y is None else model_y
    if graph is None or reimport:
        graph = import_graph(model)
    if levels is None:
        groups = layers if isinstance(layers, dict) else {n: [n] for n in layers}
        levels = shared_levels(graph, groups)
    levels = [list(lv) for lv in levels]
    _want_targets(ctx, model_y, graph, levels, requests)
    incremental = getattr(ctx, "incremental", None)
    with incremental() if incremental is not None else contextlib.nullcontext():
        return _loop(ctx, model, graph, levels, solve, write, requests, desc, reimport, ahead, like, model_y,
                     export_copy, parallel)


def _loop(ctx, model, graph, levels, solve, write, requests, desc, reimport, ahead, like, model_y, export_copy,
          parallel):
    current = model
    cached: dict = {}        # level index -> stats gathered ahead on ``current``
    sync = None              # ``graph`` as ``current`` was exported from it (``_export``)
    for i, keys in enumerate(levels):
        if reimport and i > 0 and sync is None:
            graph = import_graph(current)
        stats = cached.pop(i, None)
        if stats is None:
            n = max(1, int(ahead(levels[i:]))) if ahead is not None else 1
            stats = _collect(ctx, current, model_y, graph, levels, range(i, min(i + n, len(levels))), requests,
                             f"{desc} {i + 1}/{len(levels)}", cached)
        level = Level(i, len(levels), keys, current)
        changed, again = False, []
        solved = None
        if write is not None and parallel is not False and len(keys) > 1:
            with ctx.timed("fit"):
                solved = ordered_map(lambda key: solve(key, stats, graph, level), keys)
        for j, key in enumerate(keys):
            with ctx.timed("fit"):   # a pass's search or collection inside counts as its own part
                out = solve(key, stats, graph, level) if solved is None else solved[j]
                if write is not None:
                    out = write(key, out, graph, level)
            if out is not False:
                changed = True
            if isinstance(out, Again):
                again.append(out)
        if not changed:
            continue
        cached.clear()
        with ctx.timed("export"):
            current, sync = _export(graph, current, like, export_copy, sync)
        if again:
            reqs = [r for a in again for r in a.requests]
            got = ctx.collect(reqs, model_x=current, model_y=model_y, desc=f"{desc} {i + 1}/{len(levels)} (again)") \
                if reqs else {}
            with ctx.timed("fit"):
                for a in again:
                    a.fit(got, graph)
            with ctx.timed("export"):
                current, sync = _export(graph, current, like, export_copy, sync)
    if sync is not None and sync.patched:   # the model returned is always a full export
        with ctx.timed("export"):
            current = export_model(graph, like=like)
    return current


@dataclass
class _Sync:
    """``graph`` as the model it was last exported to: its structure and its constants (by
    name, the objects themselves), and whether that model was patched rather than exported."""

    structure: tuple
    constants: dict
    patched: bool = False


def _attr_key(v):
    if isinstance(v, (bool, int, float, str, bytes)) or v is None:
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str, bytes)) for x in v):
        return tuple(v)
    if isinstance(v, gs.Graph):
        raise _Unpatchable
    return ("object", id(v))


class _Unpatchable(Exception):
    pass


def _snapshot(graph: gs.Graph, patched: bool = False) -> _Sync | None:
    try:
        nodes = tuple((n.name, n.op, n.domain, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs),
                       tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items()))) for n in graph.nodes)
    except _Unpatchable:   # a subgraph: its weights are not initializers of the main graph
        return None
    structure = (nodes, tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs))
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    return _Sync(structure, constants, patched)


def _export(graph, current, like, export_copy, sync):
    """(the model of ``graph`` after a level's edits, its ``_Sync``). Where the edits changed
    weights only (the graph's nodes, names and attributes as at the last export, some constants
    replaced), the last model with those initializers replaced: the same model as an export would
    give, without exporting (and re-importing) the whole graph; else ``export_model``. The loop's
    last model is always exported."""
    if sync is not None:
        patched = _patched(graph, current, sync)
        if patched is not None:
            return patched
    model = export_model(graph.copy() if export_copy else graph, like=like)
    # near the protobuf limit no patched copies (the weights' bytes, as ``calibrate.session``
    # decides: a model's ByteSize serializes it, a quarter second for a 100 MB model, every level)
    if export_copy or has_lazy(model) or weight_bytes(model) >= EXTERNAL_THRESHOLD:
        return model, None
    return model, _snapshot(graph)


def _patched(graph, current, sync):
    now = _snapshot(graph, patched=True)
    if now is None or now.structure != sync.structure:
        return None
    changed = [t for name, t in now.constants.items() if sync.constants.get(name) is not t]
    index = {t.name: k for k, t in enumerate(current.graph.initializer)}
    if any(t.name not in index or not isinstance(t._values, np.ndarray) for t in changed):
        return None
    protos = [OnnxExporter.export_tensor_proto(t) for t in changed]
    if any(p.data_type != current.graph.initializer[index[p.name]].data_type
           or p.data_location == onnx.TensorProto.EXTERNAL for p in protos):
        return None
    model = onnx.ModelProto()
    model.CopyFrom(current)
    for p in protos:
        model.graph.initializer[index[p.name]].CopyFrom(p)
    return model, now


def _want_targets(ctx, model_y, graph, levels, requests) -> None:
    """Ask the context to fetch the targets (y tensors) of every level after the first with the
    first run of ``model_y`` and keep them (``PassContext.want_reference``): the reference model
    then runs once for the whole loop, not once per level. A target not kept (the cache's cap)
    is fetched when its level asks for it."""
    want = getattr(ctx, "want_reference", None)
    if want is None or requests is None or len(levels) < 2 or model_y is not ctx.reference:
        return
    def names():   # read only where the cache fetches ahead
        for keys in levels[1:]:
            for key in keys:
                for r in requests(key, graph) or []:
                    yield from r.tensors()["y"]
    want(names())


def _collect(ctx, current, model_y, graph, levels, which, requests, desc, cached) -> dict:
    """Statistics of the levels ``which`` in one run; those after the first go into ``cached``."""
    if requests is None:
        return {}
    per_level = {j: [r for key in levels[j] for r in (requests(key, graph) or [])] for j in which}
    reqs = [r for j in which for r in per_level[j]]
    if not reqs:
        return {}
    got = ctx.collect(reqs, model_x=current, model_y=model_y, desc=desc)
    first = which[0]
    for j in which:
        if j != first:
            cached[j] = {r.key: got[r.key] for r in per_level[j]}
    return {r.key: got[r.key] for r in per_level[first]}
