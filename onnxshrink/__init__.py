"""onnxshrink: make trained ONNX models smaller and faster by rewriting their graphs."""

from .arguments import Data, Run, Targets
from .errors import (CalibrationError, CheckFailed, InputError, OnnxShrinkError, OutputError, PassError,
                     TargetError, UsageError, ValidationFailed)
from .pipeline import Result, shrink
from .validate import Tolerances
from . import passes  # noqa: E402  the built-in passes (listed in passes/__init__.py) register here

__all__ = ["shrink", "Result", "Data", "Targets", "Tolerances", "Run", "OnnxShrinkError", "UsageError", "InputError",
           "CalibrationError", "OutputError", "PassError", "CheckFailed", "ValidationFailed", "TargetError"]
__version__ = "0.1.0"
