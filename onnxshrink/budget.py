"""The budget: the chain's targets turned into a goal for each pass, and the verdict after.

The targets are fractions of the *original* model that the whole chain must reach. Each pass that
can search a budget for a metric gets a ``Goal`` for the model it leaves behind: with k
budget-capable passes still to run (this one included) and the current value c, its ``limit`` is
c·(final/c)^(1/k), a geometric split, and the last one aims at the final value itself. So a pass
that over- or under-shoots is corrected by the passes after it.

The tolerance is applied in one place, ``Goal.met``: a pass's goal is an aim met exactly
(tolerance 0: the passes after it correct the rest); the chain's verdict accepts a reached value
up to TOLERANCE above its target. ``Budget`` is the one object the pipeline holds: ``goals`` for
the pass about to run, ``verdict`` after the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TargetError, UsageError, number

METRICS = ("flops", "params", "bytes")
TOLERANCE = 0.05  # the chain's verdict: the reached value may exceed the target by this fraction
ARGUMENTS = {"flops": "target_flops", "params": "target_params", "bytes": "target_size"}


@dataclass
class Goal:
    """An upper limit on one cost metric. A pass's goal: ``limit`` is the absolute value (FLOPs,
    params, bytes) the model it leaves behind should reach, ``final`` what the whole chain must
    reach, ``fraction`` the user's fraction of the original. Ask ``met(value)``, not ``value <=
    limit``: the tolerance lives here."""

    metric: str
    limit: float
    final: float | None = None
    fraction: float | None = None
    tolerance: float = 0.0      # a pass's goal: 0; the chain's verdict: TOLERANCE

    def met(self, value: float) -> bool:
        return value <= self.limit * (1 + self.tolerance)

    def overshot(self, value: float) -> bool:
        """Well below the limit (by more than TOLERANCE): more was taken than asked for."""
        return value < self.limit * (1 - TOLERANCE)


def check_fraction(name: str, f):
    if f is None:
        return None
    f = number(f, f"{name} (a fraction in (0, 1])")
    if not 0 < f <= 1:
        raise UsageError(f"{name} must be in (0, 1] (a fraction of the original), got {f}")
    return f


def _verdict_goal(metric, fraction) -> Goal:
    """The chain's goal in fractions of the original, with the verdict's tolerance."""
    return Goal(metric, fraction, fraction=fraction, tolerance=TOLERANCE)


def reached(targets: dict, original: dict, after: dict) -> dict:
    """{metric: {target, reached, met}} for the report."""
    out = {}
    for metric, fraction in targets.items():
        if after.get(metric) is None or original.get(metric) is None:   # not countable: never "met"
            out[metric] = {"target": fraction, "reached": None, "met": False,
                           "why": f"the {metric} of the model cannot be counted (shapes unknown)"}
            continue
        value = after[metric] / max(original[metric], 1)
        out[metric] = {"target": fraction, "reached": round(value, 4), "met": _verdict_goal(metric, fraction).met(value)}
    return out


def missed(reached_targets: dict, reports=(), others: dict | None = None) -> TargetError | None:
    """The error to raise when a target was missed, else None. ``reports``: the chain's pass
    reports; a pass that says what it could reach (``details["reach"]``: the share of its input's
    cost it acts on and the lowest fraction it could leave) is named in the message. ``others``:
    {metric: {pass: floor}} of passes outside the chain (``inspection.floors``); those whose floor
    meets a missed target are named as passes that could reach it (also in ``reached_targets``,
    as "could_reach")."""
    misses = [r["why"] if r["reached"] is None else f"{m} {r['reached']:.3f} of the original (target {r['target']:.3f})"
              for m, r in reached_targets.items() if not r["met"]]
    if not misses:
        return None
    reach = []
    for m, r in reached_targets.items():
        if r["met"]:
            continue
        for rep in reports or ():
            info = (getattr(rep, "details", None) or {}).get("reach") or {}
            floor, acts = (info.get("floor") or {}).get(m), (info.get("acts_on") or {}).get(m)
            if floor is None or acts is None:
                continue
            verdict = "enough for the target" if _verdict_goal(m, r["target"]).met(floor) else "short of the target"
            reach.append(f"{rep.name} acts on {acts:.1%} of the {m} it was given and could leave at least "
                         f"{floor:.3f} of them ({verdict})")
    could = []
    for m, r in reached_targets.items():
        if r["met"] or others is None or m not in others:
            continue
        ok = sorted((f, name) for name, f in others[m].items() if _verdict_goal(m, r["target"]).met(f))
        r["could_reach"] = [{"pass": name, "floor": round(f, 4)} for f, name in ok]
        could.append(f"{m} {r['target']:.3f} is within reach of " + ", ".join(
            f"{name} (alone it could leave {f:.3f})" for f, name in ok) if ok else
            f"no other pass alone could leave {m} {r['target']:.3f}")
    why = ("; reachable: " + "; ".join(reach)) if reach else ""
    why += ("; " + "; ".join(could)) if could else ""
    return TargetError("target cannot be met: the chain reached " + "; ".join(misses) + why
                       + " (see the report's skipped nodes)")


@dataclass
class Budget:
    """The chain's targets ({metric: fraction of the original}) and, per pass in order, the
    metrics it can search (``Pass.budgets``). ``original``: the cost of the model as loaded, given
    with ``at`` before the chain runs."""

    targets: dict
    capable: list                      # [tuple of metrics] per pass of the chain, in order
    original: dict | None = field(default=None)

    @classmethod
    def of(cls, targets: dict, passes) -> "Budget":
        """Refuses a target no pass of the chain can search (UsageError naming the argument)."""
        for metric in targets:
            if not any(metric in p.budgets for p in passes):
                raise UsageError(f"{ARGUMENTS[metric]} needs a pass that can search a {metric} budget; none "
                                 f"of {','.join(p.name for p in passes)} can")
        return cls(dict(targets), [tuple(p.budgets) for p in passes])

    def at(self, original: dict) -> "Budget":
        """The same budget for a model whose cost as loaded is ``original``."""
        return Budget(self.targets, self.capable, dict(original))

    def with_targets(self, targets: dict) -> "Budget":
        """Other targets over the same chain and original (a search step's)."""
        return Budget(dict(targets), self.capable, self.original)

    def __bool__(self):
        return bool(self.targets)

    def goals(self, index: int, current: dict) -> dict:
        """{metric: Goal} for pass ``index`` of the chain, the model being at cost ``current``;
        only the metrics that pass searches."""
        goals = {}
        for metric, fraction in self.targets.items():
            if metric not in self.capable[index]:
                continue
            k = sum(1 for b in self.capable[index:] if metric in b)
            final = fraction * self.original[metric]
            c = max(current[metric] if current[metric] is not None else self.original[metric], 1e-9)
            limit = final if k == 1 else c * (min(final / c, 1.0)) ** (1.0 / k)
            goals[metric] = Goal(metric, limit, final, fraction)
        return goals

    def verdict(self, after: dict, reports=(), others=None) -> tuple:
        """(reached: {metric: {target, reached, met}} for the report, the TargetError to raise
        when a target was missed, else None). ``others``: a callable giving ``missed``'s
        {metric: {pass: floor}} of the passes outside the chain, called only when a target was missed."""
        out = reached(self.targets, self.original, after)
        unmet = [m for m, r in out.items() if not r["met"]]
        return out, missed(out, reports, others(unmet) if unmet and others is not None else None)
