"""What a job prints and where: the terminal gets the progress and the final summary; the
job's log file (``runner.log``) gets every log line, whatever the terminal is.

* ``log_files()``: the file handlers runner's log lines reach (Hydra's ``runner.log`` on the
  command line, train()'s own in Python).
* ``FILE_ONLY``: ``log.info(..., extra=FILE_ONLY)`` writes a line to the log file and not
  to the terminal while a ``terminal_quiet()`` block is active (the progress bar shows the
  same numbers live; a line printed under it would tear it).
* ``job_output()``: while a job runs, Python warnings and other libraries' log lines (what
  runner cannot act on) go to the log file, not the terminal.
* ``discard_or_record()``: a job that stopped with an error either leaves nothing behind (it
  was refused before it did anything) or keeps its directory with the error in its log.
"""

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runner")

FILE_ONLY = {"file_only": True}


class _Counter(logging.Handler):
    """Counts the records runner's loggers (runner, runner.*) emit, whoever shows them."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


_COUNTER = _Counter()
log.addHandler(_COUNTER)


@dataclass(frozen=True)
class JobStart:
    """What there was when a job began: runner's records so far and the sizes of its log files."""

    records: int
    log_sizes: dict[str, int]


def job_start() -> JobStart:
    """Taken when a job begins (after its log files are open), for discard_or_record."""
    sizes = {}
    for handler in log_files():
        try:
            sizes[handler.baseFilename] = os.path.getsize(handler.baseFilename)
        except OSError:  # not created yet (a handler that opens on its first line)
            sizes[handler.baseFilename] = 0
    return JobStart(_COUNTER.count, sizes)


def _reached_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of this logger reaches: its own and its ancestors' while they propagate."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers += current.handlers
        if not current.propagate:
            break
        current = current.parent  # type: ignore[assignment]
    return handlers


def log_files(logger: logging.Logger = log) -> list[logging.FileHandler]:
    return [handler for handler in _reached_handlers(logger) if isinstance(handler, logging.FileHandler)]


def terminal_handlers(logger: logging.Logger = log) -> list[logging.StreamHandler]:
    return [handler for handler in _reached_handlers(logger)
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


@contextlib.contextmanager
def terminal_quiet():
    """While active, records logged with ``extra=FILE_ONLY`` skip the terminal's handlers
    (they still reach the log file)."""
    handlers = terminal_handlers()
    for handler in handlers:
        handler.addFilter(_not_file_only)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_not_file_only)


def _runner_or_error(record: logging.LogRecord) -> bool:
    return record.name == "runner" or record.name.startswith("runner.") or record.levelno >= logging.ERROR


_in_job = False


@contextlib.contextmanager
def job_output():
    """While a job runs, what libraries say that runner cannot act on goes to the job's log
    file only: Python warnings (deprecations and the like) and other loggers' lines below
    ERROR (matplotlib's "generated new fontManager" on a first run). runner's own lines and
    any error still reach the terminal. Without a log file (a config that turned Hydra's
    logging off) everything stays where it was. A nested block changes nothing."""
    global _in_job
    files, terminals = log_files(), terminal_handlers()
    if _in_job or not files:
        yield
        return
    captured = logging.getLogger("py.warnings")
    saved = captured.handlers[:], captured.propagate, captured.level
    logging.captureWarnings(True)
    captured.handlers, captured.propagate, captured.level = list(files), False, logging.WARNING
    for handler in terminals:
        handler.addFilter(_runner_or_error)
    _in_job = True
    try:
        yield
    finally:
        _in_job = False
        for handler in terminals:
            handler.removeFilter(_runner_or_error)
        captured.handlers, captured.propagate, captured.level = saved
        logging.captureWarnings(False)


def discard_or_record(output_dir: Path, error: BaseException, launch_dir: Path, start: JobStart) -> None:
    """After a job stopped with ``error``: if runner logged nothing since ``start`` and the
    output directory holds only what Hydra wrote for this job (``.hydra/`` and log files that
    were empty when it began; a library's line such as matplotlib's first "generated new
    fontManager" may have been added since), remove it: the run was refused and left nothing
    worth keeping (an ``outputs/<date>/<time>`` per typo otherwise). Anything else there
    (checkpoints, an earlier run's log, files of the user's) keeps the directory, and the error
    is appended to the log file, so that the log says how the job ended."""
    output_dir = Path(output_dir).resolve()
    files = [handler for handler in log_files() if Path(handler.baseFilename).parent == output_dir]
    fresh = {Path(handler.baseFilename).name for handler in files if start.log_sizes.get(handler.baseFilename, 1) == 0}
    try:
        if _COUNTER.count == start.records and _untouched(output_dir, fresh):
            _remove(output_dir, launch_dir.resolve())
            return
    except OSError:  # tidying up must never hide the job's own error
        return
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "runner: error: %s", (error,), None)
    for handler in files:
        handler.handle(record)


def _untouched(output_dir: Path, log_names: set[str]) -> bool:
    if not output_dir.is_dir():
        return False
    for entry in output_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            continue
        if entry.name in log_names and entry.is_file():
            continue
        return False
    return True


def _remove(output_dir: Path, launch_dir: Path) -> None:
    """Remove the refused job's directory, then the parents left empty (outputs/<date>/,
    outputs/) up to the launch directory; never the launch directory or anything above it."""
    if output_dir == launch_dir or launch_dir.is_relative_to(output_dir):
        return
    shutil.rmtree(output_dir / ".hydra", ignore_errors=True)
    for entry in output_dir.iterdir():  # the log files
        entry.unlink(missing_ok=True)
    directory = output_dir
    while True:
        try:
            directory.rmdir()  # only when empty
        except OSError:
            return
        directory = directory.parent
        if directory == launch_dir or not directory.is_relative_to(launch_dir):
            return
