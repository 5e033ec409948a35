"""Security: no code runs from a checkpoint, a config file cannot build what the allow-list
does not name, what runner listens on is the loopback interface, and secrets never reach
MLflow. Each refusal is checked with a marker file the hostile input would create."""

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
from runner.checkpoint import CheckpointError, find_resume, load
from runner.errors import ConfigError
from runner.losses import DistillationLoss
from runner.schema import mask_override, mask_secrets, mask_url, redact, secret_values
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
    with pytest.raises(ConfigError, match=r"loss\.teacher\._target_='subprocess\.Popen' is not on the allow-list"):
        build(cfg)
    assert not (tmp_path / "pwned").exists()


def test_a_target_typed_for_one_key_is_trusted_there_only():
    """model._target_=my_pkg.Net on the command line allows my_pkg.Net as the model; the same
    target named by a config file for the loss is still refused (before this change, a typed
    target was allowed everywhere)."""
    typed = ["model._target_=runner_test_helpers.TinyNet"]
    cfg = compose_config([*TINY, *typed])
    AllowList.of(cfg, typed).check(cfg)  # the model: trusted
    _with(cfg, "loss", {"_target_": "runner_test_helpers.TinyNet"})
    with pytest.raises(ConfigError, match=r"loss\._target_='runner_test_helpers\.TinyNet' is not on the allow-list .*allowed_targets=\[runner_test_helpers\.\*\]"):
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
        (None, "torch.hub.load", r"model\._target_='torch\.hub\.load' can load code or write files"),
        (None, "torch.load", r"model\._target_='torch\.load' can load code or write files"),
        (None, "runner.checkpoint.save", r"model\._target_='runner\.checkpoint\.save' can load code or write files"),
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
                  r"runner: error: model\._target_='os\.system' is not on the allow-list .*standard library"),
    "nested Popen": ("loss/evil.yaml", "_target_: runner.losses.DistillationLoss\nalpha: 0.0\nteacher:\n  _target_: subprocess.Popen\n  args: [touch, pwned]\n",
                     ["loss=evil"], 2, r"runner: error: loss\.teacher\._target_='subprocess\.Popen' is not on the allow-list"),
    "foreign package": ("model/foreign.yaml", "_target_: evil_pkg.Net\n", ["model=foreign"], 2,
                        r"runner: error: model\._target_='evil_pkg\.Net' is not on the allow-list .*allowed_targets=\[evil_pkg\.\*\]"),
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


WEBHOOK = """
from runner.callbacks import Callback

class Webhook(Callback):
    \"\"\"A user's callback that would post to a service: it needs credentials.\"\"\"

    def __init__(self, url: str, api_token: str, password: str):
        self.url = url
"""
SECRETS = ("abc123token", "hunter2pw", "s3cr3tpw")


@pytest.mark.slow
def test_a_real_run_sends_no_secret_to_mlflow(tmp_path):
    (tmp_path / "secret_helper.py").write_text(WEBHOOK)
    store = tmp_path / "mlflow.db"
    result = run_cli(
        [
            *SMALL_DATA, *FAST, f"logger.tracking_uri=sqlite:///{store}",
            "+callbacks.webhook._target_=secret_helper.Webhook",
            f"+callbacks.webhook.api_token={SECRETS[0]}",
            f"+callbacks.webhook.password={SECRETS[1]}",
            f"+callbacks.webhook.url=https://bob:{SECRETS[2]}@hooks.example.com/x",
        ],
        cwd=tmp_path, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(store) as connection:
        params = dict(connection.execute("SELECT key, value FROM params"))
        tags = dict(connection.execute("SELECT key, value FROM tags"))
        statuses = [status for (status,) in connection.execute("SELECT status FROM runs")]
    assert statuses == ["FINISHED"]
    assert params["callbacks.webhook.api_token"] == "***"
    assert params["callbacks.webhook.password"] == "***"
    assert params["callbacks.webhook.url"] == "https://bob:***@hooks.example.com/x"
    assert "+callbacks.webhook.api_token=***" in tags["overrides"]
    # nowhere in the store, nor in any artifact (the .hydra files, the log, best.pt), nor the output
    uploaded = [store, *(path for path in (tmp_path / "mlruns").rglob("*") if path.is_file())]
    assert any(path.name == "config.yaml" for path in uploaded) and any(path.name == "best.pt" for path in uploaded)
    for path in uploaded:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, (secret, path)
    for secret in SECRETS:
        assert secret not in result.stdout and secret not in (tmp_path / "out" / "runner.log").read_text()
    # the output directory keeps what Hydra wrote (documented in the README)
    assert SECRETS[0] in (tmp_path / "out" / ".hydra" / "config.yaml").read_text()
