"""The accuracy-controlled bisection: finds the smallest budget within the drop, records every
step, and says when nothing is within it."""

import pytest

from onnxshrink.search import MILD_STEPS, smallest_within


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
    assert len(res.steps) == 8 + MILD_STEPS and not any(s.within for s in res.steps)
    # it walked toward the original, then halved the mildest cut three times before giving up
    assert 0.96 < res.steps[7].fraction < 0.97 and res.steps[-1].fraction > 0.995
    cuts = [1 - s.fraction for s in res.steps[7:]]
    assert all(abs(b / a - 0.5) < 1e-9 for a, b in zip(cuts, cuts[1:]))


def test_a_cut_milder_than_the_bisection_tries_is_found():
    """The metric holds only above 0.985 of the budget: the bisection's steps all fail (its mildest
    about 0.966), then halving the cut finds 0.983 fails, 0.991 within."""
    run, score, _ = _chain(lambda f: 0.0 if f >= 0.985 else 0.1)
    res = smallest_within(run, score, 0.9, max_drop=0.01, steps=8)
    assert res.best_step is not None and res.best_step.within
    assert 0.99 < res.best_step.fraction < 0.992 and len(res.steps) == 8 + 2
    assert not any(s.within for s in res.steps[:-1])


def test_the_mild_steps_stop_where_the_cut_is_negligible():
    def run(f):
        return {"f": f}, max(f, 0.999)   # the chain removes at most 0.1 % whatever it is asked
    res = smallest_within(run, lambda c: 0.0, 0.9, max_drop=0.01, steps=8)
    assert res.best is None and len(res.steps) == 8 + 1
