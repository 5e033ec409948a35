"""The first ten minutes (issue #16): what a new user's first runs print and leave behind.

- a normal run prints progress, then the summary last, fitted to the terminal, its paths and
  URLs whole; no library warning reaches the terminal, and a base install (no onnx) exports
  what it can without a warning;
- train() twice in one process prints the same both times;
- runner.log holds the same lines whether stdout is a terminal or a pipe;
- a run refused by a check leaves no output directory; one that had begun keeps it, with the
  error in its log;
- the README's own-model example runs as written, and a model config that does not fit the
  class names every key in one message.
"""

import logging
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from runner.errors import ConfigError
from tests.conftest import HELPERS, ROOT, run_cli

QUICK = ["debug=fast", "trainer.device=cpu"]
# a default run with debug=fast's sizes, its export and logger left on
DEFAULT_SHORT = ["trainer.device=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2"]
README = (ROOT / "README.md").read_text()


def _without_onnx(*args: str) -> list[str]:
    """`python -m runner ARGS` in a process where onnx and onnxscript cannot be imported: a base
    install, without the runner[export] extra."""
    code = (
        "import runpy, sys\n"
        "for name in ('onnx', 'onnxscript', 'onnxruntime'):\n    sys.modules[name] = None\n"
        f"sys.argv = ['runner', *{list(args)!r}]\n"
        "runpy.run_module('runner', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- what a run prints
@pytest.mark.slow
def test_a_run_prints_progress_then_the_summary_last_with_whole_paths_and_no_warnings(tmp_path):
    result = run_cli([], cwd=tmp_path, env={"COLUMNS": "80"},
                     executable=_without_onnx(*DEFAULT_SHORT, "~callbacks.drift", "hydra.run.dir=out"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    # a base install exports TorchScript and says nothing about the ONNX it was not asked for
    assert (out / "export" / "model.pt").is_file() and not (out / "export" / "model.onnx").exists()
    assert "onnx" not in result.stdout.lower() and "onnx" not in result.stderr.lower()
    assert "warning" not in result.stderr.lower(), result.stderr
    # the new sqlite store is announced once, in runner.log, not by MLflow and alembic on stderr
    assert "Creating initial" not in result.stderr + result.stdout and "SQLiteImpl" not in result.stderr + result.stdout
    assert "created the MLflow store sqlite:///" in (tmp_path / "out" / "runner.log").read_text()
    assert "[WARNING]" not in result.stdout, result.stdout

    lines = result.stdout.rstrip("\n").splitlines()
    title = next(i for i, line in enumerate(lines) if "final metrics" in line)
    assert any("epoch 1  step 2" in line for line in lines[:title])  # progress first
    summary = lines[title:]
    assert not [line for line in summary if "[runner]" in line]  # nothing logged after it
    table = [line for line in summary if line.startswith(tuple("┏┃┡│├└"))]
    assert table and all(len(line) <= 80 for line in table)  # the table fits 80 columns
    # then the paths and the run, one per line and whole, the last lines printed
    best = str(out / "checkpoints" / "best.pt")
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert any(re.fullmatch(rf"best checkpoint +{re.escape(best)}", line) for line in summary)
    assert any(line.endswith(f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}") for line in summary)
    assert summary[-1].endswith(run_id)


NOISY = """
import logging
import warnings

from runner.callbacks import Callback


class Noisy(Callback):
    \"\"\"Says what libraries say during a run: a Python warning and a line on its own logger.\"\"\"

    def on_fit_start(self, loop):
        warnings.warn("the old API is deprecated", FutureWarning)
        logging.getLogger("some_library").warning("cache rebuilt")
"""


@pytest.mark.slow
def test_what_libraries_say_goes_to_the_log_file_not_the_terminal(tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    args = [*QUICK, "callbacks.profiler.trace_steps=1", "callbacks.profiler.wait=0", "+callbacks.noisy._target_=noisy.Noisy"]
    result = run_cli(["callbacks=[default,profiler]", *args, "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    for text in ("deprecated", "cache rebuilt", "USDT", "profiler_start", "gpuGetDeviceCount"):
        assert text not in shown, text  # kineto's own lines are off; the rest is in the log
    log = (tmp_path / "out" / "runner.log").read_text()
    assert "FutureWarning: the old API is deprecated" in log and "[some_library][WARNING] - cache rebuilt" in log
    assert list((tmp_path / "out" / "profiler").glob("trace_rank0_*.json"))


# ------------------------------------------------------------------------------ train() twice
TWICE = """
import re, sys
from runner import train
for call in range(2):
    print(f"=== call {call}", flush=True)
    print(f"=== call {call}", file=sys.stderr, flush=True)
    train([*sys.argv[1:], f"hydra.run.dir=out{call}"])
"""


def _calls(text: str) -> list[str]:
    """The output of each call, with what differs by right (run ids, directories, times) masked."""
    text = re.sub(r"models:/m-[0-9a-f]+", "models:/<id>", text)
    text = re.sub(r"[0-9a-f]{32}", "<id>", text)
    text = re.sub(r"out[01]", "out<n>", text)
    text = re.sub(r"\d+\.\d+ s\b", "<t> s", text)
    return re.split(r"=== call \d\n", text)[1:]


@pytest.mark.slow
def test_train_twice_in_one_process_prints_the_same_both_times(tmp_path):
    """The second call once printed every line twice, the second time in the root logger's
    format: importing mlflow.pytorch (to log the first call's model) calls basicConfig."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # the store exists before both calls
    args = [*DEFAULT_SHORT, "model=mlp", "callbacks.export.formats=[torchscript]", "~callbacks.drift"]
    done = subprocess.run([sys.executable, "-c", TWICE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="80"))
    assert done.returncode == 0, done.stderr
    first, second = _calls(done.stdout)
    assert first == second
    assert "MLflow model models:/<id>\n" in first and first.count("epoch 1  step 2") == 1
    assert _calls(done.stderr) == ["", ""]


# ---------------------------------------------------------------------- runner.log, tty or not
def _run_in_a_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """`python -m runner ARGS` with stdin, stdout and stderr on a pseudo-terminal."""
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                               stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
    finally:
        os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def _log_lines(path: Path) -> list[str]:
    """runner's lines in runner.log without what differs by right between two runs: times and
    the directory (a library's one-time line, such as matplotlib building its font cache on
    the first run, is not runner's)."""
    text = path.read_text().replace(str(path.parent), "<out>")
    text = re.sub(r"^\[[^\]]+\]", "", text, flags=re.MULTILINE)
    return [line for line in re.sub(r"\d+\.\d+ s\b", "<t> s", text).splitlines() if line.startswith("[runner]")]


@pytest.mark.slow
def test_the_log_file_is_the_same_whether_stdout_is_a_terminal_or_a_pipe(tmp_path):
    args = [*QUICK, "trainer.max_epochs=3", "trainer.log_every_n_steps=3", "hydra.run.dir=out"]
    (tmp_path / "pipe").mkdir()
    (tmp_path / "tty").mkdir()
    piped = run_cli(args, cwd=tmp_path / "pipe")
    assert piped.returncode == 0, piped.stderr
    code, shown = _run_in_a_terminal(args, tmp_path / "tty")
    assert code == 0, shown
    assert "\x1b[" in shown  # it did run on a terminal: the bar drew there
    logged = _log_lines(tmp_path / "tty" / "out" / "runner.log")
    assert logged == _log_lines(tmp_path / "pipe" / "out" / "runner.log")
    assert [line for line in logged if "epoch" in line and "val/loss" in line][-1].startswith("[runner][INFO] - epoch 3  step 6")
    assert any(line.startswith("[runner][INFO] - step 3/6") for line in logged)
    # on the terminal the bar shows them instead: no per-epoch line printed through it
    assert "epoch 1  step 2" not in shown and "final metrics" in shown


# --------------------------------------------------------------------- a refused run's directory
@pytest.mark.slow
def test_a_run_refused_by_a_check_leaves_no_output_directory(tmp_path):
    refused = run_cli(["trainer.precision=fp8", "logger=none"], cwd=tmp_path)  # the default outputs/<date>/<time>
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("runner: error: trainer.precision='fp8' is not supported")
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))
    # a directory that holds a run's files keeps them, and its log says how the job ended
    finished = run_cli([*QUICK, "hydra.run.dir=mine"], cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    again = run_cli([*QUICK, "trainer.precision=fp8", "hydra.run.dir=mine"], cwd=tmp_path)
    assert again.returncode == 2
    assert (tmp_path / "mine" / "checkpoints" / "last.pt").is_file()
    last = (tmp_path / "mine" / "runner.log").read_text().splitlines()[-1]
    assert last.endswith("[runner][ERROR] - runner: error: trainer.precision='fp8' is not supported; use one of 32, bf16-mixed, 16-mixed")


def test_discard_or_record_removes_only_what_a_refused_run_wrote(tmp_path):
    from runner.joblog import discard_or_record, job_start

    logger = logging.getLogger("runner")
    cases = (  # name, files beside .hydra/ and the log, an earlier run's log, runner logs, kept
        ("begun", ["checkpoints/last.pt"], "", False, True),
        ("logged", [], "", True, True),
        ("earlier log", [], "[runner][INFO] - epoch 1\n", False, True),
        ("refused", [], "", False, False),
    )
    for name, files, earlier, logs, kept in cases:
        output_dir = tmp_path / "outputs" / name / "12-00-00"
        (output_dir / ".hydra").mkdir(parents=True)
        (output_dir / ".hydra" / "config.yaml").write_text("a: 1\n")
        (output_dir / "runner.log").write_text(earlier)
        for file in files:
            (output_dir / file).parent.mkdir(parents=True, exist_ok=True)
            (output_dir / file).write_bytes(b"x")
        handler = logging.FileHandler(output_dir / "runner.log")
        logger.addHandler(handler)
        try:
            start = job_start()
            # a library's line after the start is no sign of the job's work
            handler.handle(logging.makeLogRecord({"name": "matplotlib", "msg": "generated new fontManager"}))
            if logs:
                logger.warning("epoch 1")
            discard_or_record(output_dir, ConfigError("a.b=1 is wrong; use 2"), tmp_path, start)
        finally:
            logger.removeHandler(handler)
            handler.close()
        assert output_dir.exists() == kept, name
        if kept:
            assert (output_dir / "runner.log").read_text().splitlines()[-1] == "runner: error: a.b=1 is wrong; use 2"
    # the refused run's parents went with it while empty (outputs/refused), not further
    assert not (tmp_path / "outputs" / "refused").exists() and (tmp_path / "outputs" / "begun").is_dir()
    # never the launch directory itself, whatever it holds
    (tmp_path / "here" / ".hydra").mkdir(parents=True)
    discard_or_record(tmp_path / "here", ConfigError("x"), tmp_path / "here", job_start())
    assert (tmp_path / "here" / ".hydra").is_dir()


# ---------------------------------------------------------------------------- your own model
def _readme_own_model() -> tuple[str, list[str]]:
    """The README's own-model example: my_pkg/__init__.py and the command, as written there."""
    block = re.search(r"\n( +)# my_pkg/__init__\.py\n(.*?)\n\n +`(python -m runner model\._target_=my_pkg\.MyNet[^`]*)`", README, re.DOTALL)
    assert block, "README: the Bring your own model example moved"
    code = textwrap.dedent(block.group(1) + "# my_pkg/__init__.py\n" + block.group(2))
    return code, shlex.split(block.group(3))


@pytest.mark.slow
def test_the_readme_own_model_example_runs_as_written(tmp_path):
    code, command = _readme_own_model()
    assert command[:3] == ["python", "-m", "runner"]
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text(code)  # in the launch directory, not installed
    result = run_cli([*command[3:], *QUICK, "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert weights["net.1.weight"].shape == (64, 64)  # +model.width=64 on flattened 1x8x8 digits


class WideNet(torch.nn.Module):
    """A user's class that takes none of the CNN file's own keys."""

    def __init__(self, input_shape, num_classes, width: int = 8):
        super().__init__()
        self.head = torch.nn.Linear(1, num_classes)


def test_every_key_the_class_does_not_take_is_named_in_one_message(cfg):
    from runner.build import build

    target = f"model._target_={__name__}.WideNet"
    config = cfg(target, "+model.width=4", "+model.depth=3")
    with pytest.raises(ConfigError) as error:
        build(config, [target])
    assert str(error.value) == (
        f"model: '{__name__}.WideNet' does not take channels=[32, 64], dropout=0.1, depth=3 (it takes input_shape, "
        "num_classes, width); drop them with ~model.channels ~model.dropout ~model.depth, or write a model file "
        "for the class and pick it (--config-dir my_conf model=my_model)"
    )
    built = build(cfg(target, "~model.channels", "~model.dropout"), [target])
    assert isinstance(built.model, WideNet)


# ------------------------------------------------------------------------------------- export
def test_the_default_export_formats_are_what_is_installed(monkeypatch):
    from runner.export import ExportModel

    assert ExportModel().formats == ["torchscript", "onnx"]  # the test extras install runner[export]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # a base install: no exporter
    assert ExportModel().formats == ["torchscript"]
    assert ExportModel(formats=["torchscript", "onnx"]).formats == ["torchscript", "onnx"]  # asked for: tried, warned


def test_torchscript_export_lets_no_deprecation_warning_out(tmp_path):
    """torch deprecates torch.jit (a DeprecationWarning in 2.13, a FutureWarning before): runner
    keeps TorchScript on purpose and silences exactly those at its own calls."""
    import warnings

    from runner.export import _save_and_check, _trace

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval().requires_grad_(False)
    batch = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced, problem = _trace(model, batch)
        result = _save_and_check(traced, [batch], [model(batch)], tmp_path / "model.pt", {"atol": 1e-5, "rtol": 1e-4})
    assert problem is None and result["ok"] is True
    assert not [str(item.message) for item in caught if "torch.jit" in str(item.message)]
