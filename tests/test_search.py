"""The accuracy-controlled bisection: finds the smallest budget within the drop, records every
step, and says when nothing is within it."""

import pytest

from onnxshrink.search import smallest_within


def _chain(drop_at):
    runs = []

    def run(f):
        runs.append(f)
        return {"f": f}, f * 0.98          # a chain that reaches slightly below what it is asked

    def score(cand):
        return 0.9 - drop_at(cand["f"])
    return run, score, runs


def test_finds_the_smallest_fraction_within_the_drop():
    # drop grows as the budget shrinks below 0.6: 0.01 is crossed at f = 0.58
    run, score, runs = _chain(lambda f: max(0.0, 0.6 - f) * 0.5)
    res = smallest_within(run, score, 0.9, max_drop=0.01, steps=12)
    assert res.best_step is not None and res.best_step.within
    assert 0.58 <= res.best_step.fraction <= 0.63
    assert res.best["f"] == res.best_step.fraction
    assert len(res.steps) == len(runs) <= 12
    assert all(s.drop <= 0.01 for s in res.steps if s.within)


def test_the_mildest_budget_wins_when_everything_is_within():
    run, score, runs = _chain(lambda f: 0.0)
    res = smallest_within(run, score, 0.9, max_drop=0.01, lowest=0.1)
    assert runs == [0.1] and res.best_step.fraction == 0.1


def test_nothing_within_the_drop():
    run, score, _ = _chain(lambda f: 0.5)
    res = smallest_within(run, score, 0.9, max_drop=0.01, steps=8)
    assert res.best is None and res.best_step is None
    assert len(res.steps) == 8 and not any(s.within for s in res.steps)
    assert res.steps[-1].fraction > 0.9   # it walked toward the original before giving up
