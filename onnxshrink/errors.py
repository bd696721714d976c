"""One exception hierarchy. The CLI turns each into one line on stderr and an exit code:

    0  ok: the model (and report) were written
    1  a check failed (validation, or a --target-* that was missed); nothing written
    2  usage or input error, or an OS error writing the output (nothing written)
    3  written anyway because of --force, although validation failed or a target was missed

API messages name the API's arguments (``force=True``, ``target_flops``); the CLI rephrases them
with its flags.
"""

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_FORCED = 0, 1, 2, 3


def number(value, what: str) -> float:
    """``float(value)``, or a UsageError saying ``what`` must be a number (user-given options)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got '{value}'") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors are often pages long), or its
    type name when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class OnnxShrinkError(Exception):
    """Base class: a clear, one-line message for the user."""

    exit_code = EXIT_USAGE


class UsageError(OnnxShrinkError):
    """Bad flags or arguments, unknown pass, bad option value, impossible target."""


class InputError(OnnxShrinkError):
    """Missing, unreadable, corrupt or unsupported model or data file."""


class CalibrationError(InputError):
    """Calibration or validation data that does not fit the model."""


class OutputError(OnnxShrinkError):
    """The output could not be written (no space, permissions, ...): "PATH: OS message"."""


class PassError(OnnxShrinkError):
    """A pass failed. The message names the pass and the passes that ran before it."""

    def __init__(self, pass_name, message, previous=()):
        chain = " -> ".join(list(previous) + [pass_name])
        super().__init__(f"pass '{pass_name}' failed (chain: {chain}): {message}")
        self.pass_name = pass_name


class CheckFailed(OnnxShrinkError):
    """A check of the rewritten model failed after the run. ``.result`` holds the unsaved
    ``Result``; ``.detail`` the failure without the advice on ``force=True``."""

    exit_code = EXIT_CHECK_FAILED
    result = None

    def __init__(self, detail: str):
        super().__init__(f"{detail} (not saved; force=True returns the result anyway, and this "
                         "error's .result holds it)")
        self.detail = detail


class ValidationFailed(CheckFailed):
    """The rewritten model failed validation; nothing is written unless forced."""


class TargetError(CheckFailed):
    """A target_flops / target_params / target_size budget the chain did not reach."""
