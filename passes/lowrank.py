"""factorize Gemm/MatMul (and Conv) weights into two thinner layers (not built yet)."""

from ..registry import Pass, register


@register
class Lowrank(Pass):
    name = "lowrank"
    summary = "factorize Gemm/MatMul (and Conv) weights into two thinner layers"
    ready = False
