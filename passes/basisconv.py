"""split a kxk Conv into a basis Conv plus a 1x1 Conv (not built yet)."""

from ..registry import Pass, register


@register
class Basisconv(Pass):
    name = "basisconv"
    summary = "split a kxk Conv into a basis Conv plus a 1x1 Conv"
    ready = False
