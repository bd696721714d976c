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

import functools
import time
import warnings
import weakref
from dataclasses import dataclass, field

import onnx

from . import budget as budget_mod
from .calibrate import DataSource, ShapeObserver, collect, load_data, random_data, session, split_holdout
from .cost import model_cost, unknown_flops
from .errors import (CalibrationError, InputError, OnnxShrinkError, PassError, TargetError, UsageError,
                     ValidationFailed, first_line)
from .graph import normalize, observing
from .model_io import SpillStore, active_store, has_lazy, load_model, save_model, spilling
from .registry import get_pass, make_config
from .report import make_report
from .validate import Tolerances, validate


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

    def require_data(self, pass_name):
        if self.data is None:
            raise UsageError(f"pass '{pass_name}' needs calibration data: give --calibration-data PATH "
                             "(or --random-calibration N to use random inputs, with a warning)")
        return self.data

    def progress(self, iterable, total=None, desc=None):
        if self.quiet:
            return iterable
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)

    def collect(self, requests, model_x=None, model_y=None, desc="calibration"):
        """Statistics over the calibration data; x tensors from ``model_x`` (default: the
        reference model), y tensors from ``model_y``."""
        data = self.require_data("?") if self.data is None else self.data
        t = time.perf_counter()
        prog = (lambda it, total: self.progress(it, total, desc)) if not self.quiet else None
        out = collect(data, requests, model_x if model_x is not None else self.reference, model_y,
                      batch_size=self.batch_size, progress=prog, seed=self.seed)
        self.calibration_seconds += time.perf_counter() - t
        self.calibration_runs += 1
        return out

    def cost(self, model):
        return model_cost(model, self.signatures or self.sample_shapes)


@dataclass
class Result:
    """The rewritten model and its report. For a large model, the weights the passes rewrote are
    in a temporary spill folder this Result owns: it is removed by ``close()``, on leaving a
    ``with`` block, or when the Result is garbage-collected (at the latest at exit). Keep the
    Result while using ``model`` (or save it first); afterwards such a model's rewritten weights
    are gone and using them raises UsageError. For other models ``close()`` does nothing."""

    model: onnx.ModelProto
    report: dict
    spill: SpillStore | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._close = weakref.finalize(self, self.spill.close) if self.spill is not None else None

    def save(self, path, external: bool | None = None):
        return save_model(self.model, path, external)

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
        raise UsageError("no passes given (--passes a,b,...; see --list-passes)")
    options = dict(options or {})
    unknown = [k for k in options if k not in names]
    chosen = []
    for name in names:
        p = get_pass(name)
        if not p.ready:
            raise UsageError(f"pass '{name}' is not built yet in this version of onnxshrink")
        chosen.append((p, make_config(p, options.get(name, {}))))
    for k in unknown:
        get_pass(k)  # raises for unknown pass names
        raise UsageError(f"options given for pass '{k}', which is not in --passes {','.join(names)}")
    return chosen


def _check_runs(model):
    """The input must load in ONNX Runtime (unknown ops, broken graphs): an input error, not a
    failure of the first pass."""
    try:
        session(model)
    except Exception as e:
        msg = first_line(e)
        raise InputError(f"ONNX Runtime cannot load the input model: {msg}") from None


def _data(calibration, validation, model, image_options, random_calibration, needs_data, seed):
    """(fit, held-out) sources. The held-out part is the validation data, or the last 20 % of the
    calibration feeds (of its samples for one stacked array); a single calibration feed or sample
    with no validation data is refused: there is nothing to validate on."""
    fit = val = None
    try:
        if calibration is not None:
            fit = load_data(calibration, model, image_options, "calibration data")
        elif random_calibration:
            warnings.warn("using random calibration inputs: statistics will not reflect real data")
            fit = random_data(model, int(random_calibration), seed)
        elif needs_data:
            raise UsageError(f"pass '{needs_data}' needs calibration data: give --calibration-data PATH")
        if validation is not None:
            val = load_data(validation, model, image_options, "validation data")
        elif fit is not None:
            if fit.units() < 2:
                raise CalibrationError(
                    f"{fit.origin}: a single {fit.unit} ({fit.n} sample(s)) and no validation data: nothing "
                    "is left to validate the rewritten model on; give more calibration data or --validation-data")
            fit, val = split_holdout(fit, 0.2)
    except BaseException:
        for src in (fit, val):
            if src is not None:
                src.close()
        raise
    return fit, val


def _flops_countable(model, shapes, targets):
    """A FLOPs target needs FLOPs that can be counted: refuse it, saying why, when they cannot."""
    if "flops" not in targets:
        return
    nodes = unknown_flops(model, shapes)
    if nodes:
        where = "at the calibration data's shapes" if shapes else \
            "with the model's dynamic dims unknown (give --calibration-data to count them at its shapes)"
        raise TargetError(f"--target-flops cannot be checked: the FLOPs of {len(nodes)} node(s) (e.g. "
                          f"'{nodes[0]}') cannot be counted {where}: their shapes are unknown")


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


@_owning_spill
def shrink(model_or_path, passes, calibration=None, target_flops=None, target_params=None,
           options=None, validation=None, tolerances: Tolerances | None = None, image_options=None,
           random_calibration=None, force=False, quiet=True, batch_size=64, seed=0, target_bytes=None) -> Result:
    """Compress a model. See the README for the arguments; raises OnnxShrinkError subclasses.
    The result holds temporary files for large models: ``with shrink(...) as res:`` or
    ``res.close()`` removes them at once (else garbage collection does)."""
    t0 = time.perf_counter()
    targets = {m: f for m, f in (("flops", budget_mod.check_fraction("target-flops", target_flops)),
                                  ("params", budget_mod.check_fraction("target-params", target_params)),
                                  ("bytes", budget_mod.check_fraction("target-size", target_bytes)))
               if f is not None}
    chosen = _resolve_passes(passes, options)
    if random_calibration is not None and (isinstance(random_calibration, bool) or int(random_calibration) < 1):
        raise UsageError(f"--random-calibration must be a positive number of samples, got {random_calibration}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    for metric in targets:
        if not any(metric in p.budgets for p, _ in chosen):
            raise UsageError(f"a {metric} target needs a pass that can search a {metric} budget; none of "
                             f"{','.join(p.name for p, _ in chosen)} can")
    model = load_model(model_or_path)
    _check_runs(model)
    try:
        model = normalize(model)
    except Exception as e:  # corrupt fields ONNX Runtime tolerated (bad dtypes, dangling names)
        msg = first_line(e)
        raise InputError(f"cannot read the graph of the input model: {type(e).__name__}: {msg}") from None
    original = model
    needs = next((p.name for p, _ in chosen if p.needs_data), None)
    fit, val = _data(calibration, validation, model, image_options, random_calibration, needs, seed)
    try:
        reps = [r for src in (fit, val) if src is not None for r in src.representatives()]
        with observing(ShapeObserver(reps)):
            return _run(model, original, chosen, targets, fit, val, tolerances, force, quiet, batch_size, seed, t0)
    finally:
        for src in (fit, val):
            if src is not None:
                src.close()


def _run(model, original, chosen, targets, fit, val, tolerances, force, quiet, batch_size, seed, t0):
    source = fit if fit is not None else val
    signatures = source.signatures() if source is not None else None
    # the first signature's full input shapes: a feed ran at exactly these, so shapes static
    # inference misses at them are observed (concrete_input_shapes takes full-rank shapes as they are)
    sample_shapes = dict(signatures[0]["inputs"]) if signatures else None
    _flops_countable(model, signatures, targets)
    before = model_cost(model, signatures)
    reports, timing, done = [], {}, []
    for i, (p, cfg) in enumerate(chosen):
        current = model_cost(model, signatures) if targets else before
        remaining = {m: sum(1 for q, _ in chosen[i:] if m in q.budgets) for m in targets if m in p.budgets}
        goals = budget_mod.pass_goals(targets, before, current, remaining)
        ctx = PassContext(fit, model, original, goals, sample_shapes, batch_size, seed, quiet, signatures=signatures)
        t = time.perf_counter()
        try:
            model, rep = p.apply(model, cfg, ctx)
            if not has_lazy(model):  # large models: validation builds the session, once
                session(model)
        except OnnxShrinkError:
            raise
        except Exception as e:  # a bug or an unhandled graph: name the pass and the chain
            msg = first_line(e)
            raise PassError(p.name, msg, done) from e
        rep.details.setdefault("seconds", round(time.perf_counter() - t, 3))
        rep.details.setdefault("calibration_seconds", round(ctx.calibration_seconds, 3))
        reports.append(rep)
        done.append(p.name)
    after = model_cost(model, signatures)
    reached = budget_mod.reached(targets, before, after)
    if val is None:
        val = random_data(original, 16, seed, sample_shapes)
        val.origin = "random inputs (no calibration data given)"
    validation_result = validate(original, model, val, tolerances or Tolerances())
    validation_result["data"] = val.origin
    timing["total_seconds"] = round(time.perf_counter() - t0, 3)
    report = make_report(before, after, reports, validation_result, reached, timing)
    report["cost_shapes"] = [{"inputs": {k: list(v) for k, v in sig["inputs"].items()}, "batch": sig["batch"],
                              "samples": sig["samples"]} for sig in signatures] if signatures else None
    result = Result(model, report, active_store())
    if not force:
        err = budget_mod.missed(reached)
        if err is None and not validation_result["passed"]:
            err = ValidationFailed("validation failed: " + "; ".join(validation_result["problems"])
                                   + " (nothing written; --force writes it anyway)")
        if err is not None:
            err.result = result
            raise err
    return result
