"""hadamard: replace a Gemm/MatMul by Fastfood-structured blocks fitted post hoc (Deep Fried
Convnets, Yang et al. 2015; Fastfood, Le, Sarlós & Smola 2013).

A dense layer y = W x + c becomes Σ_k S H G Π H B pad(x) per output stack, plus an optional
low-rank correction U Vᵀ x and the bias: B, G, S diagonal, Π a fixed permutation, H the
Walsh–Hadamard transform. Storage is 3d per block instead of d_in·d_out, compute O(d log d).

The package:
- ``pass_``: the pass (candidates and their reasons, the sequential run over the layers, the report);
- ``config``: its options;
- ``search``: which structure (K blocks, rank r) a layer gets;
- ``fastfood``: the Fastfood model of a layer and its alternating-least-squares fit;
- ``transform``: the Walsh–Hadamard transform in numpy;
- ``emit``: the graph edits (the transform and the blocks as standard ONNX ops).
"""

from .config import HadamardConfig
from .emit import HadamardEmitter, emit_fastfood, replace, wht_model
from .fastfood import Block, FastfoodFit, LowRankBasis
from .pass_ import Hadamard, candidate_problem, dense_layer
from .search import choose_structure, rank_candidates
from .transform import factors, fwht, next_pow2

_replace = replace   # the name tests and benchmarks import

__all__ = ["Hadamard", "HadamardConfig", "Block", "FastfoodFit", "LowRankBasis",
           "HadamardEmitter", "emit_fastfood", "replace", "wht_model", "choose_structure", "rank_candidates",
           "candidate_problem", "dense_layer", "factors", "fwht", "next_pow2"]
