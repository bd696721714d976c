"""The pfa pass: which groups it may prune (``check``), and the order of the steps in ``apply``:

    statistics (one run) → removal order and error curve per group → kept counts (recipe or
    budget) → prune → refit the consumers, level by level → report.

The numerics live beside it: ``recipes`` (PFA-En, PFA-KL, Pearson order), ``elimination``
(reconstruction-aware order and error curves), ``allocation`` (cost model and budget search),
``refit`` (the ridge refit); the graph side in ``edits`` and ``statistics``."""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass

import numpy as np

from ...calibrate import data_memo
from ...channels import analyze
from ...cost import node_costs
from ...errors import UsageError
from ...graph import import_graph, observed_input_shapes
from ...parallel import ordered_map
from ...registry import Pass, PassReport, Plan, Requires, Skip
from . import allocation
from .allocation import CostModel, multiple_of, overshoot_note, reach_of, step_of
from .edits import refit_consumers, refit_reason, weight_row_norms
from .elimination import Elimination
from .recipes import kept_energy, kept_kl, pearson_removal_order, round_up, spectrum
from .refit import sequential_refit
from .statistics import collect_statistics

MODES = ("auto", "energy", "kl", "budget")
SELECTIONS = ("reconstruction", "pearson", "magnitude")
ALLOCATIONS = ("error", "energy")


@dataclass
class PfaConfig:
    mode: str = "auto"            # auto: budget when a flops/params target is given, else energy
    energy: float = 0.98          # PFA-En: fraction of the response spectrum's energy kept per group
    selection: str = "reconstruction"  # reconstruction: backward elimination on the consumers' least-squares
                                  # error; pearson (the paper); magnitude (smallest filter weight norm first)
    allocation: str = "error"     # budget mode: error (greedy on per-group reconstruction-error curves per
                                  # unit of cost) or energy (one global energy threshold, the paper)
    channel_multiple: int = 8     # round kept counts up to a multiple of this (1: no rounding); a budget
                                  # moves a group of fewer than 4 such steps by an eighth of it (allocation.step_of)
    ridge: float = -1.0           # relative ridge of the reconstruction; < 0: chosen per layer
                                  # on held-out calibration batches from RIDGES
    positions: int = 32           # conv refits: sampled output positions per sample
    residual_targets: bool = True  # a layer feeding a residual Add is fit to the reference sum
    prior: bool = True            # ridge toward the layer's own sliced weights (False: toward zero)
    refit_depth: int = 0          # also refit the weight layers up to this many layers after the consumers
                                  # (0: the consumers only), toward the reference network's outputs
    measured: bool | None = None  # budget mode, allocation error: scale each group's error curve by its measured
                                  # effect on the model's outputs (per group: a prune, its consumers refit on one
                                  # half of the calibration units and run on the other, both ways: ``probe_folds``);
                                  # None (auto): where that work is bounded (``measures``: groups x units x FLOPs
                                  # per unit <= MEASURE_WORK): khmer_segmenter@0.9 same segmentation 0.750 -> 0.917,
                                  # oww_embedding@0.9 worst cosine 0.966 -> 0.988; not ResNet-50 / ViT / the CRNN
    refine: bool = False          # measured allocation: measure each group again at the count an allocation chose
                                  # and allocate again on curves through the measured points (allocation.refined_curves,
                                  # up to REFINE_ROUNDS); opt-in: oww_embedding@0.9 0.988 -> 0.9896, but
                                  # khmer_segmenter@0.9 0.917 -> 0.833 (two sentences of 24)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"pfa.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.selection not in SELECTIONS:
            raise ValueError(f"pfa.selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"pfa.energy must be in (0, 1], got {self.energy}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"pfa.allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        if self.channel_multiple < 1:
            raise ValueError(f"pfa.channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.refit_depth < 0:
            raise ValueError(f"pfa.refit_depth must be >= 0, got {self.refit_depth}")
        if self.positions < 1:
            raise ValueError(f"pfa.positions must be >= 1, got {self.positions}")


class Pfa(Pass):
    """Remove the channels of each coupling group that its consumers' least-squares refit misses
    least (or the paper's Pearson / a magnitude order), as many as a PFA recipe or the budget says,
    then refit the consumers (the package docstring has the math)."""

    name = "pfa"
    summary = "Principal Filter Analysis: remove Conv filters / linear neurons whose responses are correlated"
    Config = PfaConfig
    requires = Requires(data=True)
    budgets = ("flops", "params")

    # -- which groups
    @staticmethod
    def check(group) -> str | None:
        """Why pfa leaves an unpinned coupling group whole, or None when it may prune it."""
        if group.size < 2:
            return "a single channel: nothing to remove"
        if not group.observations:
            return "no tensor shows the channels' responses"
        return None

    def eligible(self, model, an):
        """(groups pfa can prune, [Skip]): every pin, each group's ``check``, and every consumer that
        could not be refit (``edits.refit_reason``), which leaves the channels it reads whole."""
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        groups, skipped = [], []

        def skip(node, reason):
            if not any(s.node == node and s.reason == reason for s in skipped):
                skipped.append(Skip(node, reason))

        for g in an.groups:
            if g.pinned:
                for p in g.pins:
                    skip(p.node, p.reason)
                continue
            reason = self.check(g)
            if reason is not None:
                skip(g.name, reason)
                continue
            blocked = False
            for c in refit_consumers(nodes, g.consumers):
                reason = refit_reason(nodes[c], graph)
                if reason is not None:
                    skip(c, f"{reason}; the channels it reads ({g.name}) are left whole")
                    blocked = True
            if not blocked:
                groups.append(g)
        return groups, skipped

    def plan(self, model, cfg):
        groups, skipped = self.eligible(model, analyze(model, observed_input_shapes()))
        return Plan(nodes=[s.node for g in groups for s in g.sources if s.prunable], skipped=skipped)

    def reach(self, model, cfg, shapes=None, an=None, groups=None):
        """What pfa alone can do to ``model`` at input ``shapes``: {"acts_on": {metric: share of the
        model's cost in nodes whose cost changes when channels go}, "floor": {metric: the fraction
        of the cost left with every prunable group at its smallest count (``allocation.step_of``)}}."""
        if an is None:
            an = analyze(model, shapes if isinstance(shapes, dict) else None)
            groups, _ = self.eligible(model, an)
        keep = {g.index: np.arange(step_of(g, cfg.channel_multiple)) for g in groups
                if step_of(g, cfg.channel_multiple) < g.size}
        return reach_of(model, an.prune(model, keep) if keep else model, shapes)

    # -- the steps
    def apply(self, model, cfg, ctx):
        t0 = time.perf_counter()
        report = PassReport(self.name)
        an = analyze(model, ctx.sample_shapes)
        groups, report.skipped = self.eligible(model, an)
        groups = ctx.unprotected(groups, lambda g: (s.node for s in g.sources), report,
                                         names_of=lambda g: [g.name])   # the accuracy search's, keep's
        frozen = getattr(ctx, "frozen", frozenset())
        if frozen:   # a node the user keeps as it is loses no channel it reads or writes (and is not refit)
            touched = frozen_groups(an, model, frozen)
            for g in groups:
                if g.index in touched:
                    n = touched[g.index]
                    report.skip(g.name, f"its channels pass through {n}, {ctx.protected.get(n, 'kept as it is')}")
            groups = [g for g in groups if g.index not in touched]
        mode = cfg.mode
        has_goal = any(m in self.budgets for m in ctx.goals)
        if mode == "auto":
            mode = "budget" if has_goal else "energy"
        if mode == "budget" and not has_goal:
            raise UsageError("pfa.mode=budget needs --target-flops or --target-params")
        details = {"mode": mode, "groups": len(an.groups), "prunable_groups": len(groups),
                   "selection": cfg.selection}
        report.details = details
        if has_goal:   # what pfa alone could reach, for the report and a TargetError's message
            details["reach"] = self.reach(model, cfg, ctx.sample_shapes, an, groups)
        if not groups:
            return model, report
        by_error = mode == "budget" and cfg.allocation == "error"
        rows = {}
        covs, problems = collect_statistics(model, an, groups, cfg, ctx,
                                            consumers=cfg.selection == "reconstruction" or by_error, rows=rows)
        if mode in ("energy", "kl"):   # a recipe from the response spectrum: only where the rows show it
            groups = self._supported(groups, rows, report, details)
            if not groups:
                return model, report
        t_sel = time.perf_counter()
        sel = Selection.of(model, an, groups, covs, problems, cfg)
        details["selection_seconds"] = round(time.perf_counter() - t_sel, 3)

        t_alloc = time.perf_counter()
        if mode == "budget":
            ks, keep, pruned = self._meet_budget(sel, ctx, details)
        else:
            ks = sel.recipe(mode)
            if mode == "energy":
                details["energy"] = cfg.energy
            keep = sel.keep(ks)
            pruned = an.prune(model, keep) if keep else model
        details["allocation_seconds"] = round(time.perf_counter() - t_alloc, 3)

        consumers = self._report_recipe(sel, ks, keep, report)
        for e in sel.eliminations.values():   # the counts are final: free the consumers' matrices
            e.close()
        if not keep:
            details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
            return model, report
        pruned, errors, ridges = sequential_refit(pruned, an, keep, consumers, cfg, ctx)
        if ridges:
            details["ridges"] = {k: ridges[k] for k in sorted(ridges)}
        if errors:
            details["refit_errors"] = {k: round(v, 5) for k, v in sorted(errors.items())}
            details["refit_error_mean"] = round(float(np.mean(list(errors.values()))), 6)
            details["refit_error_max"] = round(float(np.max(list(errors.values()))), 6)
        details["calibration_runs"] = ctx.calibration_runs
        details["fit_seconds"] = round(time.perf_counter() - t0 - ctx.calibration_seconds, 3)
        return pruned, report

    @staticmethod
    def _supported(groups, rows, report, details):
        """The groups whose response statistics have more rows than channels. With R rows the
        spectrum has at most R − 1 non-zero eigenvalues whatever the layer's redundancy, so a
        recipe from it would keep at most R − 1 channels because the data is small, not because
        the channels are redundant: such a group is kept whole, and the report says so."""
        out = []
        for g in groups:
            if rows.get(g.index, 0) > g.size:
                out.append(g)
                continue
            report.skip(g.name, f"{rows.get(g.index, 0)} calibration rows for {g.size} channels: too few to "
                        f"measure which are redundant (the energy recipe needs more rows than channels; "
                        f"give more calibration samples, or a target_flops or target_params, whose "
                        f"allocation fits the consumers on many more rows)")
            details.setdefault("too_few_rows", []).append(g.name)
        return out

    def _meet_budget(self, sel, ctx, details):
        """(ks, keep, pruned model) for the goals of ``ctx`` (budget mode): allocate on the cost
        model, then check the real model's cost and step on where the cost model missed."""
        cfg, model, an = sel.cfg, sel.model, sel.an
        goals = {m: g for m, g in ctx.goals.items() if m in self.budgets}
        details["allocation"] = cfg.allocation
        cost = CostModel(an, model, sel.groups,
                         lambda m: {c.name: (c.params, c.flops) for c in node_costs(m, ctx.sample_shapes)})
        targets = {m: goal.limit for m, goal in goals.items()}
        if ctx.signatures and len(ctx.signatures) > 1:
            # the cost model counts FLOPs at the first signature's shapes, the goals over every
            # signature (feeds of several lengths): the limits in the cost model's units (else a
            # short first feed meets them with nothing pruned)
            whole, base = ctx.cost(model), cost({})
            targets = {m: t * (base[m] / whole[m] if whole.get(m) else 1.0) for m, t in targets.items()}
        curves = sel.curves
        now = cost({})
        cut = max(1.0 - targets[m] / max(now[m], 1e-12) for m in targets)   # the share of the cost to remove
        if cfg.allocation == "error":
            sel.eliminate_to(1.0 - cut)
        if cfg.allocation == "error" and measures(cfg, sel.groups, model, ctx, cut, details) \
                and not all(goal.met(now[m]) for m, goal in goals.items()):
            with ctx.timed("search"):
                measure, points = self._output_effect(sel, ctx), {}

                def recorded(g, k):
                    points.setdefault(g.index, {})[k] = err = measure(g, k)
                    return err
                curves = allocation.measured_curves(sel.groups, sel.curves, cfg.channel_multiple, recorded, details)
                for _ in range(allocation.REFINE_ROUNDS if cfg.refine else 0):   # measure where the allocation goes
                    ks = allocation.by_error(sel.groups, curves, cfg.channel_multiple, cost, targets, {})
                    curves, new = allocation.refined_curves(sel.groups, sel.curves, curves, points, ks, measure,
                                                            details)
                    if not new:
                        break
        if cfg.allocation == "error":
            ks = allocation.by_error(sel.groups, curves, cfg.channel_multiple, cost, targets, details)
        else:
            ks, energy = allocation.by_energy(sel.groups, sel.lams, cfg.channel_multiple, cost, targets, details)
            details["energy"] = round(energy, 6)
        details["cost_probes"] = cost.probes
        keep = sel.keep(ks)
        pruned = an.prune(model, keep) if keep else model
        if not keep:
            return ks, keep, pruned
        # the cost model is exact for in/out-bilinear layers; check the real model, and step on
        # (greedily, real cost) where something it cannot see kept it above the budget
        for _ in range(64):
            real = ctx.cost(pruned)
            if all(goal.met(real[m]) for m, goal in goals.items()):
                break
            tighter = {m: goal.limit * goal.limit / max(real[m], 1e-12) for m, goal in goals.items()}
            ks2 = allocation.by_error(sel.groups, curves, cfg.channel_multiple, cost, tighter, details, ks)
            if ks2 == ks:
                break
            ks = ks2
            keep = sel.keep(ks)
            pruned = an.prune(model, keep)
            real = None   # the cost of the model before this step
        if cfg.channel_multiple > 1:   # the last count is of ``pruned`` unless the loop ran out
            details.update(overshoot_note(ctx.cost(pruned) if real is None else real, goals, cfg.channel_multiple))
        return ks, keep, pruned

    @staticmethod
    def _output_effect(sel, ctx):
        """measure(g, k): the output error (``validate.output_error``: mean and worst per-sample
        relative squared error, range error) of the pass's input model with only group ``g`` pruned to
        ``k`` channels and its consumers refit. Held out (``probe_folds``): the consumers are refit
        on one half of the calibration units and the error is measured on the other half (up to
        ``GAIN_SAMPLES``), both ways, the mean of the two; a refit that fits its rows but not new
        ones shows its real effect (with fewer than ``MIN_FOLD_UNITS`` units per half: refit and
        measured on the same data)."""
        from ...validate import OutputProbe
        folds = probe_folds(ctx)
        probes = [OutputProbe(held, sel.model) for _, held in folds]
        nodes = {n.name: n for n in import_graph(sel.model).nodes}
        cfg = sel.cfg

        memo = _effect_memo(ctx, sel.model)
        knobs = (cfg.selection, cfg.ridge, cfg.positions, cfg.residual_targets, cfg.prior, cfg.refit_depth,
                 cfg.channel_multiple, len(folds))

        def measure(g, k):
            key = (g.name, k, knobs)
            if memo is not None and key in memo:
                return memo[key]
            memo_value = _measure(g, k)
            if memo is not None:
                memo[key] = memo_value
            return memo_value

        def _measure(g, k):
            keep = sel.keep({**{h.index: h.size for h in sel.groups}, g.index: k})
            errs = []
            for (fit, _), probe in zip(folds, probes):
                runs, seconds = fit.calibration_runs, fit.calibration_seconds
                pruned, _, _ = sequential_refit(sel.an.prune(sel.model, keep), sel.an, keep,
                                                set(refit_consumers(nodes, g.consumers)), cfg, fit)
                if fit is not ctx:   # the folds' runs count as the pass's
                    ctx.calibration_runs += fit.calibration_runs - runs
                    ctx.calibration_seconds += fit.calibration_seconds - seconds
                errs.append(probe.error(pruned))
            return float(np.mean(errs))
        return measure

    @staticmethod
    def _report_recipe(sel, ks, keep, report):
        """Write each group's recipe into ``report``; returns the consumers to refit."""
        recipe, consumers = [], set()
        model_nodes = {n.name: n for n in import_graph(sel.model).nodes}
        for g in sel.groups:
            k = ks[g.index]
            recipe.append({"group": g.name, "channels": g.size, "kept": k,
                           "predicted_error": round(float(sel.curves[g.index][k]), 5)})
            if g.index in keep:
                consumers.update(refit_consumers(model_nodes, g.consumers))
                report.changed.append(f"{g.name}: {g.size} -> {k} channels")
                report.unit(g.name, [s.node for s in g.sources if s.prunable], 1.0 - k / g.size)
            else:
                report.skip(g.name, f"recipe keeps all {g.size} channels")
        report.details["recipe"] = recipe
        return consumers


@dataclass
class Selection:
    """What pfa knows about the groups it may prune: their response covariances ``covs``, spectra
    ``lams`` (computed where asked), ``eliminations`` (where the consumers' problems give a removal
    order; run on demand) and error curves ``curves`` (e_g(k), k = 0..n)."""
    model: object
    an: object
    groups: list
    covs: dict
    lams: dict
    eliminations: dict
    curves: dict
    cfg: PfaConfig

    @classmethod
    def of(cls, model, an, groups, covs, problems, cfg):
        lams = _Lazy(lambda gi: spectrum(covs[gi]))      # eigenvalues only where a recipe needs them
        sel_ridge = cfg.ridge if cfg.ridge >= 0 else 1e-3
        elims, curves = {}, {}
        sel = cls(model, an, groups, covs, lams, elims, curves, cfg)
        nodes = {n.name: n for n in import_graph(model).nodes}
        solved = [g for g in groups if problems.get(g.index)]   # each inverts its consumers' Cov(x): side by side
        elims.update(zip([g.index for g in solved],
                         ordered_map(lambda g: Elimination(problems[g.index], g.size, sel_ridge), solved,
                                     cost=lambda g: sum(p.cxx.shape[0] ** 3 for p in problems[g.index]))))
        for g in groups:
            if problems.get(g.index):
                curves[g.index] = elims[g.index].err_view
            elif len(refit_consumers(nodes, g.consumers)) < len([c for c in g.consumers if c in nodes]):
                # a consumer that is only sliced (ConvTranspose, implicit pads) loses the removed channels' whole
                # contribution: their share of the response energy, in the order they go
                order = sel.order(g)
                energy = np.clip(np.diag(covs[g.index]), 0.0, None)[order]
                curves[g.index] = np.concatenate([[0.0], np.cumsum(energy)])[::-1] / max(energy.sum(), 1e-30)
                curves[g.index][-1] = 0.0
            else:  # nothing to reconstruct from: the spectrum's lost energy stands in for the error
                curves[g.index] = 1.0 - np.concatenate([[0.0], np.cumsum(lams[g.index])])
                curves[g.index][-1] = 0.0
        return sel

    def eliminate_to(self, share: float) -> None:
        """Run each group's elimination down to ``share`` of its channels, the groups side by side
        (``parallel.ordered_map``, the widest first): the first steps, over the most columns, are
        the dearest, and an allocation that asks the curves one step at a time would run them one
        group after the other. The steps are the same whenever they run (``Elimination``), so the
        curves and the channels kept do not change; steps past the count an allocation chooses are
        work spent for nothing, bounded by the share."""
        elims = [(g, self.eliminations[g.index]) for g in self.groups if g.index in self.eliminations]
        ordered_map(lambda ge: ge[1].run_to(max(int(np.ceil(ge[0].size * share)), 1)), elims,
                    cost=lambda ge: sum(st.h.shape[0] ** 3 for st in ge[1].states))

    def recipe(self, mode) -> dict:
        """{group index: kept count} by the paper's recipe (``mode`` "kl" or "energy"), rounded up."""
        cfg = self.cfg
        if mode == "kl":
            return {g.index: round_up(kept_kl(self.lams[g.index]), g.size, multiple_of(g, cfg.channel_multiple))
                    for g in self.groups}
        return {g.index: round_up(kept_energy(self.lams[g.index], cfg.energy), g.size,
                                  multiple_of(g, cfg.channel_multiple)) for g in self.groups}

    def keep(self, ks) -> dict:
        """{group index: the sorted channels kept} for the groups that lose channels at counts ``ks``."""
        keep = {}
        for g in self.groups:
            k = ks[g.index]
            if k >= g.size:
                continue
            if self.cfg.selection == "reconstruction" and g.index in self.eliminations:
                keep[g.index] = self.eliminations[g.index].kept(k)
                continue
            keep[g.index] = np.sort(self.order(g)[g.size - k:])
        return keep

    def order(self, g) -> np.ndarray:
        """A group's channels in the order they go where no elimination ranks them: the smallest
        filters first (``magnitude``), else the paper's Pearson order."""
        if self.cfg.selection == "magnitude":
            return self._magnitude(g)
        return pearson_removal_order(self.covs[g.index])

    def _magnitude(self, g):
        """The group's channels by the summed squared norm of their filters, smallest first."""
        nodes = {n.name: n for n in import_graph(self.model).nodes}
        score = np.zeros(g.size)
        for s in g.sources:
            if s.prunable and s.node in nodes:
                np.add.at(score, self.an.class_index[self.an.roots[s.comps]], weight_row_norms(nodes[s.node]))
        return np.argsort(score, kind="stable")


MIN_FOLD_UNITS = 4   # a held-out probe needs at least this many calibration units on each side
MEASURE_WORK = 1e11  # pfa.measured=None measures where groups x calibration units x FLOPs per unit is at most this


def measures(cfg, groups, model, ctx, cut, details=None) -> bool:
    """Whether the budget allocation measures each group's output effect (``PfaConfig.measured``):
    as set, or (None) where it is read where the allocation will be and its work is bounded:
    - the goal removes at most ``allocation.PROBE_SHARE`` of the cost (``cut``): the probes prune a
      quarter of each group, and a gain read there misleads deeper cuts (the digits cnn_plain at
      FLOPs 0.5: −0.22 → 0.00 pp but latency 0.45 → 0.72 of the original, and 99.56 → 97.33 % from
      40 samples);
    - groups × calibration samples × FLOPs per sample of ``model`` (one prune, two refits and two
      runs per group) is at most ``MEASURE_WORK``: the Khmer segmenter 3e10, oww_embedding 8e10;
      the CRNN 7e11, ResNet-50 3e12 and ViT-S 9e12 keep the in-sample curves.
    A function of the model, the data and the goal only, never of timings, so the model written
    does not depend on the machine."""
    if cfg.measured is not None:
        return bool(cfg.measured)
    flops = ctx.cost(model).get("flops")
    work = len(groups) * max(int(ctx.require_data().n), 1) * (flops or 0.0)
    if details is not None:
        details["measure_work"] = float(f"{work:.3g}")
    return cut <= allocation.PROBE_SHARE + 1e-9 and flops is not None and 0 < work <= MEASURE_WORK


def probe_folds(ctx):
    """[(fit context, held-out context)] for measuring a change's output effect on data its refit
    did not see: two folds, the first half of the calibration units and the second, each refit on one
    and measured on the other. Contexts like ``ctx`` (its goals, protections, timings) over the
    fold's data, with their own tensor caches (the reference's tensors differ per fold) and rows (a
    probe's refits are not the pass's). [(ctx, ctx)] (refit and measured on the same data) where the
    data has fewer than 2 × ``MIN_FOLD_UNITS`` units or cannot be split."""
    data = ctx.require_data()
    units = data.units()
    if units < 2 * MIN_FOLD_UNITS:
        return [(ctx, ctx)]
    half = units - units // 2
    sub = lambda d: dataclasses.replace(ctx, data=d, reference_cache=None, run_caches=[], rows={},  # noqa: E731
                                        calibration_runs=0, calibration_seconds=0.0)
    a, b = sub(data.subset(0, half)), sub(data.subset(half, units))
    return [(a, b), (b, a)]


_EFFECTS = weakref.WeakKeyDictionary()   # calibration data -> (model, seed, batch size, {probe: output error})


def _effect_memo(ctx, model) -> dict | None:
    """The measured output effects of the probes on ``model`` with ``ctx``'s data, kept for as long
    as the data lives: the steps of an accuracy search run the pass again on the same data from the
    same model at other budgets, and the probes do not depend on the budget."""
    return data_memo(_EFFECTS, ctx, model)


class _Lazy(dict):
    """A dict that computes a missing key's value with ``make(key)`` once."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


def frozen_groups(an, model, frozen) -> dict:
    """{group index: the first node of ``frozen`` (names) whose inputs or outputs carry the group's
    channels}: pruning the group would slice that node (its weight, a BN's scale, a slope)."""
    out = {}
    for node in model.graph.node:
        if node.name not in frozen:
            continue
        for t in list(node.input) + list(node.output):
            m = an.tmap.get(t)
            if m is None:
                continue
            for g in np.unique(an.class_group[an.roots[m.comps]]):
                if g >= 0:
                    out.setdefault(int(g), node.name)
    return out
