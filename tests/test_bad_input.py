"""Bad input, run as a user runs it: every case stops with one clear message naming the key,
the bad value and the fix, a non-zero exit (2 for runner's checks, 1 for Hydra's composition
errors), no Python traceback, no MLflow run left RUNNING, and every file the user had
byte-identical afterwards. README's Troubleshooting table lists these cases, one row each."""

import hashlib
import re
import socket
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

# tiny and quick: the cases fail before or right after the first batch
FAST = ["trainer.max_epochs=1", "trainer.device=cpu", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.run.dir=out"]
SMALL_DATA = ["data=synthetic", "data.num_samples=128"]


@dataclass
class Case:
    args: Callable[[Path, Path | None], list[str]]  # (case directory, an MLP checkpoint or None) -> arguments
    code: int  # exit status
    message: str  # a regex for the one message: key, bad value, fix
    env: dict = field(default_factory=dict)
    store: bool = True  # logger.tracking_uri=sqlite:///<case dir>/mlflow.db
    needs_mlp: bool = False  # the case uses a real checkpoint of an MLP (trained once per module)
    prelude: str | None = None  # Python run before runner, in its process (limits, capabilities)
    absent: tuple[str, ...] = ()  # files in the case directory that must not exist afterwards


def _npz(name: str, **arrays) -> Callable[[Path, Path | None], list[str]]:
    def make(directory: Path, mlp: Path | None) -> list[str]:
        np.savez(directory / name, **arrays)
        return ["data=tensors", f"data.path={name}"]

    return make


def _not_npz(directory: Path, mlp: Path | None) -> list[str]:
    (directory / "notes.npz").write_bytes(b"these are my notes, not arrays\n" * 4)
    return ["data=tensors", "data.path=notes.npz"]


def _corrupt_ckpt(directory: Path, mlp: Path | None) -> list[str]:
    (directory / "broken.pt").write_bytes(b"\x00" * 100)
    return ["ckpt_path=broken.pt"]


def _corrupt_last(directory: Path, mlp: Path | None) -> list[str]:
    (directory / "out" / "checkpoints").mkdir(parents=True)
    (directory / "out" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    return []


def _with_mlp(*template: str) -> Callable[[Path, Path | None], list[str]]:
    """Arguments naming a copy of the MLP checkpoint inside the case directory."""

    def make(directory: Path, mlp: Path | None) -> list[str]:
        (directory / "mlp.pt").write_bytes(mlp.read_bytes())
        return [argument.format(ckpt="mlp.pt") for argument in template]

    return make


def _not_a_checkpoint(directory: Path, mlp: Path | None) -> list[str]:
    np.savez(directory / "arrays.npz", x=np.zeros((4, 2), "float32"), y=np.zeros(4, "int64"))
    return ["init_from=arrays.npz"]


def _foreign_target(directory: Path, mlp: Path | None) -> list[str]:
    # a config file (not the command line) naming code outside the allow-list
    (directory / "c" / "model").mkdir(parents=True)
    (directory / "c" / "model" / "evil.yaml").write_text("_target_: os.system\ncommand: touch pwned\n")
    return ["--config-dir", "c", "model=evil"]


def _unreachable(directory: Path, mlp: Path | None) -> list[str]:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [f"logger.tracking_uri=http://127.0.0.1:{port}", "logger.required=true"]


def _under_a_file(directory: Path, mlp: Path | None) -> list[str]:
    (directory / "notes.txt").write_text("a file where a directory was meant\n")
    return ["hydra.run.dir=notes.txt/out"]


def _read_only(*template: str) -> Callable[[Path, Path | None], list[str]]:
    """Arguments naming a directory 'locked' that nobody may write (mode 0o555)."""

    def make(directory: Path, mlp: Path | None) -> list[str]:
        (directory / "locked").mkdir()
        (directory / "locked").chmod(0o555)
        return list(template)

    return make


def _flat_x(directory: Path, mlp: Path | None) -> list[str]:
    np.savez(directory / "flat.npz", x=np.linspace(0, 1, 40).astype("float32"), y=np.arange(40) % 2)
    return ["data=tensors", "data.path=flat.npz", "model=mlp"]


def _nan_x(directory: Path, mlp: Path | None) -> list[str]:
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    x[3, 1], x[5, 2], x[7, 0] = np.nan, np.nan, np.inf
    np.savez(directory / "nan.npz", x=x, y=np.arange(40) % 2)
    return ["data=tensors", "data.path=nan.npz", "model=mlp"]


# Python run in the job's own process before runner starts (run_cli's executable), then exec'd
# into `python -m runner ARGS`: limits and dropped capabilities carry over the exec.
_EXEC_RUNNER = "os.execv(sys.executable, [sys.executable, '-m', 'runner', *sys.argv[1:]])"
# root writes into a mode-0o555 directory regardless: drop the capabilities that allow it
# (DAC override, DAC read-search, fowner) from the bounding set, so the exec'd runner lacks
# them, as an ordinary user would. 77: this machine does not let us (no CAP_SETPCAP).
WITHOUT_ROOTS_OVERRIDE = f"""
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit(77)
{_EXEC_RUNNER}
"""
# a file-size limit (ulimit -f) that the MLflow database outgrows while it is created; with
# SIGXFSZ ignored the write fails with EFBIG, as a full disk fails it with ENOSPC
FILE_SIZE_LIMIT = f"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
{_EXEC_RUNNER}
"""


def _args(*arguments: str) -> Callable[[Path, Path | None], list[str]]:
    return lambda directory, mlp: list(arguments)


CONF = str(ROOT / "tests" / "conf")
ERROR = r"runner: error: "

CASES = {
    # ------------------------------------------------------------------ config
    "unknown option": Case(_args("model=nope"), 1, r"Could not find 'model/nope'\s+Available options in 'model':\s+cnn\s+(\S+\s+)*mlp"),
    "unknown key": Case(_args("trainer.max_epoch=3"), 1, r"Could not override 'trainer\.max_epoch'(.|\n)*Key 'max_epoch' not in 'TrainerConf'\. Did you mean one of: 'max_epochs'"),
    "wrong type": Case(_args("trainer.max_epochs=abc"), 1, r"Value 'abc' of type 'str' could not be converted to Integer\s+full_key: trainer\.max_epochs"),
    "negative lr": Case(_args("optimizer.lr=-0.1"), 2, ERROR + r"optimizer\.lr=-0\.1 is invalid; use a positive learning rate, e\.g\. optimizer\.lr=1e-3"),
    "precision": Case(_args("trainer.precision=fp8"), 2, ERROR + r"trainer\.precision='fp8' is not supported; use one of 32, bf16-mixed, 16-mixed"),
    "accumulate 0": Case(_args("trainer.accumulate_grad_batches=0"), 2, ERROR + r"trainer\.accumulate_grad_batches=0 must be at least 1"),
    "augmentation for other inputs": Case(
        _args("augmentation=specaugment"), 2,
        ERROR + r"augmentation\.specaugment: 'runner\.augment\.SpecAugment' works on spectrogram inputs, but the data gives image inputs of shape \[1, 8, 8\]; pick another augmentation or data with spectrogram samples",
    ),
    "monitor of another task": Case(
        _args("callbacks.checkpoint.monitor=val/rel_l2"), 2,
        ERROR + r"callbacks\.checkpoint\.monitor='val/rel_l2' is not a metric a classification run reports; use one of .*val/acc",
    ),
    "unknown monitor": Case(_args("callbacks.checkpoint.monitor=val/auc"), 2, ERROR + r"callbacks\.checkpoint\.monitor='val/auc' is not a metric .*; use one of .*val/loss"),
    "interval without monitor": Case(
        _args("scheduler=step", "scheduler.interval=validation"), 2,
        ERROR + r"scheduler\.interval=validation needs scheduler\.monitor, e\.g\. scheduler\.monitor=val/loss",
    ),
    "unknown metric": Case(_args("optimized_metric=val/accuracy"), 2, ERROR + r"optimized_metric='val/accuracy' is not a metric this run reports; use one of train/loss"),
    "an int for a list": Case(
        _args("model.channels=32"), 2,
        ERROR + r"model\.channels=32 is not a list of layer widths; give a list of positive integers, e\.g\. model\.channels=\[32,64\]",
    ),
    "foreign keys for own model": Case(
        _args("model._target_=runner_test_helpers.TinyNet", "+model.width=8"), 2,
        # every key the class does not take, in one message (not one run per key)
        ERROR + r"model: 'runner_test_helpers\.TinyNet' does not take channels=\[32, 64\], dropout=0\.1 "
        r"\(it takes input_shape, num_classes, width\); drop them with ~model\.channels ~model\.dropout, or write a model file",
    ),
    "target not allowed": Case(
        _foreign_target, 2,
        ERROR + r"model\._target_='os\.system' is in Python's standard library, which a config cannot open; model must be a torch\.nn\.Module class",
    ),
    # ------------------------------------------------------------------ data files
    "missing file": Case(_args("data=tensors", "data.path=nowhere.npz"), 2, ERROR + r"data\.path='nowhere\.npz': no such file; give data\.path=<file>"),
    "not an npz": Case(_not_npz, 2, ERROR + r"data\.path='notes\.npz' could not be read \(not a \.npz file of plain arrays: .*\); give data\.path=<file> holding arrays x"),
    "npz without x, y": Case(_npz("foreign.npz", a=np.zeros(3), b=np.zeros(3)), 2, ERROR + r"data\.path='foreign\.npz' has no array x or y \(found: \['a', 'b'\]\); give data\.path=<file>"),
    "x/y lengths": Case(_npz("bad.npz", x=np.zeros((10, 4), "float32"), y=np.zeros(9, "int64")), 2, ERROR + r"data\.path='bad\.npz': x has 10 samples but y has 9; x and y must have the same length"),
    "1-D x": Case(
        _flat_x, 2,
        ERROR + r"data\.path='flat\.npz': x has shape \(40,\), but x must hold samples first .*e\.g\. shape \(N, features\) for tabular data or \(N, C, H, W\) for images",
    ),
    "NaN in x": Case(
        _nan_x, 2,
        ERROR + r"data\.path='nan\.npz': array x holds 2 NaN and 1 inf values, in 3 samples \(train: \d of \d+, val: \d of \d+, test: \d of \d+\); remove or fill them before training",
    ),
    "float labels": Case(
        _npz("float_y.npz", x=np.zeros((40, 4), "float32"), y=np.linspace(0, 1, 40).astype("float32")), 2,
        ERROR + r"data\.path='float_y\.npz': y must be non-empty non-negative integer class labels \(got dtype float32\); give data\.path=<file>",
    ),
    # ------------------------------------------------------------------ checkpoints
    "corrupt ckpt_path": Case(_corrupt_ckpt, 2, ERROR + r"ckpt_path='broken\.pt': checkpoint 'broken\.pt' is unreadable \(.*\); pass a readable checkpoint or ckpt_path=null"),
    "corrupt last.pt": Case(_corrupt_last, 2, ERROR + r"no readable checkpoint to resume from: checkpoint '.*last\.pt' is unreadable .*; delete .*checkpoints to start over, or pass ckpt_path=<file>"),
    "ckpt_path of another model": Case(
        _with_mlp("ckpt_path={ckpt}"), 2,
        ERROR + r"ckpt_path='mlp\.pt' does not fit this model/optimizer \(it holds a runner\.models\.MLP model, this run builds runner\.models\.CNN\); resume with the config it was trained with, or pass ckpt_path=null",
        needs_mlp=True,
    ),
    "init_from another model": Case(
        _with_mlp("init_from={ckpt}"), 2,
        ERROR + r"init_from='mlp\.pt': none of its tensors fits this model \(it has 6, e\.g\. net\.1\.weight\); point it at a checkpoint of the same architecture",
        needs_mlp=True,
    ),
    "init_from not a checkpoint": Case(
        _not_a_checkpoint, 2,
        ERROR + r"init_from='arrays\.npz': checkpoint 'arrays\.npz' (is unreadable|is not a runner checkpoint).*; point it at a runner checkpoint .* or set init_from=null",
    ),
    "distillation without teacher": Case(
        _args("loss=distillation"), 2,
        ERROR + r"loss\.teacher_checkpoint and loss\.teacher_run_id are both null: distillation needs a trained teacher; .* pass loss\.teacher_checkpoint=",
    ),
    "teacher of another model": Case(
        _with_mlp("loss=distillation", "loss.teacher_checkpoint={ckpt}"), 2,
        ERROR + r"loss\.teacher does not fit the weights in 'mlp\.pt' \(.*\); set loss\.teacher to the model config the teacher was trained with",
        needs_mlp=True,
    ),
    # ------------------------------------------------------------------ sweeps (checked before any trial or parent run)
    "bad search space": Case(
        _args("-m", "--config-dir", CONF, "hparams_search=bad_space"), 2,
        ERROR + r"hydra\.sweeper\.params\.optimizer\.lr='interval\(1e-3\)' does not parse \(.*\); write it as e\.g\. choice\(a, b\), interval\(0\.1, 0\.5\)",
    ),
    "unknown sampler": Case(
        _args("-m", "hparams_search=optuna_tpe", "hydra.sweeper.sampler=foo"), 2,
        ERROR + r"hydra\.sweeper\.sampler='foo' is not a sampler; use one of tpe, random",
    ),
    "sampler that is no sampler": Case(
        _args("-m", "hparams_search=optuna_tpe", "hydra.sweeper.sampler._target_=optuna.pruners.MedianPruner"), 2,
        ERROR + r"hydra\.sweeper\.sampler\._target_='optuna\.pruners\.MedianPruner'.*sampler",
    ),
    "unknown metric in a sweep": Case(
        _args("-m", "hparams_search=optuna_tpe", "optimized_metric=val/nope"), 2,
        ERROR + r"optimized_metric='val/nope' is not a metric this run reports; use one of train/loss",
    ),
    # ------------------------------------------------------------------ launcher
    "slurm without -m": Case(
        _args("hydra/launcher=slurm"), 2,
        ERROR + r"hydra/launcher=slurm launches the jobs of a --multirun; add -m to the command",
    ),
    # ------------------------------------------------------------------ environment
    "tracking server down": Case(
        _unreachable, 2,
        ERROR + r"logger\.tracking_uri='http://127\.0\.0\.1:\d+' is unreachable \(.*\); start a server there .*or pass logger\.required=false",
        store=False,
    ),
    "MLFLOW_TRACKING_URI bad scheme": Case(
        _args(), 2,
        ERROR + r"MLFLOW_TRACKING_URI='foo://bar' is not a tracking store MLflow can open \(unknown scheme 'foo'; .*\); use sqlite:///<path>/mlflow\.db",
        env={"MLFLOW_TRACKING_URI": "foo://bar"}, store=False,
    ),
    "output directory under a file": Case(
        _under_a_file, 2,
        ERROR + r"hydra\.run\.dir='notes\.txt/out' cannot be written \('notes\.txt' is a file, not a directory\); pick a directory you can write, e\.g\. hydra\.run\.dir=outputs/",
    ),
    "read-only output directory": Case(
        _read_only("hydra.run.dir=locked/out"), 2,
        ERROR + r"hydra\.run\.dir='locked/out' cannot be written \(permission denied: 'locked' is not writable\); pick a directory you can write, e\.g\. hydra\.run\.dir=outputs/",
        prelude=WITHOUT_ROOTS_OVERRIDE,
    ),
    "read-only sweep directory": Case(
        _read_only("-m", "hydra.sweep.dir=locked/sweep", "trainer.max_epochs=1,2"), 2,
        ERROR + r"hydra\.sweep\.dir='locked/sweep' cannot be written \(permission denied: 'locked' is not writable\); pick a directory you can write, e\.g\. hydra\.sweep\.dir=multirun/",
        prelude=WITHOUT_ROOTS_OVERRIDE,
    ),
    "default store over the file-size limit": Case(
        _args(), 2,
        ERROR + r"the default MLflow store \S+/mlflow\.db \(logger\.tracking_uri is not set\) could not be written \(.*; this process may write files of at most 200000 bytes: ulimit -f\); free disk space or raise the file-size limit .*set logger\.tracking_uri=",
        store=False, prelude=FILE_SIZE_LIMIT, absent=("mlflow.db",),
    ),
    "no cuda": Case(_args("trainer.device=cuda"), 2, ERROR + r"trainer\.device='cuda' but CUDA is not available on this machine; use trainer\.device=cpu or auto"),
}


def test_the_table_covers_every_group():
    assert len(CASES) >= 20
    assert len(CASES) == 40


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> Path:
    """A real runner checkpoint of an MLP: the wrong architecture for the default CNN."""
    directory = tmp_path_factory.mktemp("mlp")
    result = run_cli([*SMALL_DATA, *FAST, "model=mlp", "logger=none"], cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory / "out" / "checkpoints" / "last.pt"


def _digests(directory: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in directory.rglob("*") if path.is_file()}


def _runs(database: Path) -> list[tuple[str, str]]:
    if not database.exists():
        return []
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT run_uuid, status FROM runs").fetchall()


@pytest.mark.parametrize("name", list(CASES), ids=str)
def test_bad_input_gets_one_clear_message(tmp_path, name, request):
    case = CASES[name]
    if name == "no cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so trainer.device=cuda is valid here")
    mlp = request.getfixturevalue("mlp_checkpoint") if case.needs_mlp else None
    args = case.args(tmp_path, mlp)
    data = [] if any(arg.startswith("data=") for arg in args) else SMALL_DATA
    store = [f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if case.store else []
    before = _digests(tmp_path)

    # the case's own arguments last: they win over FAST (trainer.device=cuda over cpu)
    executable = [sys.executable, "-c", case.prelude] if case.prelude else None
    result = run_cli([*data, *FAST, *store, *args], cwd=tmp_path, env=case.env, timeout=120, executable=executable)
    if case.prelude == WITHOUT_ROOTS_OVERRIDE and result.returncode == 77:
        pytest.skip("running as root, and root's write-anywhere capabilities cannot be dropped here")

    assert result.returncode == case.code, result.stderr
    assert re.search(case.message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("runner: error: ")]
    if case.code == 2:  # runner's own check: exactly one message, and it is the last line
        assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    else:
        assert not errors
    after = _digests(tmp_path)
    for path, digest in before.items():  # nothing the user had was changed or removed
        assert after.get(path) == digest, path
    assert not (tmp_path / "out" / "checkpoints" / "best.pt").exists()
    assert not (tmp_path / "pwned").exists()
    running = [run for run in _runs(tmp_path / "mlflow.db") if run[1] == "RUNNING"]
    assert not running, running
    for name in case.absent:  # e.g. a partial store this run created
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("model, key, value, shown, fix", [
    ("CNN", "channels", 32, "32", "[32,64]"),
    ("CNN", "channels", ["32", 64], "['32', 64]", "[32,64]"),
    ("MLP", "hidden", 128, "128", "[128,64]"),
    ("PINN", "hidden", 32, "32", "[32,32,32]"),
    ("ResNet", "widths", 32, "32", "[32,64]"),
    ("ResNet", "widths", [], "[]", "[32,64]"),
    ("ViT", "dim", [64], "[64]", "64"),
    ("ViT", "depth", "abc", "'abc'", "2"),
    ("MLP", "dropout", [0.1], "[0.1]", "0.1"),
], ids=str)
def test_a_model_argument_of_the_wrong_type_is_named_with_its_fix(model, key, value, shown, fix):
    """Every model checks its arguments' types: the key, the value and an example, not
    "'int' object is not iterable" from inside its constructor."""
    from omegaconf import OmegaConf

    from runner import models
    from runner.errors import ConfigError

    shape = [1] if model == "PINN" else [1, 8, 8]
    argument = OmegaConf.create({key: value})[key] if isinstance(value, list) else value  # as Hydra passes it
    with pytest.raises(ConfigError) as error:
        getattr(models, model)(shape, 10, **{key: argument})
    assert str(error.value).startswith(f"model.{key}={shown} is not ")
    assert str(error.value).endswith(f"e.g. model.{key}={fix}")
