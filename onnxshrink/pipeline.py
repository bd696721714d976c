"""The pipeline: load → normalise → check data → pass 1 → pass 2 … → validate → report.

Passes ask for statistics through ``PassContext.collect`` when they need them, on the model as
it is at that moment: a pass that runs after another sees the rewritten graph, and a pass that
reconstructs layer by layer asks again for each level (sequential reconstruction).

Temporary files of large models (see ``model_io``): each call writes rewritten weights into its own
``SpillStore``, owned by the returned ``Result`` (removed by ``Result.close()``, a ``with`` block,
or garbage collection) or removed at once when the call fails, unless the error carries a
``.result`` (ValidationFailed, TargetError), which then owns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import budget as budget_mod
from . import metrics as metrics_mod
from . import parallel
from . import search as search_mod
from .arguments import Data, Run, Targets, grouped
from .calibrate import collect as calibrate_requests   # the run itself; PassContext.collect is the passes' door
from .calibrate import (DataSource, RunCache, ShapeObserver, TensorCache, keep_session, keeping_sessions, load_data,
                        probe_batching, random_data, reference_cache_bytes, session, split_holdout)
from .cost import model_cost, unknown_flops
from .errors import (CalibrationError, InputError, OnnxShrinkError, PassError, UsageError,
                     ValidationFailed, first_line)
from .graph import all_graphs, is_quantized_layer, normalize, observing, opset
from .model_io import (SpillStore, Staging, active_store, check_output_paths, check_writable, has_external_data,
                       has_lazy, load_model, save_model, spilling)
from .registry import PassReport, Requires, get_pass, make_config
from .report import make_report, to_json
from .validate import STANDARD_DOMAINS, Tolerances, model_outputs, structural_problems, validate


TIMING_PARTS = ("calibration", "statistics", "session", "fit", "search", "export")
TIMING_HELP = {
    "calibration": "calibration inference (ONNX Runtime runs over the data)",
    "statistics": "statistics accumulation (moments, sampled rows)",
    "session": "ONNX Runtime session creation",
    "fit": "fitting and solving (factorizations, least squares, k-means; the refit loop's solve and write)",
    "search": "structure / budget search",
    "export": "graph export",
}


def profile_table(report) -> str:
    """Per pass, the seconds spent in each part (``--profile``)."""
    cols = TIMING_PARTS + ("other",)
    lines = [f"{'pass':12}{'total s':>9}" + "".join(f"{c:>13}" for c in cols) + f"{'calib runs':>12}"]
    for p in report["passes"]:
        t = p.get("timing") or {}
        lines.append(f"{p['name']:12}{p.get('seconds', 0.0):9.2f}" + "".join(f"{t.get(c, 0.0):13.2f}" for c in cols)
                     + f"{t.get('calibration_runs', 0):12d}")
    lines.append("; ".join(f"{k}: {v}" for k, v in TIMING_HELP.items()))
    return "\n".join(lines)


class _TimedRequest:
    """A statistics request whose accumulation time is added to ``timings['statistics']``."""

    def __init__(self, req, timings):
        self._req, self._timings = req, timings

    def __getattr__(self, name):
        return getattr(self._req, name)

    def new(self, xa, ya):
        t = time.perf_counter()
        try:
            return self._req.new(xa, ya)
        finally:
            self._timings["statistics"] += time.perf_counter() - t

    def update(self, acc, xa, ya, rng):
        t = time.perf_counter()
        try:
            return self._req.update(acc, xa, ya, rng)
        finally:
            self._timings["statistics"] += time.perf_counter() - t


class _Bar:
    """One progress bar over a pass's layers (k of N, elapsed, estimate) with the current layer's
    detail in its postfix; does nothing when quiet."""

    def __init__(self, total, desc, quiet):
        self._bar = None
        if not quiet and total:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="layer", leave=False)

    def update(self, n=1, postfix=None):
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(str(postfix)[:60], refresh=False)
            self._bar.update(n)

    def detail(self, postfix):
        if self._bar is not None:
            self._bar.set_postfix_str(str(postfix)[:60])

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


FEW_ROWS_PER_COLUMN = 1   # a refit from fewer rows than input columns is underdetermined: only the ridge holds it


def few_rows_warning(reports) -> str | None:
    """One line for the whole run when a pass refit layers from fewer calibration rows than
    their input columns (``PassContext.note_rows``), else None."""
    few = [(r.name, k, r.details["rows"][k]) for r in reports for k in r.details.get("few_rows", ())]
    if not few:
        return None
    name, layer, worst = min(few, key=lambda f: f[2]["rows"] / max(f[2]["width"], 1))
    return (f"the calibration data is small for {len(few)} refit layer(s): {name} refit '{layer}' from "
            f"{worst['rows']} rows for {worst['width']} input columns (the fewest per column); the ridge "
            "is chosen on held-out rows, but more calibration samples would make the refits surer "
            "(the report's passes[].rows lists every layer)")


@dataclass
class PassContext:
    """What a pass gets besides the model and its config."""

    data: DataSource | None            # calibration samples (the held-out part excluded)
    reference: onnx.ModelProto          # the model as it entered this pass
    original: onnx.ModelProto           # the model as loaded (after normalisation)
    goals: dict = field(default_factory=dict)   # {metric: budget.Goal}
    sample_shapes: dict | None = None    # full input shapes of the first signature (batch 1 where splittable)
    batch_size: int = 64
    seed: int = 0
    quiet: bool = True
    calibration_seconds: float = 0.0
    calibration_runs: int = 0
    signatures: list | None = None       # every input shape the data has, with sample counts
    timings: dict = field(default_factory=lambda: {k: 0.0 for k in TIMING_PARTS})
    current_bar: _Bar | None = field(default=None, repr=False)
    pass_name: str = "?"                 # the pass this context was made for (named in errors)
    protected: dict = field(default_factory=dict)   # {node name: why it stays whole} (the accuracy search, keep)
    frozen: frozenset = frozenset()   # the nodes the user keeps as they are (``keep``): not even refit
    rows: dict = field(default_factory=dict)        # {refit layer: {"rows", "width"}} (``note_rows``)
    reference_cache: TensorCache | None = field(default=None, repr=False)   # the reference's tensors (``collect``)
    run_caches: list = field(default_factory=list, repr=False)   # ``incremental`` scopes' ``RunCache``s, innermost last
    metric: object = None                # the user's task metric (``metrics.Metric``), when given
    max_drop: float | None = None        # the drop of ``metric`` the user allows, when given

    def note_rows(self, layer: str, rows: int, width: int) -> None:
        """Record that ``layer`` was refit from ``rows`` calibration rows (samples × the spatial
        positions or tokens used) for an input of ``width`` columns; the pass's report lists them
        and a run warns when a layer has fewer rows than ``FEW_ROWS_PER_COLUMN`` × its width."""
        self.rows[layer] = {"rows": int(rows), "width": int(width)}

    def calibration_batches(self) -> int:
        """How many batches a calibration run over the data takes (1: the data is one batch)."""
        from .calibrate import _batches
        return _batches(self.require_data(), self.batch_size, self.reference)[1]

    def kept(self, nodes) -> str | None:
        """Why a unit made of ``nodes`` (names) must stay whole: the reason of the first protected
        one, or None. Every pass that searches a budget asks this of its candidates."""
        for n in nodes:
            reason = self.protected.get(getattr(n, "name", n))
            if reason is not None:
                return reason
        return None

    def unprotected(self, items, nodes_of, report, names_of=None) -> list:
        """The ``items`` (layers, groups) none of whose nodes (``nodes_of(item)``: names) the
        accuracy search protects; each other one is skipped in ``report`` with its reason, under
        ``names_of(item)`` (default: its nodes)."""
        out = []
        for item in items:
            nodes = list(nodes_of(item))
            reason = self.kept(nodes)
            if reason is None:
                out.append(item)
            else:
                for name in (names_of(item) if names_of is not None else nodes):
                    report.skip(name, reason)
        return out

    def require_data(self, pass_name=None):
        """The calibration data; UsageError naming the pass without it. (The pipeline checks a
        pass's ``requires`` before ``apply``: a pass that declares ``Requires(data=True)`` need not
        call this.)"""
        if self.data is None:
            raise UsageError(Requires(data=True).problem(pass_name or self.pass_name, has_data=False))
        return self.data

    def progress(self, iterable, total=None, desc=None):
        if self.quiet:
            return iterable
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)

    def bar(self, total, desc):
        """The pass's one progress bar over its layers (``update(1, postfix=...)``, ``close()``);
        calibration runs while it is open show in its postfix instead of bars of their own."""
        self.current_bar = _Bar(total, desc, self.quiet)
        return self.current_bar

    @contextlib.contextmanager
    def timed(self, part):
        """Add the time spent in the block to ``timings[part]`` (one of TIMING_PARTS), less what
        blocks and calibration runs inside it counted for their own parts: timed blocks nest (the
        refit loop times a level's ``solve`` as "fit"; a search or a collection inside it counts as
        search or calibration), and every second is counted once. In a pool worker
        (``parallel.ordered_map``: a level's solves side by side) nothing is counted: the blocks of
        concurrent workers overlap in time, and the enclosing block in the calling thread counts
        their wall time once."""
        if parallel.in_worker():
            yield
            return
        t = time.perf_counter()
        inner0 = sum(self.timings.get(k, 0.0) for k in TIMING_PARTS)
        try:
            yield
        finally:
            inner = sum(self.timings.get(k, 0.0) for k in TIMING_PARTS) - inner0
            self.timings[part] = self.timings.get(part, 0.0) + max(time.perf_counter() - t - inner, 0.0)

    def _cache(self, model_y):
        """The ``TensorCache`` of the reference model when ``model_y`` is it (None when the cap is 0)."""
        if model_y is None or model_y is not self.reference:
            return None
        if self.reference_cache is None or self.reference_cache.model is not self.reference:
            cap = reference_cache_bytes()
            if cap <= 0:
                return None
            self.reference_cache = TensorCache(self.reference, cap)
        return self.reference_cache

    def want_reference(self, names) -> None:
        """Ask that the reference model's tensors ``names`` (an iterable, read only where the
        cache fetches ahead) be fetched with the next run of it and kept (``calibrate.TensorCache``,
        within its cap): a refit asks for its later levels' targets, so that the reference runs
        once for all of them."""
        cache = self._cache(self.reference)
        if cache is not None:
            cache.want(names)

    def prefetch_reference(self, names) -> bool:
        """``want_reference(names)`` where the next run of the reference can fetch them beside
        what it reads and serve both sides of a collection at once (a ``TensorCache`` whose values
        do not depend on what a run fetches, ``calibrate.fetch_independent``); True then, and a
        ``collect`` on the reference with ``model_y`` = the reference is one run that also keeps
        ``names`` for later ones (a refit's targets, read in the statistics run). False (nothing
        asked) otherwise: such a collection would run the reference twice."""
        cache = self._cache(self.reference)
        if cache is None or not cache.free:
            return False
        cache.want(names)
        return True

    @contextlib.contextmanager
    def incremental(self):
        """A scope whose runs of models other than the reference go through one
        ``calibrate.RunCache`` (a refit's candidates, each the last with a few layers changed): a
        run computes only what changed since the tensors the last runs kept. Its cap is what the
        reference's ``TensorCache`` leaves of ``reference_cache_bytes()``."""
        held = self.reference_cache.nbytes if self.reference_cache is not None else 0
        self.run_caches.append(RunCache(max(reference_cache_bytes() - held, 0)))
        try:
            yield self.run_caches[-1]
        finally:
            self.run_caches.pop()

    def collect(self, requests, model_x=None, model_y=None, desc="calibration"):
        """Statistics over the calibration data; x tensors from ``model_x`` (default: the
        reference model), y tensors from ``model_y``; the reference's y tensors come from its
        ``TensorCache`` where held. Time is split into session creation, inference and statistics
        accumulation (``timings``)."""
        data = self.require_data()
        t = time.perf_counter()
        started = []
        bar = self.current_bar if self.current_bar is not None and self.current_bar._bar is not None else None

        def prog(it, total):
            started.append(time.perf_counter())
            if bar is not None:
                bar.detail(desc)
                return it
            return self.progress(it, total, desc)

        stats_before = self.timings["statistics"]
        out = calibrate_requests(data, [_TimedRequest(r, self.timings) for r in requests],
                      model_x if model_x is not None else self.reference, model_y,
                      batch_size=self.batch_size, progress=prog, seed=self.seed, cache=self._cache(model_y),
                      runs=self.run_caches[-1] if self.run_caches and model_x is not None
                      and model_x is not self.reference else None)
        end = time.perf_counter()
        begin = started[0] if started else end
        self.timings["session"] += begin - t
        self.timings["calibration"] += max(end - begin - (self.timings["statistics"] - stats_before), 0.0)
        self.calibration_seconds += end - t
        self.calibration_runs += 1
        return out

    def cost(self, model):
        return model_cost(model, self.signatures or self.sample_shapes)

    def timing_report(self, seconds):
        """{part: seconds} with the calibration runs and the rest ('other') of ``seconds``: what the
        parts as reported (rounded to milliseconds) leave of it, so that the reported figures add up
        to ``seconds`` (from the unrounded parts, seven roundings could miss it by 3.5 ms)."""
        out = {k: round(self.timings.get(k, 0.0), 3) for k in TIMING_PARTS}
        out["other"] = round(max(seconds - sum(out[k] for k in TIMING_PARTS), 0.0), 3)
        out["calibration_runs"] = self.calibration_runs
        return out


@dataclass
class Result:
    """The rewritten model and its report. For a large model, the weights the passes rewrote are
    in a temporary spill folder this Result owns: it is removed by ``close()``, on leaving a
    ``with`` block, or when the Result is garbage-collected (at the latest at exit). Keep the
    Result while using ``model`` (or save it first); afterwards such a model's rewritten weights
    are gone and using them raises UsageError. For other models ``close()`` does nothing.

    ``unchanged``: no pass changed anything; ``save`` then writes the input file's bytes as they
    were (when the input was a path without external data)."""

    model: onnx.ModelProto
    report: dict
    spill: SpillStore | None = field(default=None, repr=False, compare=False)
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._close = weakref.finalize(self, self.spill.close) if self.spill is not None else None

    @property
    def unchanged(self) -> bool:
        return bool(self.report.get("unchanged"))

    @property
    def passed(self) -> bool:
        """Validation passed and every target was met."""
        v = self.report.get("validation") or {}
        return bool(v.get("passed")) and all(t.get("met") for t in (self.report.get("targets") or {}).values())

    def save(self, path, external: bool | None = None, report_path=None):
        """Write the model (and, with ``report_path``, the JSON report) atomically, together: on
        any failure neither is left. Returns the files written."""
        check_output_paths(path, self.source, report_path, force=True, external=bool(external))
        with Staging() as staging:
            copy = self.source if self.unchanged and self.source and not external else None
            save_model(self.model, path, external, staging=staging, copy_from=copy)
            if report_path is not None:
                staging.write_bytes(check_writable(report_path, "report"), to_json(self.report).encode())
            return staging.publish()

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve_passes(names, options):
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UsageError("no passes given (see onnxshrink --list-passes)")
    options = dict(options or {})
    unknown = [k for k in options if k not in names]
    chosen = []
    for name in names:
        p = get_pass(name)
        chosen.append((p, make_config(p, options.get(name, {}))))
    for k in unknown:
        get_pass(k)  # raises for unknown pass names
        raise UsageError(f"options given for pass '{k}', which is not among the passes ({','.join(names)})")
    return chosen


def _check_runs(model):
    """The input must load in ONNX Runtime (unknown ops, broken graphs): an input error, not a
    failure of the first pass."""
    try:
        session(model)
    except Exception as e:
        msg = first_line(e)
        raise InputError(f"ONNX Runtime cannot load the input model: {msg}") from None


def _data(calibration, validation, model, image_options, random_calibration, chosen, seed):
    """(fit, held-out) sources. The held-out part is the validation data, or the last 20 % of the
    calibration feeds (of its samples for one stacked array); a single calibration feed or sample
    with no validation data is refused: there is nothing to validate on. No data at all is refused
    up front when a chosen pass requires it."""
    fit = val = None
    try:
        if calibration is not None:
            fit = load_data(calibration, model, image_options, "calibration data")
        elif random_calibration:
            warnings.warn("using random calibration inputs: statistics will not reflect real data")
            fit = random_data(model, int(random_calibration), seed)
        else:
            _check_requires(chosen, has_data=False)
        if validation is not None:
            val = load_data(validation, model, image_options, "validation data")
        elif fit is not None:
            if fit.units() < 2:
                raise CalibrationError(
                    f"{fit.origin}: a single {fit.unit} ({fit.n} sample(s)) and no validation data: nothing "
                    "is left to validate the rewritten model on; give more calibration data or --validation-data")
            fit, val = split_holdout(fit, 0.2)
        probed = fit if fit is not None else val
        if probed is not None and probe_batching(model, probed) and val is not None and val is not probed:
            val.max_batch, val.batch_note = probed.max_batch, probed.batch_note
    except BaseException:
        for src in (fit, val):
            if src is not None:
                src.close()
        raise
    return fit, val


def _check_requires(chosen, has_data=None, model_opset=None) -> None:
    """Each pass's ``requires`` against the data and the model's opset (None: not checked):
    UsageError naming the first pass that cannot run."""
    for p, _ in chosen:
        problem = p.requires.problem(p.name, has_data=has_data, model_opset=model_opset)
        if problem:
            raise UsageError(problem)


def _flops_countable(model, shapes, targets):
    """A FLOPs target needs FLOPs that can be counted: refuse it, saying why, when they cannot."""
    if "flops" not in targets:
        return
    nodes = unknown_flops(model, shapes)
    if nodes:
        where = "at the calibration data's shapes" if shapes else \
            "with the model's dynamic dims unknown (give calibration= data to count them at its shapes)"
        raise UsageError(f"target_flops cannot be checked: the FLOPs of {len(nodes)} node(s) (e.g. "
                          f"'{nodes[0]}') cannot be counted {where}: their shapes are unknown")


WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def _refuse_non_finite(model, chosen):
    """Refuse a model whose layer weights hold NaN or Inf: every pass would fit (or fold) layers on
    statistics and weights that are not numbers. One clear error naming the tensor and its node."""
    from onnx import numpy_helper

    from .model_io import is_lazy
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for name in node.input[1:]:
            t = inits.get(name)
            if t is None or is_lazy(t) or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                              onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                continue
            if not np.isfinite(numpy_helper.to_array(t).astype(np.float32, copy=False)).all():
                names = ",".join(p.name for p, _ in chosen)
                raise InputError(f"weight '{name}' of {node.op_type} node '{node.name}' contains NaN or Inf values: "
                                 f"onnxshrink ({names}) does not rewrite such a model; fix the model first")


def _owning_spill(fn):
    """Run ``fn`` with a fresh SpillStore active; on an error whose ``.result`` does not take it
    over (anything but ValidationFailed/TargetError), remove it at once."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        store = SpillStore()
        try:
            with spilling(store):
                return fn(*args, **kwargs)
        except BaseException as e:
            if getattr(e, "result", None) is None:   # nothing left that uses the spilled weights
                store.close()
            raise
    return wrapper


SUPPORTED_OPSETS = (11, 21)   # of the default ONNX domain; the passes are tested on these


def _check_supported(model) -> None:
    """Refused up front: what the passes cannot rewrite safely."""
    v = opset(model)
    lo, hi = SUPPORTED_OPSETS
    if not lo <= v <= hi:
        what = f"opset {v}" if v else "no opset"
        raise InputError(f"the model uses {what} of the default ONNX domain; onnxshrink supports opsets "
                         f"{lo}-{hi} (convert it first, e.g. onnx.version_converter.convert_version(model, 17))")


def _nothing_changed(reports) -> list[str]:
    """Per pass, why it changed nothing (from its skip reasons)."""
    lines = []
    for r in reports:
        reasons = Counter(s.reason for s in r.skipped)
        if not reasons:
            lines.append(f"{r.name}: no layer it rewrites")
            continue
        top = "; ".join(f"{why} ({n}x)" if n > 1 else why for why, n in reasons.most_common(3))
        more = len(reasons) - 3
        lines.append(f"{r.name}: {top}" + (f"; {more} more reasons in the report" if more > 0 else ""))
    return lines


def declared_value_info(model: onnx.ModelProto) -> frozenset:
    """The tensor names the model's own ``value_info`` declares (main graph and subgraphs)."""
    return frozenset(vi.name for g in all_graphs(model.graph) for vi in g.value_info)


def keep_declared_value_info(model: onnx.ModelProto, declared: frozenset) -> None:
    """Drop, in place, the ``value_info`` entries of tensors the input did not declare: the shapes
    ``normalize``'s inference added and the types a re-exported graph writes for every tensor (879
    entries, 1.3 % of a quantized CRNN's file). Runtimes infer them at load time; a name the input
    declared keeps its entry (as the rewritten graph has it: a rewrite may have dropped a shape it
    changed). Graph inputs and outputs are not touched."""
    for g in all_graphs(model.graph):
        if any(vi.name not in declared for vi in g.value_info):
            kept = [vi for vi in g.value_info if vi.name in declared]
            del g.value_info[:]
            g.value_info.extend(kept)


def kept_nodes(model: onnx.ModelProto, patterns) -> dict:
    """{node name: why it stays as it is} for the user's ``keep`` patterns (node names or shell-style
    patterns, ``fnmatch``, case-sensitive), over the main graph and its subgraphs; a pattern that names
    no node is a UsageError (a typo would otherwise keep nothing, silently)."""
    if patterns is None:
        return {}
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n.name for g in all_graphs(model.graph) for n in g.node if n.name]
    out = {}
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise UsageError(f"keep expects node names or patterns (strings), got {pat!r}")
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise UsageError(f"keep '{pat}' names no node of the model (node names, or patterns such as "
                             f"'/decoder/*'; --inspect lists them)")
        for n in hit:
            out.setdefault(n, f"kept as it is (keep '{pat}')")
    return out


def _same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Equal but for inferred shapes (``value_info``, which a re-exported graph may add)."""
    if a is b:
        return True
    copies = []
    for m in (a, b):
        c = onnx.ModelProto()
        c.CopyFrom(m)
        del c.graph.value_info[:]
        copies.append(c)
    return copies[0] == copies[1]


def _model_name(model_or_path) -> str:
    if isinstance(model_or_path, onnx.ModelProto):
        return "<ModelProto>"
    if isinstance(model_or_path, (bytes, bytearray)):
        return "<bytes>"
    return os.fspath(model_or_path)


@_owning_spill
def shrink(model_or_path, passes, calibration=None, *, data: Data | None = None, targets: Targets | None = None,
           checks: Tolerances | None = None, run: Run | None = None, **short) -> Result:
    """Compress a model: run ``passes`` (names, in order, or "a,b") on ``model_or_path`` (a path,
    bytes or a ModelProto; never modified), validate the result against the original and return it.

    The arguments come in four groups (``onnxshrink.arguments``): ``data=Data(calibration=...,
    validation=..., image_options=..., random=N, base_dir=...)``, ``targets=Targets(flops=...,
    params=..., size=..., metric=..., max_drop=...)``, ``checks=Tolerances(min_cosine=...,
    max_error=..., ...)`` and ``run=Run(force=..., quiet=..., batch_size=..., seed=..,
    options={pass: {key: value}}, threads=N)``. The short form gives the same fields as flat keywords named
    like the CLI's flags: ``calibration`` (also the third positional argument), ``validation``,
    ``image_options``, ``random_calibration``, ``base_dir``; ``target_flops``, ``target_params``,
    ``target_size``, ``metric``, ``max_drop``; ``min_cosine``, ``max_error``, ``max_rel_l2``,
    ``min_top1``, ``max_range_error``, ``min_worst_cosine``; ``force``, ``quiet``, ``batch_size``,
    ``seed``, ``options``, ``threads`` (``tolerances=`` and ``target_bytes=`` are older spellings of ``checks=``
    and ``target_size=``). A group is given one way or the other, not both.

    Raises OnnxShrinkError subclasses; a failed check raises ValidationFailed/TargetError with the
    unsaved result in ``.result``, unless ``force``, which returns it (``result.passed`` is then
    False). The task ``metric`` (a built-in name, ``"file.py:function"``, ``"module:function"`` or
    a callable ``fn(outputs_per_feed, feeds) -> float``, higher is better) is evaluated on the
    validation feeds for the original and the result; with ``max_drop`` a larger drop fails
    validation, and without a cost target the chain's budget is searched for the smallest model
    within the drop. The result holds temporary files for large models: ``with shrink(...) as
    res:`` or ``res.close()`` removes them at once (else garbage collection does)."""
    t0 = time.perf_counter()
    if calibration is not None:
        short["calibration"] = calibration
    checks_given = checks is not None or short.get("tolerances") is not None \
        or any(f.name in short for f in dataclasses.fields(Tolerances))
    g = grouped({"data": data, "targets": targets, "checks": checks, "run": run}, short)
    data, targets, tol, run = g["data"], g["targets"], g["checks"], g["run"]
    task = metrics_mod.resolve(targets.metric)
    max_drop = metrics_mod.check_max_drop(targets.max_drop)
    if max_drop is not None and task is None:
        raise UsageError("max_drop needs metric= (a built-in name such as 'top1', 'file.py:function' or a callable)")
    gate = "given" if checks_given else "default"
    if task is not None and max_drop is not None and not checks_given:
        tol, gate = Tolerances.metric_only(), "metric"   # the user's metric judges; outputs are reported
    fractions = {m: budget_mod.check_fraction(budget_mod.ARGUMENTS[m], f)
                 for m, f in (("flops", targets.flops), ("params", targets.params), ("bytes", targets.size))}
    chosen = _resolve_passes(passes, run.options)
    if data.random is not None and (isinstance(data.random, bool) or int(data.random) < 1):
        raise UsageError(f"random_calibration must be a positive number of samples, got {data.random}")
    if run.batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {run.batch_size}")
    try:
        threads = parallel.check_threads(run.threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    budget = budget_mod.Budget.of({m: f for m, f in fractions.items() if f is not None}, [p for p, _ in chosen])
    model = load_model(model_or_path, data.base_dir)
    declared = declared_value_info(model)   # before normalize adds the shapes it infers
    _check_supported(model)
    _check_runs(model)
    try:
        model = normalize(model)
    except Exception as e:  # corrupt fields ONNX Runtime tolerated (bad dtypes, dangling names)
        msg = first_line(e)
        raise InputError(f"cannot read the graph of the input model: {type(e).__name__}: {msg}") from None
    original = model
    keep = kept_nodes(model, run.keep)
    _refuse_non_finite(model, chosen)
    # the input's own non-standard ops and checker complaints are the user's: reported, not held
    # against the rewrite
    input_info = {"model": _model_name(model_or_path),
                  "nonstandard_ops": sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                                             if n.domain not in STANDARD_DOMAINS}),
                  "problems": structural_problems(original, original)}
    quantized = [n for n in model.graph.node if is_quantized_layer(n)]
    _check_requires(chosen, model_opset=opset(model))   # before data is read
    with keeping_sessions():   # the input's session serves the batching probe and the validation
        keep_session(original, "input")
        fit, val = _data(data.calibration, data.validation, model, data.image_options, data.random, chosen, run.seed)
        try:
            reps = [r for src in (fit, val) if src is not None for r in src.representatives()]
            with observing(ShapeObserver(reps)), parallel.fitting(threads):   # one BLAS thread: see ``parallel``
                call = _Call(chosen, budget, fit, val, tol, run.force, run.quiet, run.batch_size, run.seed, t0,
                             quantized, input_info, model_or_path, task, max_drop, gate, declared, keep)
                return _execute(model, original, call)
        finally:
            for src in (fit, val):
                if src is not None:
                    src.close()


@dataclass
class _Call:
    """One call's settings and data, as ``shrink`` checked them."""

    chosen: list                # [(pass, config)]
    budget: budget_mod.Budget   # the cost targets (fractions of the original) over the chain
    fit: DataSource | None
    val: DataSource | None
    tol: Tolerances
    force: bool
    quiet: bool
    batch_size: int
    seed: int
    t0: float
    quantized: list             # QOperator layers every pass leaves alone
    input_info: dict
    model_or_path: object
    metric: metrics_mod.Metric | None = None
    max_drop: float | None = None
    gate: str = "default"       # the tolerances' origin: "default", "given", or "metric" (the metric judges)
    declared: frozenset = frozenset()   # the names the input's own value_info declared (kept in the output)
    keep: dict = field(default_factory=dict)   # {node name: why} of the user's ``keep`` patterns
    # the first pass's reference tensors, kept across the chains a budget search builds from the
    # same model and data (``calibrate.TensorCache``); shared by the copies ``replace`` makes
    shared: dict = field(default_factory=dict)


def _chain(model, original, call: _Call, budget: budget_mod.Budget, signatures, sample_shapes, protected=None):
    """Run the chosen passes in order toward ``budget`` (which knows the original cost), keeping
    the nodes of ``protected`` ({name: reason}) whole; returns (model, pass reports)."""
    reports, done = [], []
    for i, (p, cfg) in enumerate(call.chosen):
        current = model_cost(model, signatures) if budget else None
        goals = budget.goals(i, current) if budget else {}
        # the user's targets only (a budget search's steps score what the pass reaches); forced: the best it can do
        if goals and call.budget and i == len(call.chosen) - 1 and not call.force:
            rep = _out_of_reach(p, cfg, model, budget, current, signatures, sample_shapes)
            if rep is not None:   # the verdict will say so: no calibration run for it
                reports.append(rep)
                done.append(p.name)
                continue
        ctx = PassContext(call.fit, model, original, goals, sample_shapes, call.batch_size, call.seed, call.quiet,
                          signatures=signatures, pass_name=p.name, protected={**call.keep, **(protected or {})},
                          frozen=frozenset(call.keep), metric=call.metric, max_drop=call.max_drop)
        _share_cache(ctx, call.shared, first=i == 0)
        _check_requires([(p, cfg)], has_data=call.fit is not None, model_opset=opset(model))   # as it enters
        t = time.perf_counter()
        try:
            model, rep = p.apply(model, cfg, ctx)
            if ctx.current_bar is not None:
                ctx.current_bar.close()
            if not has_lazy(model):  # large models: validation builds the session, once
                keep_session(model, "output")   # validation (and a next pass's probes) run it again
                with ctx.timed("session"):
                    session(model)
        except OnnxShrinkError:
            raise
        except Exception as e:  # a bug or an unhandled graph: name the pass and the chain
            msg = first_line(e)
            raise PassError(p.name, msg, done) from e
        for n in call.quantized:
            rep.skip(n.name, f"quantized layer ({n.op_type}, QOperator form): left as it is")
        rep.details.setdefault("seconds", round(time.perf_counter() - t, 3))
        rep.details.setdefault("calibration_seconds", round(ctx.calibration_seconds, 3))
        rep.details.setdefault("calibration_runs", ctx.calibration_runs)
        rep.details["timing"] = ctx.timing_report(rep.details["seconds"])
        if ctx.reference_cache is not None:
            rep.details["reference_cache"] = ctx.reference_cache.summary()
            if i == 0:
                call.shared["reference"] = ctx.reference_cache
        if ctx.rows:
            rep.details["rows"] = {k: ctx.rows[k] for k in sorted(ctx.rows)}
            few = [k for k in sorted(ctx.rows) if ctx.rows[k]["rows"] < FEW_ROWS_PER_COLUMN * ctx.rows[k]["width"]]
            if few:
                rep.details["few_rows"] = few
        reports.append(rep)
        done.append(p.name)
    return model, reports


def _out_of_reach(p, cfg, model, budget, current, signatures, sample_shapes):
    """The report of the chain's last pass when its own reach (``Pass.reach``: the lowest
    fraction of its input's cost it could leave, known from the plan, before any data runs) cannot
    meet a target of the chain even at that floor: the pass is not run and the verdict's
    TargetError names the reach (not with ``force``, whose result is the best the pass can do). None where the pass may meet every target (or says nothing of its
    reach, or the data has several input signatures: the floor is counted at the first)."""
    reach = getattr(p, "reach", None)
    if reach is None or (signatures is not None and len(signatures) != 1):
        return None
    info = reach(model, cfg, sample_shapes)
    short = []
    for m, fraction in budget.targets.items():
        floor = (info.get("floor") or {}).get(m)
        if m not in p.budgets or floor is None or not current.get(m) or not budget.original.get(m):
            continue
        left = floor * current[m] / budget.original[m]
        if not budget_mod.reached({m: fraction}, {m: 1.0}, {m: left})[m]["met"]:
            short.append(f"{m} {left:.3f} of the original at its floor (target {fraction:.3f})")
    if not short:
        return None
    rep = PassReport(p.name)
    rep.details.update({"reach": info, "seconds": 0.0, "calibration_seconds": 0.0, "calibration_runs": 0,
                        "not_run": "the target is out of the pass's reach: " + "; ".join(short)})
    return rep


def _share_cache(ctx, shared: dict, first: bool) -> None:
    """The chain's first pass takes over the reference cache an earlier chain left for the same
    model (a budget search's steps); a later pass gets a cap of what that one leaves free."""
    kept = shared.get("reference")
    if kept is None:
        return
    if first and kept.model is ctx.reference:
        ctx.reference_cache = kept
    elif not first:
        ctx.reference_cache = TensorCache(ctx.reference, max(reference_cache_bytes() - kept.nbytes, 0))


def _search_budget(call: _Call) -> str:
    """The cost metric an accuracy-controlled search turns: the first the chain can search."""
    for m in budget_mod.METRICS:
        if any(m in p.budgets for p, _ in call.chosen):
            return m
    names = ",".join(p.name for p, _ in call.chosen)
    raise UsageError(f"max_drop without a target needs a pass that searches a budget (pfa, basisconv, "
                     f"lowrank, hadamard, pq); none of {names} does")


def _searched_chain(model, original, call: _Call, before, signatures, sample_shapes):
    """The smallest model whose metric drops by at most ``max_drop``: a bisection over one budget
    fraction of the whole chain, then the per-layer correction that keeps the most sensitive units
    whole (see ``search``). Each step fits on the first 80 % of the calibration feeds and is scored
    on the other 20 % (scored on its own fitting data, a refit looks better than it is); the chosen
    fraction (and protected set) is then fitted on all of them. Returns (model, reports, search
    report)."""
    metric = _search_budget(call)
    if call.fit.units() < 5:
        raise CalibrationError(f"{call.fit.origin}: {call.fit.units()} {call.fit.unit}(s) are too few to search "
                               "a budget under max_drop (5 or more: 80 % fit, 20 % score each step); give more "
                               "calibration data or a target")
    fit_part, score_part = split_holdout(call.fit, 0.2)
    steps = dataclasses.replace(call, fit=fit_part)
    reference, feeds = model_outputs(original, score_part)

    def build(f, protected=None):
        cand, reps = _chain(model, original, steps, call.budget.with_targets({metric: f}), signatures, sample_shapes,
                            protected)
        value = model_cost(cand, signatures)[metric]
        return (cand, reps), (value / before[metric] if value is not None and before[metric] else 1.0)

    def score(cand):
        outs, _ = model_outputs(cand[0], score_part, like=original)
        return call.metric.values(reference, outs, feeds)[1]

    def units_of(cand):
        return [dataclasses.replace(u, label=f"{r.name}:{u.label}") for r in cand[1] for u in r.units]

    blind = metrics_mod.blind_spot(call.metric, reference, feeds, call.max_drop,
                                   f"{score_part.n} held-out calibration {score_part.unit}(s) the search scores on")
    if blind:
        raise CalibrationError(f"{call.fit.origin}: {blind}")
    original_value = call.metric.values(reference, reference, feeds)[0]
    found = search_mod.smallest_within(build, score, original_value, call.max_drop, units_of=units_of)
    search_mod.correct(found, build, score, original_value, call.max_drop, units_of)
    info = {"budget": metric, "metric": call.metric.name, "data": f"{score_part.n} held-out calibration "
            f"{score_part.unit}(s)", "original": original_value, "max_drop": call.max_drop,
            "steps": [st.as_dict() for st in found.steps]}
    info["correction"] = _correction_report(found)
    coarse = search_resolution(score_part, call.max_drop)
    if coarse:
        info["resolution"] = coarse
        warnings.warn(coarse, stacklevel=3)
    if found.best is None:
        mildest = max(found.steps, key=lambda st: st.fraction)
        info["chosen"] = None
        info["problem"] = (f"no budget keeps metric '{call.metric.name}' within max_drop {call.max_drop} on "
                           f"held-out calibration data: the mildest tried ({metric} {mildest.fraction:.3f}) "
                           f"dropped it by {mildest.drop:.4g}; the model is left as it was")
        return model, [], info
    info["chosen"] = round(found.best_step.fraction, 4)
    cand, reps = _chain(model, original, call, call.budget.with_targets({metric: found.best_step.fraction}),
                        signatures, sample_shapes, found.protected())
    return cand, reps, info


def search_resolution(score_part, max_drop: float) -> str | None:
    """Where one held-out unit weighs more than ``max_drop`` in a metric that averages over the units
    (top-1 agreement, the same text, an accuracy), a note that the search's steps can only be judged
    by "no unit changed", which says little about a drop of ``max_drop`` on other data; else None."""
    n = score_part.units()
    if n <= 0 or 1.0 / n <= max_drop:
        return None
    return (f"the search scores each step on {n} held-out calibration {score_part.unit}(s): where the metric "
            f"averages over them one changes it by {1.0 / n:.3g}, more than max_drop {max_drop}, so a step is within "
            f"only where none changes, which does not show a drop under {max_drop} on other data; calibration data "
            f"whose held-out fifth holds at least {int(np.ceil(1.0 / max_drop))} {score_part.unit}s judges finer")


def _correction_report(found) -> dict:
    """The per-layer correction for the report: where it started, each measured unit's
    sensitivity, what the chosen model keeps whole and why, or why nothing was kept."""
    b = found.bisection
    out = {"bisection_chosen": round(b.fraction, 4) if b is not None else None,
           "bisection_reached": round(b.reached, 4) if b is not None else None,
           "from_step": round(found.failing.fraction, 4) if found.failing is not None else None,
           "sensitivity": [s.as_dict() for s in found.sensitivity]}
    out["protected"] = [{"unit": s.unit.label, "nodes": list(s.unit.nodes), "reason": s.reason()}
                        for s in found.kept()]
    if not out["protected"]:
        out["note"] = found.note or ("the correction found no model smaller than the bisection's within the drop"
                                     if found.failing is not None else None)
    return out


def _execute(model, original, call: _Call):
    source = call.fit if call.fit is not None else call.val
    signatures = source.signatures() if source is not None else None
    # the first signature's full input shapes: a feed ran at exactly these, so shapes static
    # inference misses at them are observed (concrete_input_shapes takes full-rank shapes as they are)
    sample_shapes = dict(signatures[0]["inputs"]) if signatures else None
    _flops_countable(model, signatures, call.budget.targets)
    before = model_cost(model, signatures)
    loaded = model
    call = dataclasses.replace(call, budget=call.budget.at(before))
    timing, search_info = {}, None
    if call.max_drop is not None and not call.budget and any(p.budgets for p, _ in call.chosen):
        if call.fit is None:
            raise UsageError("max_drop without a target searches on calibration data: give calibration=")
        model, reports, search_info = _searched_chain(model, original, call, before, signatures, sample_shapes)
    else:
        model, reports = _chain(model, original, call, call.budget, signatures, sample_shapes)
    if model is not original:
        keep_declared_value_info(model, call.declared)
    after = model_cost(model, signatures)
    small = few_rows_warning(reports)
    if small is not None:
        warnings.warn(small, stacklevel=2)
    chain = {r.name for r in reports}

    def others(metrics):   # the passes outside the chain that could meet a missed target
        from .inspection import floors
        return floors(loaded, metrics, sample_shapes, exclude=chain)
    reached, missed = call.budget.verdict(after, reports, others)
    val = call.val
    if val is None:
        val = random_data(original, 16, call.seed, sample_shapes)
        val.origin = "random inputs (no calibration data given)"
    # every pass of the chain answered from its plan that a target is out of its reach (``_out_of_reach``):
    # the model is the input, so it is checked for structure only, without running the data
    not_run = bool(reports) and all("not_run" in r.details for r in reports)
    validation_result = validate(original, model, None if not_run else val, call.tol, call.metric, call.max_drop)
    if not_run:
        validation_result["notes"].insert(0, "not compared on data: no pass ran (the target is out of the "
                                              "chain's reach), the model is the input")
    inherited = [q for q in validation_result["problems"] if q in call.input_info["problems"]]
    if inherited:
        validation_result["problems"] = [q for q in validation_result["problems"] if q not in inherited]
    if search_info is not None and search_info.get("problem"):
        validation_result["problems"].append(search_info["problem"])
    validation_result["passed"] = not validation_result["problems"]
    validation_result["data"] = val.origin
    validation_result["gate"] = call.gate
    if source is not None and source.batch_note:
        validation_result["notes"].insert(0, source.batch_note)
    timing["total_seconds"] = round(time.perf_counter() - call.t0, 3)
    report = make_report(before, after, reports, validation_result, reached, timing,
                         model=call.input_info["model"])
    report["input"] = call.input_info
    if call.keep:
        report["keep"] = sorted(call.keep)
    if small is not None:
        report["warnings"] = report.get("warnings", []) + [small]
    report["cost_shapes"] = [{"inputs": {k: list(v) for k, v in sig["inputs"].items()}, "batch": sig["batch"],
                              "samples": sig["samples"]} for sig in signatures] if signatures else None
    if search_info is not None:
        report["search"] = search_info
    if not any(r.changed for r in reports) and _same_model(model, original):
        report["unchanged"] = True
        report["nothing_changed"] = _nothing_changed(reports)
    copy_of = None   # an unchanged run publishes the input's own bytes
    if report.get("unchanged") and isinstance(call.model_or_path, (str, os.PathLike)) \
            and not has_external_data(call.model_or_path):
        copy_of = os.path.abspath(os.fspath(call.model_or_path))
    result = Result(model, report, active_store(), copy_of)
    err = missed
    if err is None and not validation_result["passed"]:
        err = ValidationFailed("validation failed: " + "; ".join(validation_result["problems"]))
    report["check_failed"] = err.detail if err is not None else None
    if err is not None and not call.force:
        err.result = result
        raise err
    return result
