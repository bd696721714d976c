"""The built-in passes, installed as ``onnxshrink.passes``; ``onnxshrink`` imports this package
once, in its ``__init__``, and the list below is every built-in pass there is. A pass of your own
needs no entry here: decorate its class with ``onnxshrink.registry.register``."""

from ..registry import register
from .foldbn import FoldBN
from .pfa import Pfa
from .basisconv import BasisConv
from .lowrank import LowRank
from .hadamard import Hadamard
from .pq import Pq

BUILTIN = (FoldBN, Pfa, BasisConv, LowRank, Hadamard, Pq)

for _cls in BUILTIN:
    register(_cls)
del _cls
