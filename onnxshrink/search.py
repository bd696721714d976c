"""Accuracy-controlled budgets: the smallest model whose task metric stays within a drop.

The chain of passes is run at a global budget fraction ``f`` of one cost metric (FLOPs, params or
bytes: the one the chain's passes can search) and the candidate is scored by the user's metric on
calibration feeds. With the drop assumed to grow as ``f`` shrinks, a bisection over ``log f`` finds
the smallest fraction whose drop is within ``max_drop`` in a handful of runs (relative steps: a
budget of 0.02 is resolved as finely as one of 0.6); every step is recorded
(fraction asked, fraction reached, metric, drop) so the report shows how the budget was found.
The final model is judged again on the held-out validation feeds, which the search never sees.

Per-layer correction (``correct``; NNCF's accuracy control, Kwon et al.'s mask search): one global
fraction prunes every layer by the passes' own error proxies, which can misjudge a layer the task
needs. At the failing step just below the bisection's choice, the units (layers, coupling groups)
the chain changed most (at most ``max_units``) are each kept whole in turn; the drop that keeps
returns is the unit's sensitivity. The most sensitive are then kept whole together, one more at a
time, until the drop is within ``max_drop``; with that set fixed, a short bisection below the
failing fraction looks for a smaller model still. A correction is kept only when its model is
smaller than the bisection's. Runs: at most ``steps`` + 2·``max_units`` − 1 + ``refine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Step:
    fraction: float          # the budget asked of the chain
    reached: float           # the fraction of the original the candidate has
    metric: float            # the candidate's metric on the search feeds
    drop: float              # original metric - candidate metric
    within: bool             # drop <= max_drop
    kind: str = "bisection"  # bisection, sensitivity (one unit kept whole), correction, refine
    protected: tuple = ()    # labels of the units kept whole
    units: list = field(default_factory=list, repr=False)   # what the candidate changed (``units_of``)

    def as_dict(self):
        d = {"fraction": round(self.fraction, 4), "reached": round(self.reached, 4),
             "metric": self.metric, "drop": self.drop, "within": self.within, "kind": self.kind}
        if self.protected:
            d["protected"] = list(self.protected)
        return d


@dataclass
class Sensitivity:
    unit: object             # what a pass changed: ``.label``, ``.nodes``, ``.amount`` (registry.Unit)
    fraction: float          # the failing step it was measured at
    drop_changed: float      # the drop there with every unit changed
    drop_kept: float         # the drop there with this unit kept whole

    @property
    def gain(self) -> float:
        return self.drop_changed - self.drop_kept

    def reason(self) -> str:
        return (f"kept by the accuracy search: at budget {self.fraction:.3g} the drop is "
                f"{self.drop_changed:.4g}, {self.drop_kept:.4g} with it kept whole")

    def as_dict(self):
        u = self.unit
        return {"unit": u.label, "nodes": list(u.nodes), "changed": round(u.amount, 4),
                "drop_changed": self.drop_changed, "drop_kept": self.drop_kept, "gain": self.gain}


@dataclass
class SearchResult:
    best: object | None                   # what ``run`` returned for the chosen fraction
    best_step: Step | None
    steps: list = field(default_factory=list)
    bisection: Step | None = None         # the bisection's own choice (before any correction)
    failing: Step | None = None           # the step the correction started from
    sensitivity: list = field(default_factory=list)   # [Sensitivity], most sensitive first
    note: str | None = None               # why the correction found nothing better

    def kept(self) -> list:
        """[Sensitivity] of the units the chosen candidate keeps whole."""
        chosen = set(self.best_step.protected) if self.best_step is not None else set()
        return [s for s in self.sensitivity if s.unit.label in chosen]

    def protected(self) -> dict:
        """{node name: reason} of the units the chosen candidate keeps whole."""
        return {n: s.reason() for s in self.kept() for n in s.unit.nodes}


def smallest_within(run: Callable[[float], tuple[object, float]], score: Callable[[object], float],
                    original: float, max_drop: float, lowest: float = 0.01, steps: int = 8,
                    highest: float = 1.0, units_of: Callable | None = None, kind: str = "bisection",
                    protected: tuple = (), result: SearchResult | None = None) -> SearchResult:
    """Bisection over the budget fraction in [lowest, highest], at geometric midpoints.

    ``run(f) -> (candidate, reached_fraction)`` builds a candidate at budget ``f``; ``score(candidate)``
    is its metric (higher is better); ``original`` the original's metric. Returns the candidate with the
    smallest reached fraction among those within ``max_drop`` (None when even the first, mildest
    candidate is not). Where no step of the bisection is within, up to ``MILD_STEPS`` more halve
    the cut of the mildest one, until one is within. ``units_of(candidate)``: what it changed, kept on each step for ``correct``;
    ``result``: a search to add the steps to (its best is kept unless a smaller one is found)."""
    result = result if result is not None else SearchResult(None, None)

    def attempt(f):
        return _attempt(result, run, score, original, max_drop, f, units_of, kind, protected)

    low = attempt(lowest)
    if low.within:
        return result
    lo, hi = lowest, highest
    for _ in range(max(1, steps - 1)):
        mid = (lo * hi) ** 0.5
        if attempt(mid).within:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1.03:
            break
    if result.best is None:   # nothing within down to about 0.97: halve the cut, a few times more
        for _ in range(MILD_STEPS):
            f = highest - (highest - lo) / 2
            step = attempt(f)
            if step.within or step.reached >= highest * (1 - MILD_FLOOR):
                break
            lo = f
    return result


MILD_STEPS = 3       # where the bisection finds nothing within the drop, budgets cutting half, a quarter, an
MILD_FLOOR = 0.002   # eighth as much as its mildest are tried (khmer_segmenter's same segmentation: the
                     # bisection's mildest, 0.965 of the FLOPs, drops it by 0.125, 0.982 is within on the
                     # held-out calibration sentences); none once a step removes less than this share


def _attempt(result, run, score, original, max_drop, f, units_of=None, kind="bisection", protected=()):
    """Build and score one candidate at budget ``f``; record its step and keep it when it is the
    smallest within the drop so far."""
    cand, reached = run(f)
    value = score(cand)
    drop = original - value
    step = Step(f, reached, value, drop, drop <= max_drop, kind, tuple(protected),
                list(units_of(cand)) if units_of is not None else [])
    result.steps.append(step)
    if step.within and (result.best_step is None or reached < result.best_step.reached):
        result.best, result.best_step = cand, step
    return step


def correct(result: SearchResult, run: Callable, score: Callable, original: float, max_drop: float,
            units_of: Callable, lowest: float = 0.01, max_units: int = 8, refine: int = 4) -> SearchResult:
    """The per-layer correction of a bisection ``result`` (see the module docstring), in place.

    ``run(f, protected) -> (candidate, reached)`` builds a candidate at budget ``f`` with the nodes
    of ``protected`` ({node name: reason}) kept whole; ``units_of(candidate)`` lists what it changed
    (objects with ``label``, ``nodes``, ``amount``)."""
    result.bisection = result.best_step
    ceiling = result.best_step.fraction if result.best_step is not None else float("inf")
    failing = [s for s in result.steps if not s.within and s.fraction < ceiling and s.kind == "bisection"]
    if not failing:
        result.note = "no failing step below the bisection's choice: nothing to correct"
        return result
    fail = max(failing, key=lambda s: s.fraction)
    result.failing = fail
    units = sorted(fail.units, key=lambda u: -u.amount)[:max_units]
    if not units:
        result.note = f"the failing step (budget {fail.fraction:.3g}) changed no unit a pass can keep whole"
        return result

    def attempt(f, keep, kind, reasons):
        protected = {n: reasons[u.label] for u in keep for n in u.nodes}
        return _attempt(result, lambda g: run(g, protected), score, original, max_drop, f, units_of, kind,
                        tuple(u.label for u in keep))

    measuring = "kept by the accuracy search: measuring its sensitivity"
    single = {}
    for u in units:
        single[u.label] = step = attempt(fail.fraction, [u], "sensitivity", {u.label: measuring})
        result.sensitivity.append(Sensitivity(u, fail.fraction, fail.drop, step.drop))
    result.sensitivity.sort(key=lambda s: -s.gain)
    helpful = [s for s in result.sensitivity if s.gain > 0]
    if not helpful:
        result.note = f"keeping no single unit whole lowers the drop at budget {fail.fraction:.3g}"
        return result
    reasons = {s.unit.label: s.reason() for s in result.sensitivity}
    keep, step = [], None
    for s in helpful:
        keep.append(s.unit)
        step = single[s.unit.label] if len(keep) == 1 else attempt(fail.fraction, keep, "correction", reasons)
        if step.within:
            break
    if not step.within:
        result.note = (f"keeping the {len(keep)} most sensitive units whole at budget {fail.fraction:.3g} still "
                       f"drops the metric by {step.drop:.4g}")
        return result
    if refine > 0 and fail.fraction > lowest:
        protected = {n: reasons[u.label] for u in keep for n in u.nodes}
        smallest_within(lambda g: run(g, protected), score, original, max_drop, lowest, refine,
                        highest=fail.fraction, units_of=units_of, kind="refine",
                        protected=tuple(u.label for u in keep), result=result)
    return result
