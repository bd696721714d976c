"""One exception hierarchy. The CLI turns each into one line on stderr and an exit code:
0 ok, 1 validation failed, 2 usage or input error."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors are often pages long), or its
    type name when it has no message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class OnnxShrinkError(Exception):
    """Base class: a clear, one-line message for the user."""

    exit_code = 2


class UsageError(OnnxShrinkError):
    """Bad flags, unknown pass, bad option value, impossible target."""


class InputError(OnnxShrinkError):
    """Missing, unreadable or corrupt model or data file."""


class CalibrationError(InputError):
    """Calibration or validation data that does not fit the model."""


class TargetError(UsageError):
    """A --target-flops / --target-params budget that cannot be met."""


class PassError(OnnxShrinkError):
    """A pass failed. The message names the pass and the passes that ran before it."""

    def __init__(self, pass_name, message, previous=()):
        chain = " -> ".join(list(previous) + [pass_name])
        super().__init__(f"pass '{pass_name}' failed (chain: {chain}): {message}")
        self.pass_name = pass_name


class ValidationFailed(OnnxShrinkError):
    """The rewritten model failed validation; nothing is written unless forced."""

    exit_code = 1
