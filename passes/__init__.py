"""Built-in passes, installed as ``onnxshrink.passes``. Importing this package registers them."""

from . import foldbn, pfa, basisconv, lowrank, hadamard, pq  # noqa: F401
