"""Errors a user can act on. ``__main__`` prints them as one line, without a traceback."""


class RunnerError(Exception):
    """A run could not go on; the message says why and what to do. Exit status 1."""

    exit_code = 1


class ConfigError(RunnerError, ValueError):
    """Bad input: the message names the key, the bad value and the fix. Exit status 2."""

    exit_code = 2


class NonFiniteLossError(RunnerError):
    """The training loss became NaN or infinite and trainer.nonfinite_loss=error."""


class Interrupted(RunnerError):
    """SIGINT or SIGTERM: the loop finished its step, saved last.pt and stopped.
    Exit status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as shells do."""

    def __init__(self, signum: int, step: int):
        import signal

        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoints/last.pt "
            "is saved: run the same command again to resume"
        )


class Pruned(RunnerError):
    """A sweep's pruner stopped this trial early: PRUNED in Optuna, KILLED in MLflow."""


def unsafe_checkpoint_reason(message: str) -> str:
    """A checkpoint error's text with torch's weights-only refusal said plainly: torch's own
    words suggest weights_only=False, which would run whatever code the file carries."""
    import re

    return re.sub(
        r"\(Weights only load failed[^)]*\)",
        "(torch's weights-only loader refused it: not a tensor checkpoint, or it carries pickled "
        "Python objects that could run code, which runner never unpickles)",
        message,
    )
