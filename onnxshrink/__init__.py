"""onnxshrink: make trained ONNX models smaller and faster by rewriting their graphs."""

from .errors import OnnxShrinkError
from .pipeline import Result, shrink
from .validate import Tolerances

__all__ = ["shrink", "Result", "Tolerances", "OnnxShrinkError"]
__version__ = "0.1.0"
