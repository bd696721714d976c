"""Accuracy-controlled budgets: the smallest model whose task metric stays within a drop.

The chain of passes is run at a global budget fraction ``f`` of one cost metric (FLOPs, params or
bytes: the one the chain's passes can search) and the candidate is scored by the user's metric on
calibration feeds. With the drop assumed to grow as ``f`` shrinks, a bisection over ``log f`` finds
the smallest fraction whose drop is within ``max_drop`` in a handful of runs (relative steps: a
budget of 0.02 is resolved as finely as one of 0.6); every step is recorded
(fraction asked, fraction reached, metric, drop) so the report shows how the budget was found.
The final model is judged again on the held-out validation feeds, which the search never sees.
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

    def as_dict(self):
        return {"fraction": round(self.fraction, 4), "reached": round(self.reached, 4),
                "metric": self.metric, "drop": self.drop, "within": self.within}


@dataclass
class SearchResult:
    best: object | None                   # what ``run`` returned for the chosen fraction
    best_step: Step | None
    steps: list = field(default_factory=list)


def smallest_within(run: Callable[[float], tuple[object, float]], score: Callable[[object], float],
                    original: float, max_drop: float, lowest: float = 0.01, steps: int = 8) -> SearchResult:
    """Bisection over the budget fraction in [lowest, 1], at geometric midpoints.

    ``run(f) -> (candidate, reached_fraction)`` builds a candidate at budget ``f``; ``score(candidate)``
    is its metric (higher is better); ``original`` the original's metric. Returns the candidate with the
    smallest reached fraction among those within ``max_drop`` (None when even the first, mildest
    candidate is not)."""
    result = SearchResult(None, None)

    def attempt(f):
        cand, reached = run(f)
        value = score(cand)
        drop = original - value
        step = Step(f, reached, value, drop, drop <= max_drop)
        result.steps.append(step)
        if step.within and (result.best_step is None or reached < result.best_step.reached):
            result.best, result.best_step = cand, step
        return step

    low = attempt(lowest)
    if low.within:
        return result
    lo, hi = lowest, 1.0
    for _ in range(max(1, steps - 1)):
        mid = (lo * hi) ** 0.5
        if attempt(mid).within:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1.03:
            break
    return result
