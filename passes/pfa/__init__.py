"""pfa: Principal Filter Analysis (Suau et al., "Filter Distillation for Network Compression",
WACV 2020), post-training, with least-squares reconstruction instead of fine-tuning.

For each coupling group (``onnxshrink.channels``: tensors that must lose the same channels) the
responses r ∈ R^n of its channels are collected on calibration data (conv maps max-pooled over
space; rows of linear outputs). With λ the eigenvalues of Cov(r), descending, normalised to sum 1:

    PFA-En:  keep the smallest k with Σ_{i≤k} λ_i ≥ energy;
    PFA-KL:  KL = Σ λ_i log(n λ_i),  keep ceil(n · (1 − KL / log n)).

Which channels go (``selection``):
- reconstruction (default; ThiNet, Luo et al. 2017 / He et al. 2017): greedy backward elimination on
  the group's consumers. For a consumer with inputs x (its im2col/feature columns) and outputs y,
  H = (Cov(x) + αI)⁻¹, W = H Cov(x, y); dropping channel c (its block B of k·k columns) raises
  min ‖XW − Y‖² by tr(W_Bᵀ H_BB⁻¹ W_B), and H ← H − H_·B H_BB⁻¹ H_B·, W ← W − H_·B H_BB⁻¹ W_B refit
  the rest. Summed over consumers (relative to tr Cov(y)), this also gives each group's error
  curve e_g(k);
- pearson (the paper): drop the channel whose |Pearson correlations| with the rest sum highest;
- magnitude: smallest filter weight norm first.

Budget mode (``--target-flops`` / ``--target-params``), ``allocation``:
- error (default): from every group whole, repeatedly shrink (by ``channel_multiple``) the group with
  the least Δe_g per unit of cost saved until the goals hold, then give back steps that still fit;
- energy (the paper): the largest global energy whose PFA-En recipe meets the goals (bisection).
With ``measured`` (by default where groups × calibration samples × FLOPs per sample is at most
``pass_.MEASURE_WORK``) the error curves are first rescaled by each group's measured effect on the
model's outputs: the group alone pruned by a quarter, its consumers refit on half of the calibration
units, the output error of a run over the other half (both ways) divided by the curve's prediction
(``allocation.measured_curves``). With ``refine`` (opt-in) each group is measured again at the count
an allocation chose and the budget allocated again on curves through the measured points
(``allocation.refined_curves``).
Costs come from ``CostModel``: cost(k) is at most quadratic in the counts (a layer's params/FLOPs are
bilinear in its input and output channel counts), identified from a few probe prunes.

k is rounded up to a multiple of ``channel_multiple`` columns (for attention heads, whose channel spans
head-size columns, any head count). Then every weight layer that reads a pruned
tensor is refit, level by level on the pruned network's own inputs, to the reference network's
pre-activation: W', b' = argmin ‖X̃ W' + b' − Y‖² + α‖W' − W0‖² (toward the sliced weights), α
chosen per layer on held-out calibration batches from one eigendecomposition of Cov(x̃).

The package: ``pass_`` (the pass: eligibility, plan, the order of the steps, the report), ``recipes``
(PFA-En, PFA-KL, the Pearson order), ``elimination`` (reconstruction-aware order and error curves),
``allocation`` (cost model, budget search, reach), ``refit`` (the ridge refit, on the shared
``onnxshrink.refit`` loop and ``lstsq``), ``statistics`` (what one calibration run measures) and
``edits`` (consumers and whether they can be refit, their input columns, residual Adds).
"""

from .allocation import CostModel, multiple_of
from .elimination import Problem, elimination_order
from .pass_ import Pfa, PfaConfig
from .recipes import kept_energy, kept_kl, pearson_removal_order, round_up, spectrum

__all__ = ["Pfa", "PfaConfig", "CostModel", "multiple_of", "Problem", "elimination_order", "kept_energy", "kept_kl",
           "pearson_removal_order", "round_up", "spectrum"]
