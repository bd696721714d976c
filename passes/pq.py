"""store weights as product-quantized codebooks decoded in the graph (not built yet)."""

from ..registry import Pass, register


@register
class Pq(Pass):
    name = "pq"
    summary = "store weights as product-quantized codebooks decoded in the graph"
    ready = False
