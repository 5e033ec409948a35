"""Atomic save and validated load of checkpoints.

A save writes a temporary file, fsyncs it, moves the previous file aside as ``<name>.prev.pt``
and renames the new one into place, so a crash at any point leaves a readable checkpoint.
A load uses ``weights_only=True`` (no code runs from a checkpoint) and checks the format.
"""

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from runner.errors import ConfigError, RunnerError
from runner.schema import flatten

FORMAT = "runner-checkpoint/1"
REQUIRED = ("format", "model", "optimizer", "state", "callbacks", "rng")

log = logging.getLogger(__name__)


def previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


class CheckpointWriteError(RunnerError):
    """A checkpoint could not be written (disk full, directory not writable). Exit status 1."""


def save(payload: dict, path: Path) -> None:
    """Write atomically; on an OS error (disk full, no permission) remove the partial
    temporary file and raise CheckpointWriteError: the files already in place stay as they were."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, previous(path))
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:  # not the file system: a bug, shown as it is
            raise
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)  # a partial file would keep the space that ran out
        reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
        if path.exists():
            kept = f"the previous {path.name} is intact"
        elif previous(path).exists():
            kept = f"the newest good one is {previous(path).name}"
        else:
            kept = "no earlier one was written"
        raise CheckpointWriteError(
            f"could not write checkpoint '{path}': {reason}; {kept}; free disk space or make "
            f"{path.parent} writable, then run the same command again to resume"
        ) from None


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind an error: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError of the write itself."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _fsync_directory(directory: Path) -> None:
    # makes the renames themselves durable on a power cut (POSIX; a no-op elsewhere)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used."""


def load(path: Path) -> dict:
    """Read and validate a checkpoint; raise CheckpointError saying what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, random bytes, or a pickle carrying code
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        from runner.errors import unsafe_checkpoint_reason

        raise CheckpointError(unsafe_checkpoint_reason(f"checkpoint '{path}' is unreadable ({reason[:200]})")) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint '{path}' is not a runner checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}")
    return payload


def find_resume(ckpt_path: str | None, checkpoint_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint to resume from: ckpt_path if given, else last.pt of this output
    directory, falling back to its previous version when last.pt is damaged."""
    if ckpt_path:
        path = Path(ckpt_path)
        try:
            return load(path), path
        except CheckpointError as error:
            raise CheckpointError(f"ckpt_path='{ckpt_path}': {error}; pass a readable checkpoint or ckpt_path=null") from None
    last = checkpoint_dir / "last.pt"
    candidates = [path for path in (last, previous(last)) if path.exists()]
    errors = []
    for path in candidates:
        try:
            payload = load(path)
        except CheckpointError as error:
            errors.append(str(error))
            log.warning("%s; trying an older checkpoint", error)
            continue
        if errors:
            log.warning("resuming from the previous good checkpoint %s instead", path)
        return payload, path
    if errors:
        raise CheckpointError(
            "no readable checkpoint to resume from: "
            + "; ".join(errors)
            + f"; delete {checkpoint_dir} to start over, or pass ckpt_path=<file>"
        )
    return None


# keys that may change between a run and its resume without it being a different run
RESUMABLE_CHANGES = ("ckpt_path", "trainer.max_epochs", "trainer.max_steps")


def config_hash(config: dict) -> str:
    """A digest of the resolved config, stored in every checkpoint."""
    kept = {key: value for key, value in flatten(config).items() if key not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict) -> list[str]:
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted((set(old_flat) | set(new_flat)) - set(RESUMABLE_CHANGES))
    return [f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}" for key in keys if old_flat.get(key) != new_flat.get(key)]


def evaluation_weights(path: Path | str, key: str, fix: str) -> dict:
    """The weights a checkpoint was evaluated with (its eval_model, e.g. an EMA, else its
    model), for a config key that points at it (init_from, loss.teacher_checkpoint); a bad
    file is one message naming the key and the fix."""
    try:
        payload = load(Path(path))
    except CheckpointError as error:
        raise ConfigError(f"{key}='{path}': {error}; {fix}") from None
    return payload.get("eval_model") or payload["model"]
