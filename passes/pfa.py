"""Principal Filter Analysis: remove Conv filters / linear neurons whose responses are correlated (not built yet)."""

from ..registry import Pass, register


@register
class Pfa(Pass):
    name = "pfa"
    summary = "Principal Filter Analysis: remove Conv filters / linear neurons whose responses are correlated"
    ready = False
