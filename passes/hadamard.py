"""replace a Gemm/MatMul by a Fastfood-style Hadamard-structured subgraph (not built yet)."""

from ..registry import Pass, register


@register
class Hadamard(Pass):
    name = "hadamard"
    summary = "replace a Gemm/MatMul by a Fastfood-style Hadamard-structured subgraph"
    ready = False
