"""pq's options (``--set pq.KEY=VALUE``), checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODEBOOK_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass
class PqConfig:
    block: int = 0                 # sub-vector length d; 0 = per layer type (kernel k·k, else 4)
    centroids: int = 256           # K, centroids per layer codebook (2..256)
    codebook_dtype: str = "fp16"   # fp16 or fp32
    aware: bool = True             # activation-aware EM (False: plain k-means on the weights)
    iters: int = 8                 # activation-aware EM rounds
    gptq: bool = True              # assign block by block with error feedback (full covariance)
    refine: int = 15               # conjugate-gradient steps refitting the codebook (full covariance)
    sequential: bool = True        # targets: original outputs, inputs from the already-quantized net
    kmeans_iters: int = 8          # plain Lloyd rounds (the initialisation)
    damp: float = 0.01             # metric damping, relative to the mean input variance
    bias_correct: bool = True      # absorb the mean output shift into the bias
    first_conv: bool = False       # also quantize the first Conv when it holds < 1/4 of the weight bytes
    positions: int = 16            # Conv: sampled output positions per calibration sample
    bits: str = "auto"             # code width: 8, 6 (four codes in three bytes, K ≤ 64), 5 (six codes in four
                                   # bytes, K ≤ 32), 4 (two codes a byte, K ≤ 16), auto (the narrowest K fits in
                                   # where that saves bytes)
    max_error: float = 3e-4        # per-layer budget on the relative output error; settings are tried fewest
                                   # bytes first (down to scalar codes), the first within it kept, else float
                                   # (0 = no budget: the first setting is kept whatever its error)
    min_bytes: int = 4096          # layers whose dense weight is smaller stay float (little to gain)
    allocate: bool = False         # spend the error budget across layers by their measured effect on the outputs,
                                   # 6-bit codes included; the choice is measured with every layer at once and
                                   # kept only within the rule's measured error and decision flips (opt-in)
    output_error: float = 2e-3     # allocate: the model's output error it may spend (relative squared error of
                                   # the outputs, a quarter of the worst sample's and of the squared range error),
                                   # or what the per-layer budget predicts where that is more
    loosen: str = "auto"           # the per-layer budget loosened (LOOSEN: 10x, then 3x pq.max_error) where the model
                                   # fitted so, measured on held-out calibration units (HOLDOUT: a quarter, which the
                                   # tries' fits do not see), passes the default gate at half its
                                   # margins and flips no more decisions than the rule's model; auto: models of at
                                   # most LOOSEN_MAX_BYTES, and up to LOOSEN_WIDE_BYTES the 10x try alone, judged
                                   # against the reference (each try is a full fit); true, false
    float16: bool = True           # with fp16 codebooks, the float32 constants left float (first Conv, small heads,
                                   # biases, slopes) stored as fp16 + Cast where that saves bytes (relative rounding
                                   # error within edits.HALF_ERROR and pq.max_error)
    short_names: bool = True       # the decode subgraphs' nodes and inner tensors renamed q0, q1, ... (graph.
                                   # compact_names; the codes, codebook and decoded weight W.pq keep the
                                   # weight's name): their names are a few percent of a small model's file
                                   # (mtcnn_rnet 4 %)
    tighten: bool = True           # where the rule's model fails the default gate on the calibration data, fit again
                                   # at 0.1x, then 0.01x pq.max_error (search.TIGHTEN), the first that passes kept
    rounds: int = 4                # sequential: at most this many statistics rounds (consecutive
                                   # topological levels share one; 0 = one round per level)

    def __post_init__(self):
        if self.block < 0 or self.block > 64:
            raise ValueError(f"pq.block must be 0 (auto) or 1..64, got {self.block}")
        if not 2 <= self.centroids <= 256:
            raise ValueError(f"pq.centroids must be in 2..256 (one-byte codes), got {self.centroids}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ValueError(f"pq.codebook_dtype must be fp16 or fp32, got '{self.codebook_dtype}'")
        if self.iters < 0 or self.kmeans_iters < 1 or self.refine < 0:
            raise ValueError("pq.iters and pq.refine must be ≥ 0, pq.kmeans_iters ≥ 1")
        if self.damp < 0:
            raise ValueError(f"pq.damp must be ≥ 0, got {self.damp}")
        self.bits = str(self.bits).lower()
        if self.bits not in ("auto", "4", "5", "6", "8"):
            raise ValueError(f"pq.bits must be 4, 5, 6, 8 or auto, got '{self.bits}'")
        if self.max_error < 0:
            raise ValueError(f"pq.max_error must be ≥ 0 (0: no budget), got {self.max_error}")
        if self.output_error < 0:
            raise ValueError(f"pq.output_error must be ≥ 0, got {self.output_error}")
        self.loosen = str(self.loosen).lower()
        if self.loosen not in ("auto", "true", "false"):
            raise ValueError(f"pq.loosen must be auto, true or false, got '{self.loosen}'")
        if self.rounds < 0:
            raise ValueError(f"pq.rounds must be ≥ 0 (0: one per level), got {self.rounds}")
        if self.min_bytes < 0:
            raise ValueError(f"pq.min_bytes must be ≥ 0, got {self.min_bytes}")
        if self.bits == "4" and self.centroids > 16:
            raise ValueError(f"pq.bits=4 holds at most 16 centroids, got pq.centroids={self.centroids}")
        if self.bits == "5" and self.centroids > 32:
            raise ValueError(f"pq.bits=5 holds at most 32 centroids, got pq.centroids={self.centroids}")
        if self.bits == "6" and self.centroids > 64:
            raise ValueError(f"pq.bits=6 holds at most 64 centroids, got pq.centroids={self.centroids}")

    @property
    def dtype(self):
        """The numpy dtype codebooks are stored in."""
        return CODEBOOK_DTYPES[self.codebook_dtype]
