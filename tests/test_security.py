"""Security: no code runs from a checkpoint, a config file cannot build what the allow-list
does not name, what runner listens on is the loopback interface, and secrets never reach
MLflow. Each refusal is checked with a marker file the hostile input would create."""

import os
import pickle
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from runner import checkpoint, distributed
from runner.build import AllowList, _initial_weights, build
from runner.job_guard import check_env_set, check_log_files
from runner.targets import judge
from runner.checkpoint import CheckpointError, find_resume, load
from runner.errors import ConfigError
from runner.losses import DistillationLoss
from runner import schema
from runner.schema import is_secret_key, mask_override, mask_secrets, mask_url, redact, remember_env_values, secret_values
from tests.conftest import TINY, compose_config, run_cli

FAST = ["trainer.max_epochs=1", "trainer.device=cpu", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "hydra.run.dir=out"]
SMALL_DATA = ["data=synthetic", "data.num_samples=128"]


# ---------------------------------------------------------------- checkpoints: weights_only
class _Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_checkpoint(path: Path, marker: Path, torch_format: bool = True) -> Path:
    payload = {"format": checkpoint.FORMAT, "model": _Evil(marker), "optimizer": {}, "state": {}, "callbacks": {}, "rng": {}}
    if torch_format:
        torch.save(payload, path)  # torch's zip format, as a real checkpoint
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)  # a bare pickle
    return path


def test_the_hostile_checkpoint_does_run_code_when_loaded_unsafely(tmp_path):
    """The control: without weights_only the file below does run code (so the tests that
    follow would see it)."""
    marker = tmp_path / "pwned"
    loaded = torch.load(_evil_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    loaded["model"].close()  # the file the payload opened
    assert marker.exists()


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "pickle"])
def test_checkpoint_load_refuses_a_pickle_carrying_code(tmp_path, torch_format):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker, torch_format)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*evil\.pt' is unreadable"):
        load(path)
    with pytest.raises(CheckpointError, match=r"ckpt_path='.*evil\.pt'.*pass a readable checkpoint or ckpt_path=null"):
        find_resume(str(path), tmp_path)
    assert not marker.exists()


def test_init_from_and_the_teacher_refuse_a_pickle_carrying_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    refused = r"torch's weights-only loader refused it: not a tensor checkpoint, or it carries pickled Python objects that could run code"
    with pytest.raises(ConfigError, match=rf"init_from='.*evil\.pt': checkpoint .* \({refused}.*\); point it at a runner checkpoint"):
        _initial_weights(torch.nn.Linear(2, 2), str(path))
    with pytest.raises(ConfigError, match=rf"loss\.teacher_checkpoint='.*evil\.pt': checkpoint .* \({refused}.*\); point it at the teacher run's"):
        DistillationLoss(teacher=torch.nn.Linear(2, 2), teacher_checkpoint=str(path))
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["ckpt_path=evil.pt"], r"ckpt_path='evil\.pt': checkpoint 'evil\.pt' is unreadable \(torch's weights-only loader refused it"),
        (["init_from=evil.pt"], r"init_from='evil\.pt': checkpoint 'evil\.pt' is unreadable \(torch's weights-only loader refused it"),
        (["loss=distillation", "loss.teacher_checkpoint=evil.pt"], r"loss\.teacher_checkpoint='evil\.pt': checkpoint 'evil\.pt' is unreadable \(torch's weights-only"),
    ],
    ids=["resume", "init_from", "teacher"],
)
def test_the_command_line_refuses_a_pickle_carrying_code(tmp_path, args, message):
    _evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    result = run_cli([*SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *args], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("runner: error: "), result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before an MLflow run was opened


# ---------------------------------------------------------------- the allow-list
def test_hydra_enforces_the_whitelist_on_nested_targets_too():
    """What build() relies on in the installed Hydra: _execution_whitelist_ is checked at
    every depth, before the target is imported."""
    nested = OmegaConf.create({"_target_": "builtins.dict", "inner": {"_target_": "collections.OrderedDict"}})
    with pytest.raises(InstantiationException, match=r"'collections\.OrderedDict' is not in the Hydra execution whitelist"):
        instantiate(nested, _execution_whitelist_=["builtins.dict"])
    # os.system cannot be allowed at all, even named exactly
    with pytest.raises(InstantiationException, match="cannot be authorized"):
        instantiate({"_target_": "os.system", "command": "true"}, _execution_whitelist_=["os.system"])


def _with(cfg, key: str, value) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, force_add=True)


def test_a_nested_target_is_refused_with_its_key_before_anything_is_built(tmp_path):
    cfg = compose_config([*TINY, "loss=distillation", "loss.teacher_checkpoint=nowhere.pt"])
    _with(cfg, "loss.teacher", {"_target_": "subprocess.Popen", "args": ["touch", str(tmp_path / "pwned")]})
    with pytest.raises(ConfigError, match=r"loss\.teacher\._target_='subprocess\.Popen' is in Python's standard library, which a config cannot open"):
        build(cfg)
    assert not (tmp_path / "pwned").exists()


def test_a_target_typed_for_one_key_is_trusted_there_only(monkeypatch):
    """model._target_=my_pkg.Net on the command line allows my_pkg.Net as the model; the same
    target named by a config file for the loss is still refused (before this change, a typed
    target was allowed everywhere)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))  # importable, not installed
    typed = ["model._target_=runner_test_helpers.TinyNet"]
    cfg = compose_config([*TINY, *typed])
    AllowList.of(cfg, typed).check(cfg)  # the model: trusted
    _with(cfg, "loss", {"_target_": "runner_test_helpers.TinyNet"})
    with pytest.raises(ConfigError, match=r"loss\._target_='runner_test_helpers\.TinyNet': package 'runner_test_helpers' is not installed, and not on the allow-list; .*allowed_targets=\[runner_test_helpers\.\*\]"):
        AllowList.of(cfg, typed).check(cfg)
    # allowed_targets (from a config or the command line) opens the package everywhere
    _with(cfg, "allowed_targets", ["runner_test_helpers.*"])
    AllowList.of(cfg, []).check(cfg)


@pytest.mark.parametrize(
    "entry, target, message",
    [
        ("os.*", "os.system", r"allowed_targets entry 'os\.\*' opens Python's standard library"),
        ("builtins.eval", "builtins.eval", r"allowed_targets entry 'builtins\.eval' opens Python's standard library"),
        ("*", "os.system", r"allowed_targets entry '\*' is not a package pattern"),
        (None, "torch.hub.load", r"model\._target_='torch\.hub\.load' is 'torch\.hub\.load', which can load code or write files"),
        (None, "torch.load", r"model\._target_='torch\.load' is 'torch\.serialization\.load', which can load code or write files"),
        (None, "runner.checkpoint.save", r"model\._target_='runner\.checkpoint\.save' is 'runner\.checkpoint\.save', which can load code or write files"),
    ],
)
def test_a_config_cannot_open_the_standard_library_or_torch_loaders(entry, target, message):
    cfg = compose_config(TINY)
    if entry:
        _with(cfg, "allowed_targets", [entry])
    _with(cfg, "model", {"_target_": target})
    with pytest.raises(ConfigError, match=message):
        AllowList.of(cfg, []).check(cfg)


# a package whose import, or whose classes, leave a marker: refused targets are never imported
EVIL_PACKAGE = """
import logging, pathlib
pathlib.Path("imported").write_text("evil_pkg was imported")
class Net:
    def __init__(self, *args, **kwargs):
        pathlib.Path("pwned").write_text("x")
class Callback:
    def __init__(self, *args, **kwargs):
        pathlib.Path("pwned").write_text("x")
class Handler(logging.Handler):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pathlib.Path("pwned").write_text("x")
"""

HOSTILE = {
    "os.system": ("model/evil.yaml", "_target_: os.system\ncommand: touch pwned\n", ["model=evil"], 2,
                  r"runner: error: model\._target_='os\.system' is in Python's standard library, which a config cannot open"),
    "nested Popen": ("loss/evil.yaml", "_target_: runner.losses.DistillationLoss\nalpha: 0.0\nteacher:\n  _target_: subprocess.Popen\n  args: [touch, pwned]\n",
                     ["loss=evil"], 2, r"runner: error: loss\.teacher\._target_='subprocess\.Popen' is in Python's standard library"),
    "foreign package": ("model/foreign.yaml", "_target_: evil_pkg.Net\n", ["model=foreign"], 2,
                        r"runner: error: model\._target_='evil_pkg\.Net': package 'evil_pkg' is not installed, and not on the allow-list; .*allowed_targets=\[evil_pkg\.\*\]"),
    "hydra callback": ("experiment/evil.yaml", "# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: evil_pkg.Callback\n",
                       ["experiment=evil"], 1, r"Target 'evil_pkg\.Callback' is not in the Hydra execution whitelist(.|\n)*full_key: hydra\.callbacks\.evil"),
    "hydra callback os.system": ("experiment/evil.yaml", "# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: os.system\n      command: touch pwned\n",
                                 ["experiment=evil"], 1, r"Target 'os\.system' cannot be authorized by the\s+Hydra execution whitelist(.|\n)*full_key: hydra\.callbacks\.evil"),
    "logging handler": ("experiment/evil.yaml", "# @package _global_\nhydra:\n  job_logging:\n    handlers:\n      evil:\n        class: evil_pkg.Handler\n    root:\n      handlers: [console, file, evil]\n",
                        ["experiment=evil"], 1, r"Logging target 'evil_pkg\.Handler' is not in the Hydra execution whitelist"),
    "logging to the network": ("experiment/evil.yaml", "# @package _global_\nhydra:\n  job_logging:\n    handlers:\n      evil:\n        class: logging.handlers.SocketHandler\n        host: 203.0.113.1\n        port: 9\n    root:\n      handlers: [console, file, evil]\n",
                               ["experiment=evil"], 1, r"Logging target 'logging\.handlers\.SocketHandler' is not in the Hydra execution whitelist"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE), ids=str)
def test_a_hostile_config_dir_is_refused_before_anything_runs(tmp_path, name):
    file, text, args, code, message = HOSTILE[name]
    (tmp_path / "evil_pkg").mkdir()
    (tmp_path / "evil_pkg" / "__init__.py").write_text(EVIL_PACKAGE)  # importable: the launch directory is on sys.path
    (tmp_path / "my_conf" / file).parent.mkdir(parents=True)
    (tmp_path / "my_conf" / file).write_text(text)
    result = run_cli(["--config-dir", "my_conf", *args, *SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, timeout=120)
    assert result.returncode == code, result.stderr
    assert re.search(message, result.stderr), result.stderr
    if code == 2:  # runner's own refusal: one line, no traceback
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "imported").exists()  # refused by name, never imported
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------- a target is judged by what it is
def _payload(tmp_path: Path) -> str:
    """A pickle that creates tmp_path/pwned when loaded with weights_only=False."""
    torch.save({"x": _Evil(tmp_path / "pwned")}, tmp_path / "payload.pt")
    return str(tmp_path / "payload.pt")


def _git_repo(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"], check=True)


ESCAPES = {
    # 1: torch.load reached through another module's namespace, with a pickle that runs code
    "torch.load alias": (
        lambda tmp: f"_target_: torch.functional.torch.load\nf: {_payload(tmp)}\nweights_only: false\n", "model",
        r"model\._target_='torch\.functional\.torch\.load' is 'torch\.serialization\.load', which can load code or write files",
        "pwned"),
    # 2: a torch function that runs a shell command
    "collect_env.run": (
        lambda tmp: f"_target_: torch.utils.collect_env.run\n_args_: ['touch {tmp / 'pwned'}']\n", "model",
        r"model\._target_='torch\.utils\.collect_env\.run' is 'torch\.utils\.collect_env\.run', which can load code",
        "pwned"),
    # 3: git configured through the environment runs a command from core.fsmonitor
    "git env_set": (
        lambda tmp: ("# @package _global_\nhydra:\n  job:\n    env_set:\n      GIT_CONFIG_COUNT: '1'\n"
                     f"      GIT_CONFIG_KEY_0: core.fsmonitor\n      GIT_CONFIG_VALUE_0: 'touch {tmp / 'pwned'}; false'\n"), "experiment",
        r"hydra\.job\.env_set\.GIT_CONFIG_COUNT is set by a config file, and GIT_CONFIG_COUNT is not a variable runner lets a config set",
        "pwned"),
    # 4: Hydra's permitted FileHandler appending attacker lines to any file
    "log file anywhere": (
        lambda tmp: ("# @package _global_\nhydra:\n  job_logging:\n    formatters:\n      evil:\n        format: 'touch pwned # %(message)s'\n"
                     f"    handlers:\n      evil:\n        class: logging.FileHandler\n        filename: {tmp / 'bashrc'}\n        mode: a\n"
                     "        formatter: evil\n    root:\n      handlers: [console, file, evil]\n"), "experiment",
        r"hydra\.job_logging\.handlers\.evil\.filename='.*bashrc' writes outside the job's output directory",
        "bashrc"),
    # 5: functions and classes that write files where a config says
    "confusion_matrix_png": (
        lambda tmp: (f"# @package _global_\ncallbacks:\n  evil:\n    _target_: runner.plots.confusion_matrix_png\n"
                     f"    matrix: [[1]]\n    class_names: [a]\n    path: {tmp / 'written.png'}\n"), "experiment",
        r"callbacks\.evil\._target_='runner\.plots\.confusion_matrix_png' is 'runner\.plots\.confusion_matrix_png', which can load code or write files",
        "written.png"),
    "SummaryWriter": (
        lambda tmp: f"# @package _global_\ncallbacks:\n  evil:\n    _target_: torch.utils.tensorboard.SummaryWriter\n    log_dir: {tmp / 'tbdir'}\n",
        "experiment",
        r"callbacks\.evil\._target_='torch\.utils\.tensorboard\.SummaryWriter' is 'torch\.utils\.tensorboard\.writer\.SummaryWriter', which can load code",
        "tbdir"),
    "curves outside": (
        lambda tmp: f"# @package _global_\ncallbacks:\n  pictures:\n    _target_: runner.callbacks.TrainingCurves\n    filename: {tmp / 'curves.png'}\n", "experiment",
        r"callbacks\.curves\.filename='.*curves\.png' would write outside the job's output directory", "curves.png"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ESCAPES), ids=str)
def test_a_config_file_cannot_escape_through_torch_git_logging_or_writers(tmp_path, name):
    """The five ways a config file from elsewhere ran code or wrote files (issue 14): each
    payload would create its marker; each is refused before training, in one line, exit 2."""
    make, group, message, marker = ESCAPES[name]
    _git_repo(tmp_path)
    (tmp_path / "my_conf" / group).mkdir(parents=True)
    (tmp_path / "my_conf" / group / "evil.yaml").write_text(make(tmp_path))
    result = run_cli(["--config-dir", "my_conf", f"{group}=evil", *SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert re.search("runner: error: " + message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / marker).exists()
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_target_behind_an_interpolation_is_judged_as_what_it_resolves_to(tmp_path):
    """A loss's teacher pointing at another node (${...}) is judged as the config it resolves to."""
    cfg = compose_config([*TINY, "loss=distillation", "loss.teacher_checkpoint=nowhere.pt"])
    _with(cfg, "stash", {"inner": {"_target_": "torch.utils.collect_env.run", "_args_": [f"touch {tmp_path / 'pwned'}"]}})
    _with(cfg, "loss.teacher", "${stash.inner}")
    with pytest.raises(ConfigError, match=r"_target_='torch\.utils\.collect_env\.run' is 'torch\.utils\.collect_env\.run', which can load code"):
        build(cfg)
    assert not (tmp_path / "pwned").exists()
    judged = AllowList().check(OmegaConf.create({"teacher": "${model}", "model": {"_target_": "runner.models.MLP"}}), "loss")
    assert "runner.models.mlp.MLP" in judged  # the interpolated teacher, judged and whitelisted by its real name


def test_the_git_tags_ignore_what_the_environment_says(tmp_path, monkeypatch):
    """Even with GIT_* variables set (here typed by the user, so trusted), runner's git runs
    in a clean environment with fsmonitor off: the command never runs, the tags are still read."""
    from runner.tracking import _git

    _git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    for key, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.fsmonitor",
                       "GIT_CONFIG_VALUE_0": f"touch {tmp_path / 'pwned'}; false"}.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "config", "core.fsmonitor", f"touch {tmp_path / 'pwned_local'}; false"], cwd=tmp_path, check=True)
    tags = _git()
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] == "false"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned_local").exists()
    # the control: plain git with that environment does run the command
    subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True)
    assert (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_env_set_typed_on_the_command_line_is_trusted_and_git_still_runs_clean(tmp_path):
    _git_repo(tmp_path)
    store = tmp_path / "mlflow.db"
    result = run_cli([*SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{store}", "+hydra.job.env_set.GIT_CONFIG_COUNT=1",
                      "+hydra.job.env_set.GIT_CONFIG_KEY_0=core.fsmonitor", f"+hydra.job.env_set.GIT_CONFIG_VALUE_0='touch {tmp_path / 'pwned'}; false'",
                      "+hydra.job.env_set.OMP_NUM_THREADS=1"], cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "pwned").exists()
    with sqlite3.connect(store) as connection:
        tags = dict(connection.execute("SELECT key, value FROM tags"))
    assert len(tags["mlflow.source.git.commit"]) == 40


def _aliases() -> list[str]:
    """Every dangerous object reachable as <module>.<name> or <module>.<name>.<name> from the
    modules of torch and runner loaded here: torch.load/save, hub, pickle, os, subprocess."""
    import importlib
    import inspect
    import os
    import pickle

    dangerous = {torch.load, torch.save, torch.hub.load, torch.serialization.load, pickle.loads, pickle.load, os.system,
                 subprocess.run, subprocess.Popen, eval, exec, importlib.import_module}
    for name in ("runner.tracking", "runner.build", "runner.checkpoint", "runner.export", "runner.callbacks", "runner.losses",
                 "runner.data.tensors", "torch.functional", "torch.nn.functional", "torch.optim.adam", "torch.utils.data.dataloader"):
        importlib.import_module(name)
    found = set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(("runner.", "torch.nn", "torch.optim", "torch.functional", "torch.utils.data")) or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if any(value is bad for bad in dangerous):
                found.add(f"{module_name}.{attribute}")
            elif inspect.ismodule(value) and value.__name__ in ("torch", "os", "subprocess", "pickle", "builtins"):
                for inner in ("load", "save", "system", "run", "Popen", "loads", "eval", "exec"):
                    if any(getattr(value, inner, None) is bad for bad in dangerous):
                        found.add(f"{module_name}.{attribute}.{inner}")
    return sorted(found)


def test_no_alias_reaches_a_loader_or_a_command_at_any_key():
    aliases = _aliases()
    assert len(aliases) > 50, aliases  # the family is large: torch is imported everywhere
    assert "torch.functional.torch.load" in aliases
    for key in ("model._target_", "loss._target_", "loss.teacher._target_", "optimizer._target_", "scheduler._target_", "data._target_",
                "callbacks.x._target_", "augmentation._target_", "logger._target_", "hydra.sweeper.sampler._target_"):
        for alias in aliases:
            # refused as what it really is, or not reachable the way instantiate resolves a name
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='{re.escape(alias)}' (is '|is in Python's standard library|is the function|cannot be found)"):
                judge(alias, key)
    with pytest.raises(ConfigError, match=r"is 'torch\.serialization\.load', which can load code"):
        judge("torch.nn.modules.module.torch.load", "model._target_")


@pytest.mark.parametrize(
    "target, key, message",
    [
        ("torch.nn.Linear", "optimizer._target_", r"is the class 'torch\.nn\.modules\.linear\.Linear', but optimizer must be a torch\.optim\.Optimizer class"),
        ("torch.optim.Adam", "model._target_", r"is the class 'torch\.optim\.adam\.Adam', but model must be a torch\.nn\.Module class"),
        ("runner.models.CNN", "callbacks.x._target_", r"but callbacks\.x must be a runner\.callbacks\.Callback class"),
        ("runner.data.split", "data._target_", r"is the function 'runner\.data\.module\.split', but data must be a data factory returning runner\.data\.DataModule; a function builds only"),
        ("runner.losses.time_derivatives", "loss._target_", r"is the function 'runner\.losses\.time_derivatives', but loss must be a torch\.nn\.Module class"),
        ("optuna.pruners.MedianPruner", "hydra.sweeper.sampler._target_", r"but hydra\.sweeper\.sampler must be an Optuna sampler class"),
        ("torch.nn.Linearr", "model._target_", r"cannot be found: 'torch\.nn' has no 'Linearr'; check the spelling"),
        ("torch", "model._target_", r"is not a class or a function"),
    ],
)
def test_each_key_builds_its_own_kind_only(target, key, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='{re.escape(target)}'.*{message}"):
        judge(target, key)


def test_each_key_accepts_what_runner_ships():
    for target, key in [("runner.models.CNN", "model._target_"), ("torch.nn.Linear", "loss.teacher._target_"), ("torch.optim.AdamW", "optimizer._target_"),
                        ("torch.optim.lr_scheduler.ReduceLROnPlateau", "scheduler._target_"), ("runner.schedulers.PhaseLR", "scheduler._target_"),
                        ("runner.data.tensors", "data._target_"), ("runner.augment.Mixup", "augmentation.mixup._target_"),
                        ("runner.augment.GaussianNoise", "augmentation.noise_shift.transforms[0]._target_"), ("runner.callbacks.EMA", "callbacks.ema._target_"),
                        ("runner.tracking.MLflowLogger", "logger._target_"), ("optuna.samplers.TPESampler", "hydra.sweeper.sampler._target_"),
                        ("optuna.pruners.MedianPruner", "pruner._target_")]:
        assert judge(target, key).obj is not None


USER_PACKAGE = """
from torch import nn

class MyNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        size = 1
        for dim in input_shape:
            size *= dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))

    def forward(self, x):
        return self.net(x)

def make_net(input_shape, num_classes) -> nn.Module:
    return MyNet(input_shape, num_classes)

def make_anything(input_shape, num_classes):
    return MyNet(input_shape, num_classes)
"""


def _installed_package(root: Path) -> Path:
    """my_pkg installed into a folder on sys.path, with its distribution metadata, as pip would."""
    site = root / "site"
    (site / "my_pkg").mkdir(parents=True)
    (site / "my_pkg" / "__init__.py").write_text(USER_PACKAGE)
    info = site / "my_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_pkg\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("my_pkg\n")
    (info / "RECORD").write_text("my_pkg/__init__.py,,\n")
    return site


def test_a_users_installed_class_builds_without_allowed_targets(tmp_path, monkeypatch):
    from runner import targets

    monkeypatch.syspath_prepend(str(_installed_package(tmp_path)))
    targets._installed.cache_clear(), targets._top_level_modules.cache_clear()
    try:
        assert judge("my_pkg.MyNet", "model._target_").real_name == "my_pkg.MyNet"
        assert judge("my_pkg.make_net", "model._target_").real_name == "my_pkg.make_net"  # annotated: -> nn.Module
        with pytest.raises(ConfigError, match=r"is the function 'my_pkg\.make_anything', but model must be a torch\.nn\.Module class; a function builds only"):
            judge("my_pkg.make_anything", "model._target_")
        with pytest.raises(ConfigError, match=r"is the class 'my_pkg\.MyNet', but optimizer must be a torch\.optim\.Optimizer class"):
            judge("my_pkg.MyNet", "optimizer._target_")
    finally:
        targets._installed.cache_clear(), targets._top_level_modules.cache_clear()


def test_a_users_factory_builds_the_class_it_returns(tmp_path, monkeypatch):
    """Hydra checks the object a factory returns (my_pkg.MyNet) against its whitelist too: the
    factory's own package is on it, so an annotated factory builds, not only passes the judge."""
    from runner import targets
    from runner.build import AllowList, _make

    monkeypatch.syspath_prepend(str(_installed_package(tmp_path)))
    targets._installed.cache_clear(), targets._top_level_modules.cache_clear()
    try:
        node = OmegaConf.create({"_target_": "my_pkg.make_net", "input_shape": [4], "num_classes": 3})
        model = _make(node, "model", AllowList())
        assert type(model).__module__ == "my_pkg" and type(model).__name__ == "MyNet"
        assert model(torch.rand(2, 4)).shape == (2, 3)
    finally:
        targets._installed.cache_clear(), targets._top_level_modules.cache_clear()


@pytest.mark.slow
def test_a_users_installed_model_trains_from_their_config_file(tmp_path):
    site = _installed_package(tmp_path)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text(
        "_target_: my_pkg.MyNet\ninput_shape: ${data.input_shape}\nnum_classes: ${data.num_classes}\n")
    from tests.conftest import HELPERS

    result = run_cli(["--config-dir", "my_conf", "model=mine", *SMALL_DATA, *FAST, "logger=none"], cwd=tmp_path, timeout=180,
                     env={"PYTHONPATH": f"{site}{os.pathsep}{HELPERS}"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "checkpoints" / "best.pt").is_file()


def test_log_handlers_must_write_inside_the_output_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = {"handlers": {"file": {"class": "logging.FileHandler", "filename": str(tmp_path / "out" / "runner.log")}, "console": {"class": "logging.StreamHandler"}}}
    check_log_files(inside, str(tmp_path / "out"))
    for filename in ("/etc/profile.d/x.sh", "../x.log", "x.log", str(tmp_path / "out" / ".." / "x.log"), "~/.bashrc"):
        with pytest.raises(ConfigError, match=r"hydra\.job_logging\.handlers\.file\.filename='.*' writes outside the job's output directory"):
            check_log_files({"handlers": {"file": {"class": "logging.FileHandler", "filename": filename}}}, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="writes outside a job's output directory"):  # no job yet: no file at all
        check_log_files(inside, None)


def test_env_set_allows_only_what_runner_needs_unless_typed():
    check_env_set({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"}, [])
    for name in ("GIT_CONFIG_COUNT", "LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "PATH", "HOME", "CC", "NCCL_NET_PLUGIN", "BASH_ENV"):
        with pytest.raises(ConfigError, match=rf"^hydra\.job\.env_set\.{name} is set by a config file, and {name} is not a variable runner lets a config set"):
            check_env_set({name: "x"}, [])
    check_env_set({"LD_PRELOAD": "x"}, ["+hydra.job.env_set.LD_PRELOAD=x"])  # typed by the user: theirs


@pytest.mark.parametrize("value", ["/tmp/x.png", "../x.png", "a/../../x.png", "~/x.png", ""])
def test_paths_runner_writes_for_a_config_stay_in_the_output_directory(value):
    from runner.callbacks import TrainingCurves

    with pytest.raises(ConfigError, match=r"callbacks\.curves\.filename='.*' would write outside the job's output directory"):
        TrainingCurves(filename=value)
    assert str(TrainingCurves(filename="plots/curves.png").filename) == "plots/curves.png"

# ---------------------------------------------------------------- servers: loopback only
def test_the_free_port_probe_binds_the_loopback_interface(monkeypatch):
    bound = []
    real_bind = socket.socket.bind

    def spy(sock, address):
        bound.append(address)
        return real_bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", spy)
    distributed._free_port()
    assert [address[0] for address in bound] == ["127.0.0.1"]


LISTENING = """
import os
from runner import distributed
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "GLOO_SOCKET_IFNAME"):
    os.environ.pop(name, None)
info = distributed.setup("ddp", False)
import torch, torch.distributed as dist
value = torch.ones(1)
dist.all_reduce(value)
assert info.world_size == 1 and value.item() == 1.0
sockets = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("socket:["):
        sockets.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[9] in sockets and fields[3] == "0A":  # LISTEN
            print(fields[1].split(":")[0])
dist.destroy_process_group()
"""
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net shows them


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net (Linux)")
def test_a_standalone_ddp_run_listens_on_loopback_only(tmp_path):
    """trainer=ddp without torchrun or Slurm: no rendezvous server on every interface (the
    TCP store env:// starts binds to all of them), gloo's socket on the loopback interface."""
    result = subprocess.run([sys.executable, "-c", LISTENING], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    addresses = result.stdout.split()
    assert set(addresses) <= LOOPBACK, addresses


# ---------------------------------------------------------------- secrets never reach MLflow
def test_secret_keys_and_url_passwords_are_masked():
    config = {
        "data": {"api_token": "abc123", "tokenizer": "bpe", "max_tokens": 5, "path": "x.npz"},
        "logger": {"tracking_uri": "https://bob:s3cr3t@mlflow.example.com", "extra_password": "hunter2", "password": None},
        "service": {"apiKey": "k-123", "client_secret": "shh!", "credentials": {"user": "bob", "pass": "pw1"}, "AWS_ACCESS_KEY": "AKIA1"},
    }
    masked = mask_secrets(config)
    assert masked["data"] == {"api_token": "***", "tokenizer": "bpe", "max_tokens": 5, "path": "x.npz"}
    assert masked["logger"] == {"tracking_uri": "https://bob:***@mlflow.example.com", "extra_password": "***", "password": None}
    assert masked["service"] == {"apiKey": "***", "client_secret": "***", "credentials": "***", "AWS_ACCESS_KEY": "***"}
    assert mask_override("+data.api_token=abc123") == "+data.api_token=***"
    assert mask_override("logger.tracking_uri=http://u:pw@h:5000") == "logger.tracking_uri=http://u:***@h:5000"
    assert mask_override("model=mlp") == "model=mlp"
    assert mask_url("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    secrets = secret_values(config)
    assert {"abc123", "s3cr3t", "hunter2", "k-123", "shh!", "bob", "pw1", "AKIA1"} <= set(secrets)
    assert "bpe" not in secrets
    assert redact("token abc123 and hunter2", secrets) == "token *** and ***"


def test_a_tracking_uri_with_a_password_is_masked_in_messages():
    from runner.tracking import connect

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError) as error:
        connect(f"http://bob:s3cr3tpw@127.0.0.1:{port}", "runner")
    assert f"logger.tracking_uri='http://bob:***@127.0.0.1:{port}' is unreachable" in str(error.value)
    assert "s3cr3tpw" not in str(error.value)


@pytest.mark.parametrize("key, secret", [
    ("authorization", True), ("headers.Authorization", True), ("ssh_passphrase", True),
    ("pat", True), ("github_pat", True), ("githubPat", True), ("path", False), ("patience", False), ("pattern", False),
    ("webhook", True), ("webhook_url", True), ("slackWebhookUrl", True), ("dsn", True), ("sentry_dsn", True),
    ("cookie", True), ("auth_cookies", True), ("cookie_name", False), ("session", True), ("session_id", True),
    ("session_length", False), ("pat_expiry_days", False), ("compatibility", False), ("dsn_timeout", False),
])
def test_more_key_words_name_a_secret(key, secret):
    """pat, dsn, cookie and session count as the name's last word only; the others anywhere."""
    assert is_secret_key(key) is secret
    assert (mask_secrets({key: "value1"})[key] == "***") is secret


def test_credentials_inside_values_are_masked_whatever_the_key():
    config = {
        "headers": {"extra": "Bearer eyJhbGciOi.eyJzdWIi.SflKxwRJ"},
        "notify": {
            "query": "https://api.example.com/v1/send?channel=ml&token=tok-9f8e7d&x=1",
            "google": "https://maps.googleapis.com/maps/api?key=AIzaSyZZZ&q=berlin",
            "signed": "https://h.example.com/f?a=1&api_key=ak-5566#top",
            "slack": "https://hooks.slack.com/services/T0001/B0002/slacksecret77",
            "discord": "https://discord.com/api/webhooks/1234/discordsecret88",
            "generic": "https://ci.example.com/hooks/hooksecret99?ref=main",
        },
        "keep": {"uri": "sqlite:////tmp/hooks/mlflow.db", "page": "https://example.com/docs?page=2", "word": "bearer of news"},
    }
    masked = mask_secrets(config)
    assert masked["headers"]["extra"] == "Bearer ***"
    assert masked["notify"] == {
        "query": "https://api.example.com/v1/send?channel=ml&token=***&x=1",
        "google": "https://maps.googleapis.com/maps/api?key=***&q=berlin",
        "signed": "https://h.example.com/f?a=1&api_key=***#top",
        "slack": "https://hooks.slack.com/***",
        "discord": "https://discord.com/api/webhooks/***",
        "generic": "https://ci.example.com/hooks/***?ref=main",
    }
    assert masked["keep"] == config["keep"]
    assert mask_override("+notify.url=https://discord.com/api/webhooks/1234/discordsecret88") == "+notify.url=https://discord.com/api/webhooks/***"
    assert mask_url("curl -H 'Authorization: Bearer abcdefgh12345' https://x.io/a?sig=s1g") == "curl -H 'Authorization: Bearer ***' https://x.io/a?sig=***"
    secrets = secret_values(config)
    for secret in ("eyJhbGciOi.eyJzdWIi.SflKxwRJ", "tok-9f8e7d", "AIzaSyZZZ", "ak-5566", "services/T0001/B0002/slacksecret77", "1234/discordsecret88", "hooksecret99"):
        assert secret in secrets
    assert "berlin" not in secrets and "2" not in secrets
    log = "posting to https://discord.com/api/webhooks/1234/discordsecret88 with Bearer eyJhbGciOi.eyJzdWIi.SflKxwRJ"
    assert "discordsecret88" not in redact(log, secrets) and "SflKxwRJ" not in redact(log, secrets)


def test_values_read_by_oc_env_are_secrets(monkeypatch):
    monkeypatch.setattr(schema, "_env_keys", set())
    monkeypatch.setattr(schema, "_env_values", set())
    monkeypatch.setenv("RUNNER_TEST_TOKENLESS", "plain-but-private-42")
    monkeypatch.setenv("RUNNER_TEST_SHORT", "7")
    cfg = OmegaConf.create({
        "notify": {"note": "${oc.env:RUNNER_TEST_TOKENLESS}", "retries": "${oc.env:RUNNER_TEST_SHORT}", "fallback": "${oc.env:RUNNER_TEST_UNSET,default-ok}"},
        "data": {"path": "/data/${oc.env:RUNNER_TEST_TOKENLESS}/x.npz", "copy": "${notify.note}"},
        "trainer": {"max_epochs": 7},
        "items": ["${oc.env:RUNNER_TEST_SHORT}", 7],
    })
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert "plain-but-private-42" in secret_values(raw)  # an unresolved config (a sweep's) names the variable
    remember_env_values(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    masked = mask_secrets(resolved)
    # at its key, whatever its length (a default in its place too); its text wherever it
    # appears (an interpolation's copy too)
    assert masked["notify"] == {"note": "***", "retries": "***", "fallback": "***"}
    assert masked["data"] == {"path": "***", "copy": "***"}
    assert mask_secrets({"elsewhere": "/data/plain-but-private-42/x.npz"}) == {"elsewhere": "/data/***/x.npz"}
    assert masked["trainer"] == {"max_epochs": 7} and masked["items"] == ["***", 7]  # another 7 is not the variable
    secrets = secret_values(resolved)
    assert "plain-but-private-42" in secrets and "default-ok" not in secrets
    assert redact("sent plain-but-private-42 once", secrets) == "sent *** once"
    assert mask_override("+notify.note=plain-but-private-42") == "+notify.note=***"


WEBHOOK = """
from runner.callbacks import Callback

class Webhook(Callback):
    \"\"\"A user's callback that would post to a service: it needs credentials.\"\"\"

    def __init__(self, url: str, api_token: str, password: str, note: str = "", header: str = "", hook: str = ""):
        self.url = url
"""
# typed secrets, one read by ${oc.env:...}, and credentials inside values under harmless keys
SECRETS = ("abc123token", "hunter2pw", "s3cr3tpw", "fromtheenv-5150", "bearertok-8086", "hooktoken-6502")
ENV_SECRET = "RUNNER_TEST_NOTE"


@pytest.mark.slow
def test_a_real_run_sends_no_secret_to_mlflow(tmp_path):
    (tmp_path / "secret_helper.py").write_text(WEBHOOK)
    store = tmp_path / "mlflow.db"
    result = run_cli(
        [
            *SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{store}",
            "+callbacks.notify._target_=secret_helper.Webhook",
            f"+callbacks.notify.api_token={SECRETS[0]}",
            f"+callbacks.notify.password={SECRETS[1]}",
            f"+callbacks.notify.url=https://bob:{SECRETS[2]}@hooks.example.com/x",
            f"+callbacks.notify.note=${{oc.env:{ENV_SECRET}}}",
            f"+callbacks.notify.header='Bearer {SECRETS[4]}'",
            f"+callbacks.notify.hook=https://discord.com/api/webhooks/42/{SECRETS[5]}",
        ],
        cwd=tmp_path, timeout=180, env={ENV_SECRET: SECRETS[3]},
    )
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(store) as connection:
        params = dict(connection.execute("SELECT key, value FROM params"))
        tags = dict(connection.execute("SELECT key, value FROM tags"))
        statuses = [status for (status,) in connection.execute("SELECT status FROM runs")]
    assert statuses == ["FINISHED"]
    assert params["callbacks.notify.api_token"] == "***"
    assert params["callbacks.notify.password"] == "***"
    assert params["callbacks.notify.url"] == "https://bob:***@hooks.example.com/***"
    assert params["callbacks.notify.note"] == "***"
    assert params["callbacks.notify.header"] == "Bearer ***"
    assert params["callbacks.notify.hook"] == "https://discord.com/api/webhooks/***"
    assert "+callbacks.notify.api_token=***" in tags["overrides"]
    # nowhere in the store, nor in any artifact (the .hydra files, the log, best.pt), nor the output
    uploaded = [store, *(path for path in (tmp_path / "mlruns").rglob("*") if path.is_file())]
    assert any(path.name == "config.yaml" for path in uploaded) and any(path.name == "best.pt" for path in uploaded)
    for path in uploaded:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, (secret, path)
    for secret in SECRETS:
        assert secret not in result.stdout and secret not in (tmp_path / "out" / "runner.log").read_text()
    # the output directory keeps what Hydra wrote (documented in the README): typed values as
    # typed, and ${oc.env:...} as the reference, never its value
    hydra_config = (tmp_path / "out" / ".hydra" / "config.yaml").read_text()
    assert SECRETS[0] in hydra_config and f"${{oc.env:{ENV_SECRET}}}" in hydra_config and SECRETS[3] not in hydra_config
    # the checkpoint on disk holds the resolved config (a resume compares it)
    assert torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["config"]["callbacks"]["notify"]["note"] == SECRETS[3]
