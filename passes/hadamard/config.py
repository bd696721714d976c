"""The hadamard pass's options (``--set hadamard.KEY=VALUE``): what a structure may cost, how hard
the structure search and the diagonal fits work, and how many calibration rows they use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HadamardConfig:
    tolerance: float = 0.03     # relative squared output error on held-out calibration rows
    blocks: int | None = None   # fixed K (blocks per output stack); None: search 1..max_blocks
    max_blocks: int = 8
    rank: int | None = None     # fixed low-rank correction; None: search 0, 1, 2, 4, 8, ...
    max_params: float = 0.25    # a structure may hold at most this fraction of the layer's params
    min_dim: int = 16           # layers with d_in or d_out below this stay dense
    max_fits: int = 24          # blocks fitted in the structure search at most, per layer (0: no bound),
                                # counted by their work: a block of width d over n output stacks counts
                                # n·(d/512)² (vit_focus fc2, d = 2048: 16, so the search stops after two)
    search_seconds: float = 0.0  # structure search time per layer at most (0: no bound); the best
                                 # structure found within it is kept. Off by default: a time bound
                                 # makes the result depend on the machine's speed (max_fits does not)
    row_memory_mb: int = 256    # calibration rows of several layers are gathered in one run up to this
    time_budget: float = 0.0    # seconds for the whole pass's structure searches (0: no bound); layers
                                # reached after it stay dense (refit where their inputs changed).
                                # Off by default, for the same reason as search_seconds
    block_gain: float = 0.8     # the most one Fastfood block is taken to lower a layer's held-out error by (a
                                # factor): a rank whose low-rank part alone, with the most blocks affordable
                                # beside it at this gain each, would stay above tolerance is not tried (0: off).
                                # Measured: K blocks beside a low-rank part lowered it by 0.83–0.99 per block
                                # on average (vit_focus, the digits MLP; a first block alone by 0.79 once)
    iters: int = 4              # ALS sweeps per added block
    restarts: int = 1           # random starts per added block (the best is kept)
    cg_iters: int = 10          # conjugate-gradient iterations per diagonal solve (0: exact)
    final_iters: int = 3        # backfitting sweeps over all blocks for the chosen structure
    max_rows: int = 4096        # calibration rows kept per layer
    holdout: float = 0.2        # fraction of rows used to choose the structure
    ridge: float = 1e-6         # relative ridge of the diagonal solves
    output_error: float = 0.01  # the model's output error (validate.output_error, measured) the replacements
                                # may bring it to together; a replacement past it leaves its layer dense (0: off)
    refit: bool = True          # least-squares refit of the dense layers a replaced layer feeds directly (no
                                # other dense layer between) whose inputs changed ... Not further: each refit
                                # of a layer further down lowered its own error on held-out units, and together
                                # they lowered the task (vit_focus map IoU 0.894 with 30 refits, 0.920 with the
                                # one direct refit, 0.972 with none; the digits MLP: 98.67 % with fc3's direct
                                # refit, 98.22 % without)
    refit_min_error: float = 0.003  # ... by at least this relative squared error of their output (below,
                                    # a refit gains little and, changing the graph, costs a calibration run)
    seed: int = 0

    def __post_init__(self):
        if not self.tolerance > 0:
            raise ValueError("tolerance must be > 0")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError("blocks must be ≥ 1")
        if self.max_blocks < 1:
            raise ValueError("max_blocks must be ≥ 1")
        if self.rank is not None and self.rank < 0:
            raise ValueError("rank must be ≥ 0")
        if not 0 < self.max_params <= 1:
            raise ValueError("max_params must be in (0, 1]")
        if not 0 < self.holdout < 0.9:
            raise ValueError("holdout must be in (0, 0.9)")
        if not self.refit_min_error >= 0:
            raise ValueError("refit_min_error must be ≥ 0")
        if not 0 <= self.block_gain <= 1:
            raise ValueError("block_gain must be in [0, 1]")
        if not self.output_error >= 0:
            raise ValueError("output_error must be ≥ 0")
        if self.max_fits < 0:
            raise ValueError("max_fits must be ≥ 0")
        if not self.search_seconds >= 0:
            raise ValueError("search_seconds must be ≥ 0")
        if not self.time_budget >= 0:
            raise ValueError("time_budget must be ≥ 0")
        if self.row_memory_mb < 1:
            raise ValueError("row_memory_mb must be ≥ 1")
        if self.iters < 1 or self.final_iters < 0 or self.max_rows < 8:
            raise ValueError("iters ≥ 1, final_iters ≥ 0, max_rows ≥ 8")
