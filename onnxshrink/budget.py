"""Turning ``--target-flops`` / ``--target-params`` into per-pass goals.

The targets are fractions of the *original* model that the whole chain must reach. Each pass that
can search a budget for a metric gets an absolute goal for the model it leaves behind: with k
budget-capable passes still to run (this one included) and the current value c, the goal is
c·(final/c)^(1/k), a geometric split, and the last one aims at the final value itself. So a pass
that over- or under-shoots is corrected by the passes after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TargetError, UsageError

METRICS = ("flops", "params", "bytes")
TOLERANCE = 0.05  # the reached value may exceed the goal by this fraction


@dataclass
class Goal:
    metric: str
    target: float        # absolute value this pass should reach (≤)
    final: float         # absolute value the whole chain must reach
    fraction: float      # the user's fraction of the original

    def met(self, value: float) -> bool:
        return value <= self.target * (1 + TOLERANCE)


def check_fraction(name: str, f):
    if f is None:
        return None
    try:
        f = float(f)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number in (0, 1], got '{f}'") from None
    if not 0 < f <= 1:
        raise UsageError(f"{name} must be in (0, 1] (a fraction of the original), got {f}")
    return f


def pass_goals(targets: dict, original: dict, current: dict, remaining_capable: dict) -> dict:
    """{metric: Goal} for the pass about to run.

    targets: {metric: fraction}; remaining_capable: {metric: number of budget-capable passes left,
    this one included} (only metrics this pass supports)."""
    goals = {}
    for metric, fraction in targets.items():
        k = remaining_capable.get(metric, 0)
        if not k:
            continue
        final = fraction * original[metric]
        c = max(current[metric] if current[metric] is not None else original[metric], 1e-9)
        target = final if k == 1 else c * (min(final / c, 1.0)) ** (1.0 / k)
        goals[metric] = Goal(metric, target, final, fraction)
    return goals


def reached(targets: dict, original: dict, after: dict) -> dict:
    """{metric: {target, reached, met}} for the report."""
    out = {}
    for metric, fraction in targets.items():
        if after.get(metric) is None or original.get(metric) is None:   # not countable: never "met"
            out[metric] = {"target": fraction, "reached": None, "met": False,
                           "why": f"the {metric} of the model cannot be counted (shapes unknown)"}
            continue
        value = after[metric] / max(original[metric], 1)
        out[metric] = {"target": fraction, "reached": round(value, 4), "met": value <= fraction * (1 + TOLERANCE)}
    return out


def missed(reached_targets: dict, reports=()) -> TargetError | None:
    """The error to raise when a target was missed, else None. ``reports``: the chain's pass
    reports; a pass that says what it could reach (``details["reach"]``: the share of its input's
    cost it acts on and the lowest fraction it could leave) is named in the message."""
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
            verdict = "enough for the target" if floor <= r["target"] * (1 + TOLERANCE) else "short of the target"
            reach.append(f"{rep.name} acts on {acts:.1%} of the {m} it was given and could leave at least "
                         f"{floor:.3f} of them ({verdict})")
    why = ("; reachable: " + "; ".join(reach)) if reach else ""
    return TargetError("target cannot be met: the chain reached " + "; ".join(misses) + why
                       + " (see the report's skipped nodes)")
