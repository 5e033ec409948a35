"""Shared fixtures: compose the real config with tiny overrides, run the CLI as a user would."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import runner.schema  # noqa: F401  (registers the schema, as __main__ does)

pytest_plugins = ["tests.slurm_cluster"]  # the slurm_cluster fixture: a real single-node Slurm

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"

# tiny, fast and quiet: CPU, small synthetic data, two short epochs
TINY = [
    "data=synthetic",
    "data.num_samples=256",
    "trainer.device=cpu",
    "trainer.max_epochs=2",
    "logger=none",
]


@pytest.fixture(autouse=True)
def _private_temp(tmp_path, monkeypatch):
    # torch, matplotlib and friends write to $TMPDIR and ~/.cache: keep them in the test's dir
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # runner.tracking.connect hands a URI's user:password to MLflow through these two: set
    # first so that monkeypatch undoes what a test's in-process connect() leaves behind
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def compose_config(overrides=(), return_hydra_config=False):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="runner.conf"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def cfg():
    """The real config with TINY overrides; call it with more overrides."""
    return lambda *overrides: compose_config([*TINY, *overrides])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, admin_password: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port, in its own session (so a test may kill
    its whole process group); returns the process and its URI once /health answers.

    With admin_password, MLflow's basic-auth app (mlflow[auth], Flask-WTF) guards every API
    call: only the user "admin" with that password (12 characters at least) gets in."""
    port = free_port()
    environment = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    auth = []
    if admin_password is not None:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        environment.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password, MLFLOW_FLASK_SERVER_SECRET_KEY="runner-tests"
        )
        auth = ["--app-name", "basic-auth"]
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *auth,
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
        ],
        cwd=root, env=environment, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    return server, uri
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(server)
            raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
        time.sleep(0.3)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    """Kill the server and its workers (its process group)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`, started once for the session and stopped at its end."""
    server, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_mlflow_server(server)


def training_state(run_dir: Path) -> tuple[dict, dict]:
    """(last.pt payload, metrics.json) of a finished run: what assert_same_training_state compares."""
    return (torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True),
            json.loads((run_dir / "metrics.json").read_text()))


def assert_same_training_state(straight, resumed, step: int) -> None:
    """Two (last.pt payload, metrics.json) pairs are bit-identical: the step, every weight,
    every optimizer state tensor (Adam's moments and step) and the final metrics."""
    (last_a, metrics_a), (last_b, metrics_b) = straight, resumed
    assert last_a["state"]["step"] == last_b["state"]["step"] == step
    assert last_a["model"].keys() == last_b["model"].keys()
    for key in last_a["model"]:
        assert torch.equal(last_a["model"][key], last_b["model"][key]), key
    optimizer_a, optimizer_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert optimizer_a.keys() == optimizer_b.keys()
    for index in optimizer_a:
        for key in optimizer_a[index]:
            assert torch.equal(optimizer_a[index][key], optimizer_b[index][key]), (index, key)
    assert metrics_a == metrics_b


def run_cli(args, cwd, timeout=300, env=None, executable=None):
    """Run `python -m runner ARGS` in a subprocess, as a user would."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(HELPERS), environment.get("PYTHONPATH", "")])
    environment.update(env or {})
    command = executable or [sys.executable, "-m", "runner"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
