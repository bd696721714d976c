"""The pq pass: which layers it quantizes (``check``), in what order, and what it reports.

The numerics live beside it (``kmeans``, ``gptq``, ``quantize``: one layer's codebook and codes;
``target``: what a layer is quantized toward; ``search``: the size budget), the graph edits in
``edits`` (the decode subgraph, the biases), the byte counts in ``sizes``.
"""

from __future__ import annotations

import time
import weakref
import zlib
from dataclasses import replace

import numpy as np

from ...calibrate import data_memo
from ...graph import compact_names, export_model, import_graph
from ...lstsq import deterministic, weighted_error
from ...refit import refit_levels, shared_levels
from ...registry import Pass, PassReport, Plan, Requires, Skip
from .codec import code_bytes
from .config import PqConfig
from .edits import HALF_ERROR, HALF_SUFFIX, refit_biases, replace_weight, store_half
from .layer import default_block, ladder, layer_of, shared_layer, subgraph_nodes, tables
from .quantize import SCREEN_MARGIN, Screens, budget_error, quantize
from .search import ALLOC_TOLERANCE, LOOSEN_WIDE_BYTES, allocate, loosened, size_search, tightened
from .sizes import code_width, dense_bytes, forget_bytes, pq_bytes, setting_bytes, weight_bytes
from .target import layer_problem, moments, outer_twin, requests


class Pq(Pass):
    name = "pq"
    summary = "store weights as product-quantized codebooks decoded in the graph"
    Config = PqConfig
    requires = Requires(data=True)
    budgets = ("bytes",)

    # ------------------------------------------------------------------------- what is quantized
    def check(self, layer, cfg, first_conv: str | None, total: int | None = None) -> str | None:
        """Why ``layer`` stays float, or None when it is quantized; ``first_conv``: the name of
        the model's first Conv; ``total``: the weight bytes of all the model's layers (a first
        Conv holding at least a quarter of them, such as an STFT written as Conv, is quantized;
        None: the first Conv stays dense)."""
        if not np.isfinite(layer.weight.values).all():
            return f"weights contain NaN or Inf values ({layer.weight.name}): not quantized"
        nbytes = layer.n_weights * layer.weight.values.dtype.itemsize
        if first_conv in {n.name for n in layer.nodes} and not cfg.first_conv and (total is None or 4 * nbytes < total):
            return ("first conv stays dense: %d B, under a quarter of the model's weight bytes "
                    "(pq.first_conv=true to quantize it)" % nbytes)
        if nbytes < cfg.min_bytes:
            return f"small layer: {nbytes} B of weights < pq.min_bytes={cfg.min_bytes}, stays float (little to gain)"
        d = default_block(layer, cfg)
        if layer.d_in % d:
            return f"sub-vector length {d} does not divide the {layer.d_in} input features"
        dense = dense_bytes(layer)
        coded = setting_bytes(layer, d, min(cfg.centroids, layer.n_weights // d), cfg)
        if coded >= dense:
            return f"small layer: codes + codebook ({coded} B) would not save bytes over the dense weight ({dense} B)"
        return None

    @staticmethod
    def _layers(graph, refused: set | None = None):
        """(layer, []) for each weight layer of the graph, one per weight (a shared weight: one
        layer over all its readers), or (None, [Skip]) for weight layers that cannot be one;
        ``refused`` (a set) gets the ids of the weight inputs of the main graph's nodes that
        cannot be rewritten (no table either)."""
        seen = set()
        inner = {id(n) for n, _ in subgraph_nodes(graph)}
        for node, where in [(n, graph) for n in graph.nodes] + list(subgraph_nodes(graph)):
            layer, reason = layer_of(node, where)
            if layer is None:
                if reason:
                    if refused is not None and where is graph and len(node.inputs) > 1:
                        refused.add(id(node.inputs[1]))
                    yield None, [Skip(node.name, reason)]
                continue
            layer.inner = any(id(n) in inner for n in layer.weight.outputs)
            if layer.inner and where is not graph and len(layer.weight.outputs) == 1 and node.op in ("Gemm", "MatMul"):
                layer.outer_x = outer_twin(node.inputs[0], where, graph)
            if id(layer.weight) in seen:
                continue  # a shared weight: handled with its first reader
            seen.add(id(layer.weight))
            if len(layer.weight.outputs) > 1:
                shared, reason = shared_layer(layer)
                if shared is None:
                    yield None, [Skip(n.name, reason) for n in layer.weight.outputs]
                    continue
                layer = shared
            yield layer, []

    def _scan(self, graph, cfg):
        """[(layer, d)] to quantize and [Skip]."""
        first_conv = next((n.name for n in graph.nodes if n.op in ("Conv", "ConvTranspose")), None)
        todo, skipped, found, refused = [], [], [], set()
        for layer, skips in self._layers(graph, refused):
            skipped.extend(skips)
            if layer is not None:
                found.append(layer)
        # weights of layers that cannot be rewritten are no tables either
        found.extend(tables(graph, {id(layer.weight) for layer in found} | refused))
        total = sum(layer.n_weights * layer.weight.values.dtype.itemsize for layer in found)
        for layer in found:
            reason = self.check(layer, cfg, first_conv, total)
            if reason:
                skipped.extend(Skip(n.name, reason) for n in layer.nodes)
            else:
                todo.append((layer, default_block(layer, cfg)))
        return todo, skipped

    def plan(self, model, cfg):
        todo, skipped = self._scan(import_graph(model), cfg)
        return Plan(nodes=[n.name for layer, _ in todo for n in layer.nodes], skipped=skipped)

    # ------------------------------------------------------------------------- the rewrite
    def apply(self, model, cfg, ctx):
        def fit(c):
            return self._apply(model, c, ctx)
        rule = replace(cfg, loosen="false")   # the per-layer rule at a given budget, for the tries
        ruled = cfg.max_error > 0 and "bytes" not in ctx.goals
        if ruled and (cfg.loosen == "true" or (cfg.loosen == "auto" and ctx.cost(model)["bytes"] <= LOOSEN_WIDE_BYTES)):
            out, rep = loosened(ctx, model, fit, rule)
            if rep.details["loosen"]["scale"] != 1.0:
                return out, rep   # a looser try passed the gate at half its margins on held-out units
        else:
            out, rep = fit(cfg)
        if ruled and cfg.tighten:
            return tightened(ctx, out, rep, fit, rule)
        return out, rep

    def _apply(self, model, cfg, ctx):
        graph = import_graph(model)
        report = PassReport(self.name)
        todo, skipped = self._scan(graph, cfg)
        report.skipped.extend(skipped)
        todo = ctx.unprotected(todo, lambda t: [n.name for n in t[0].nodes], report)   # the accuracy search's
        blocks = {layer.node.name: (layer, d, min(cfg.centroids, layer.n_weights // d)) for layer, d in todo}
        searched = "bytes" in ctx.goals and bool(blocks)
        ctx = ReferenceStats(ctx)   # statistics on the model the pass starts from: collected once
        if searched:
            chosen, report.details["size_search"] = size_search(
                ctx, model, {n: b[0] for n, b in blocks.items()}, cfg, ctx.goals["bytes"])
            for name in sorted(blocks):
                if chosen[name] is None:
                    report.skip(name, "kept dense by the size budget (no other setting lowers the error for its bytes)")
                    del blocks[name]
                else:
                    blocks[name] = (blocks[name][0],) + chosen[name]
        budget = cfg.max_error if (cfg.max_error > 0 and not searched) else None
        allow = {}
        if budget is not None and cfg.allocate and blocks:
            chosen, report.details["allocation"] = allocate(ctx, model, blocks, cfg, budget)
            for name in sorted(chosen):
                if chosen[name] is None:
                    report.skip(name, "kept float by the error allocation (its bytes are worth less than its error)")
                    del blocks[name]
                    continue
                est = report.details["allocation"]["layers"][name]["estimated_rel_error"]
                allow[name] = (chosen[name], max(budget, ALLOC_TOLERANCE * est))
        use_stats = cfg.aware or cfg.bias_correct
        info_all = {}
        runtime = {"before": weight_bytes(graph), "decoded": 0, "stored": 0}
        file_before = ctx.cost(model)["bytes"]
        bar = ctx.bar(total=len(blocks), desc="pq")

        def wanted(name, graph):
            layer = blocks[name][0]
            return requests(layer, cfg) if (layer.aware and use_stats) or (layer.outer_x and cfg.aware) else []

        def solve(name, stats, graph, level):
            """The layer's codes (on a pool worker: reads the graph, edits nothing)."""
            layer = blocks[name][0]
            has = (layer.aware and use_stats) or (layer.outer_x and cfg.aware)
            cm, per_node = moments(layer, stats, cfg) if has else (None, {})
            return self._fit(ctx, name, blocks[name], cm, cfg, budget, allow.get(name)), per_node

        def rewrite(name, solved, graph, level) -> bool:
            layer = blocks[name][0]
            (info, reason), per_node = solved
            if info is None:
                report.skip(name, reason)
                bar.update(1, postfix=f"{name}: float")
                return False
            self._write(graph, layer, info, per_node)
            runtime["decoded"] += info["bytes"][0]
            runtime["stored"] += info["bytes"][1]
            info_all[name] = info
            report.changed.extend(n.name for n in layer.nodes)
            report.unit(name, [n.name for n in layer.nodes], 1.0 - info["bytes"][1] / max(info["bytes"][0], 1))
            bar.update(1, postfix=f"{name}: d={info['block']} K={info['centroids']}")
            return True

        out = refit_levels(ctx, model, None, solve, rewrite, requests=wanted, levels=self._levels(graph, blocks, cfg),
                           graph=graph, desc="pq statistics")
        bar.close()
        report.details["layers"] = info_all
        report.details["codebook_dtype"] = cfg.codebook_dtype
        if out is model:  # nothing quantized: the graph as imported
            with ctx.timed("export"):
                out = export_model(graph, like=model)
        if cfg.float16 and cfg.codebook_dtype == "fp16":   # what stays float32, as fp16 where that saves bytes
            with ctx.timed("export"):
                half = import_graph(out)
                held = store_half(half, cfg.max_error if cfg.max_error > 0 else HALF_ERROR, kept=set(ctx.protected),
                                  short_names=cfg.short_names)
                if held:
                    out = export_model(half, like=model)
                    runtime["decoded"] += held
        if cfg.short_names and out is not model:
            report.details["short_names"] = compact_names(out, model, keep=lambda n: n.endswith(".pq"))
        report.details["memory"] = self._memory(ctx, out, file_before, runtime)
        return out, report

    @staticmethod
    def _levels(graph, blocks, cfg) -> list:
        """The groups of layers quantized together: sequential, topological levels (merged into
        at most ``pq.rounds`` statistics rounds); otherwise one group."""
        if not (cfg.sequential and cfg.aware):
            return [sorted(blocks)]
        inner = sorted(n for n, b in blocks.items() if b[0].inner)  # no statistics: done last, in one group
        levels = merge_levels(shared_levels(graph, {n: [x.name for x in b[0].nodes] for n, b in blocks.items()
                                                    if not b[0].inner}), cfg.rounds)
        return levels + ([inner] if inner else [])

    def _fit(self, ctx, name, block, cm, cfg, budget, allowed=None):
        """Quantize one layer: (its report entry, None), or (None, why it stays float); the entry
        holds what ``_write`` puts into the graph under "write" (it edits nothing itself, so the
        layers of a level are fitted at once on the worker pool). Under the error ``budget``
        shorter sub-vectors are tried in turn; ``allowed``: ((d, K) the error allocation chose,
        the error allowed there), the ladder then starts at that setting and the allowed error
        replaces ``budget``. A setting but the last is screened first (``quantize.Screens``) and
        not fitted in full when its screen, or that of a later setting nesting it, is over
        ``SCREEN_MARGIN`` times the budget; the kept setting's codes are its full fit's, as without
        the screen."""
        layer, d, k = block
        forget_bytes(layer)   # counted afresh: the rewrites before this one may have copied a bias it shares
        t, h, fit = layer_problem(layer, cm, cfg)
        tq = time.perf_counter()
        tried, cache = [], {}
        settings = ladder(layer, d, k, cfg) if budget is not None else [(d, k)]
        if allowed is not None:  # the allocation's setting first, then the more costly ones
            start, budget = allowed
            settings = settings[settings.index(start):] if start in settings else settings
        halves = halvings(settings) if budget is not None else {}
        kept, kept_err = None, None   # (d, K) within the budget and its (codebook, codes, T̂), its error
        order = fit_order(settings, halves)
        screens = Screens(t, h, cfg, cfg.dtype, cache, lambda: np.random.default_rng([ctx.seed, zlib.crc32(name.encode()), 1]),
                          SCREEN_MARGIN * budget if budget is not None else None,
                          [s for s in order if s != settings[-1] and s not in halves])
        for d_try, k_try in order:
            parent = halves.get((d_try, k_try))
            if parent is not None:   # fewer centroids than the kept setting: only where it may be within
                if kept is None:   # its setting of twice the centroids is over the budget: so is this one
                    continue
                if kept[0] != parent or kept_err * 2 ** (2 / d_try) > HALVING_SLACK * budget:
                    break
            # a setting screened far over the budget is not fitted (the ladder's last is: kept float
            # or not, it decides; a halving is already judged from its parent's full fit)
            elif budget is not None and (d_try, k_try) != settings[-1]:
                over = screens.over((d_try, k_try))
                if over is not None:
                    tried.append((d_try, k_try, over[0], over[1]))
                    continue
            rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])
            with deterministic():   # timed as "fit" by the refit loop
                cb, codes, t_hat = quantize(t, d_try, k_try, h if cfg.aware else None, cfg, rng, cfg.dtype, cache)
            err = budget_error(t, t_hat, h, cache=cache)
            tried.append((d_try, len(cb), err, None))
            if budget is None or err <= budget:
                kept, kept_err = ((d_try, k_try), (cb, codes, t_hat)), err
                if (d_try, k_try) not in halves.values():
                    break
            elif parent is not None or kept is not None:
                break
        seconds = time.perf_counter() - tq
        if kept is None:
            return None, ("kept float: relative output error over pq.max_error=%g at every setting tried (%s)"
                          % (budget, ", ".join(f"d={a} K={b}: {e:.4g}{_screened(a, b, s)}" for a, b, e, s in tried)))
        (d, _), (cb, codes, t_hat) = kept
        bits = code_width(layer, d, len(cb), cfg.dtype, cfg)
        if budget is not None and pq_bytes(layer, d, len(cb), cfg.dtype, fit, bits) >= dense_bytes(layer):
            return None, f"kept float: the setting within pq.max_error (d={d} K={len(cb)}) would not save bytes"
        info = {"block": d, "centroids": int(len(cb)),
                "metric": "activation" if (h is not None and cfg.aware) else "weights",
                "rel_weight_error": round(weighted_error(layer.matrix().astype(np.float64), t_hat), 6)}
        if len(layer.nodes) > 1:
            info["shared_by"] = [n.name for n in layer.nodes]
            info["weight"] = layer.weight.name
        if h is not None:
            info["rel_output_error"] = round(weighted_error(t, t_hat, h), 6)
        if len(tried) > 1:
            info["tried"] = [{"block": a, "centroids": b, "rel_error": round(e, 6),
                              **({"screened": True} if s else {}), **({"screened_as": list(s)} if s and s != (a, b) else {})}
                             for a, b, e, s in tried]
        if fit:
            info["bias_refit"] = True
        info["write"] = (t_hat, cm, cb, codes, bits, fit)
        dense = layer.n_weights * layer.weight.values.dtype.itemsize
        stored = code_bytes(codes.size, bits) + int(cb.nbytes)
        info["bits"] = bits
        info["bytes"] = [dense, stored]
        info["seconds"] = round(seconds, 2)
        return info, None

    @staticmethod
    def _write(graph, layer, info, per_node):
        """Put the codes ``_fit`` found into the graph: the biases refit, the readers reading the
        decode (``info``'s "write" is taken out of it)."""
        t_hat, cm, cb, codes, bits, fit = info.pop("write")
        if fit:
            refit_biases(layer, t_hat, cm, per_node)
        replace_weight(graph, layer, cb, codes, bits)

    @staticmethod
    def _memory(ctx, out, file_before, runtime) -> dict:
        """The file's bytes and the weight bytes a runtime holds, before and after."""
        after = weight_bytes(import_graph(out), skip=(".pq_codebook", HALF_SUFFIX))
        return {
            "file_bytes": {"before": int(file_before), "after": int(ctx.cost(out)["bytes"])},
            "runtime_weight_bytes": {"before": int(runtime["before"]), "after": int(after + runtime["decoded"])},
            "note": ("ONNX Runtime folds the decode subgraphs at load: the weights it holds are the decoded "
                     "float tensors, as large as the original ones (runtime_weight_bytes); pq makes the file "
                     "smaller, not the resident memory"),
        }


def _screened(d, k, by) -> str:
    """How a setting ``tried`` was judged by a screen: its own, or that of a setting nesting it."""
    if not by:
        return ""
    return " (screened)" if tuple(by) == (d, k) else f" (screened as d={by[0]} K={by[1]}, which nests it)"


HALVING_SLACK = 1.0   # half the centroids are fitted unless their predicted error is over this many times the budget


def halvings(settings: list) -> dict:
    """{(d, K/2): (d, K)} for the settings of the ladder with at most 32 centroids (5-bit codes)
    whose setting with twice the centroids comes later: such a setting is fitted only after that
    one is within the budget (``fit_order``), and only where the error predicted from it, e·2^(2/d)
    (the error of a d-dimensional quantizer falls about as K^(−2/d)), is within ``HALVING_SLACK``
    times the budget (captcha_crnn, mtcnn_onet/rnet: from 32 to 64 scalar centroids the errors of
    their Convs fell 4.0–5.7 fold, one 37 fold; every 5-bit setting within the budget came from a
    6-bit error under 7e-5)."""
    pos = {s: i for i, s in enumerate(settings)}
    return {(d, k): (d, 2 * k) for d, k in settings
            if 16 < k <= 32 and pos.get((d, 2 * k), -1) > pos[(d, k)]}


def fit_order(settings: list, halves: dict) -> list:
    """The ladder with each of ``halvings`` moved to just after its setting of twice the centroids."""
    order = [s for s in settings if s not in halves]
    for child, parent in halves.items():
        order.insert(order.index(parent) + 1, child)
    return order


_MEMO = weakref.WeakKeyDictionary()   # calibration data -> (model, seed, batch size, {request: statistics})


class ReferenceStats:
    """The pass's context whose ``collect`` keeps the statistics gathered on the model the pass
    starts from (x and y both from ``ctx.reference``) per request, for as long as the calibration
    data lives: the size search and the first statistics round ask for the same ones, and so do
    the steps of an accuracy search, which run the pass again on the same data from the same
    model. Such a request is collected once; the statistics are the same (the sampling of rows
    depends on the seed, the batch and the request only). Everything else is ``ctx``'s."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def _memo(self) -> dict | None:
        return data_memo(_MEMO, self._ctx, self._ctx.reference)

    def collect(self, requests, model_x=None, model_y=None, desc="calibration"):
        ctx = self._ctx
        on_reference = (model_x is None or model_x is ctx.reference) and (model_y is None or model_y is ctx.reference)
        memo = self._memo() if on_reference else None
        if memo is None:
            return ctx.collect(requests, model_x=model_x, model_y=model_y, desc=desc)
        key = {r.key: (type(r).__name__, repr(r)) for r in requests}
        todo = [r for r in requests if key[r.key] not in memo]
        if todo:
            got = ctx.collect(todo, model_x=model_x, model_y=model_y, desc=desc)
            for r in todo:
                memo[key[r.key]] = got[r.key]
        return {r.key: memo[key[r.key]] for r in requests}


def merge_levels(levels: list, rounds: int) -> list:
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
