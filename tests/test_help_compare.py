"""Help, tab completion, the end-of-run summary and runner.compare, used as a user uses them."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.schema import _summary
from tests.conftest import compose_config, run_cli

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY_RUN = ["data=synthetic", "data.num_samples=256", "trainer.max_epochs=1", "trainer.device=cpu", "model=mlp"]
COMPARE = [sys.executable, "-m", "runner.compare"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("runner")


# ------------------------------------------------------------------------------- --help
def _help_text(*overrides: str) -> str:
    """The help template as Hydra resolves it (its $CONFIG etc. are filled in later)."""
    return compose_config(list(overrides), return_hydra_config=True).hydra.help.template


def _listed(text: str) -> dict[str, dict[str, str]]:
    """{group: {option: marker + one-liner}} from the "== Config groups ==" section."""
    section = text.split("== Config groups ==", 1)[1].split("== Config ==", 1)[0]
    groups: dict[str, dict[str, str]] = {}
    for line in section.splitlines()[1:]:
        if re.fullmatch(r"[\w/]+:", line):
            group = groups.setdefault(line[:-1], {})
        elif line.startswith("  "):
            marker, name, summary = re.match(r"  ([* ]) (\S+)\s+(.*)", line).groups()
            group[name] = marker + summary
    return groups


def test_help_lists_every_option_file_with_its_first_comment():
    listed = _listed(_help_text())
    files = sorted((path.parent.relative_to(CONF).as_posix(), path.stem) for path in CONF.rglob("*.yaml") if path.parent != CONF)
    assert sorted((group, name) for group, options in listed.items() for name in options) == files
    assert listed["model"]["cnn"] == "*Small convolutional net: conv-bn-relu blocks, each halving the resolution, then a linear head."
    assert listed["model"]["mlp"] == " Multi-layer perceptron on flattened inputs."
    assert listed["augmentation"]["noise_shift"] == " Gaussian noise, then a random shift."  # first sentence only
    assert listed["hparams_search"]["optuna_tpe"] == " Bayesian search (TPE) with runner's Optuna sweeper"  # after '# @package'
    assert all(summary.strip("* ") for options in listed.values() for summary in options.values())


def test_help_marks_this_commands_choices_and_lists_common_commands():
    text = _help_text("model=resnet", "logger=none")
    listed = _listed(text)
    assert listed["model"]["resnet"].startswith("*") and listed["model"]["cnn"].startswith(" ")
    assert listed["logger"]["none"].startswith("*")
    for line in ("== Usage ==", "== Common commands ==", "python -m runner experiment=digits_cnn_focal", "python -m runner.compare", "$CONFIG"):
        assert line in text


@pytest.mark.parametrize(
    "text,summary",
    [
        ("# @package _global_\n# A smoke test: 1 epoch. More here.\nx: 1\n", "A smoke test: 1 epoch."),
        ("# Focal loss (Lin et al. 2017): down-weights easy examples\n# by gamma. With gamma=0 it is CE.\n", "Focal loss (Lin et al. 2017): down-weights easy examples by gamma."),
        ("# Run it like this:\n#   python -m runner x=1\n", "Run it like this"),
        ("_target_: torch.optim.Adam\nlr: 0.001\n", "torch.optim.Adam"),  # no comment: what it builds
    ],
)
def test_one_liner_is_the_first_sentence_of_the_leading_comment(text, summary):
    assert _summary(text) == summary


@pytest.mark.slow
def test_help_on_the_command_line_shows_a_user_config_dir(tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "wide_mlp.yaml").write_text("# A wide MLP costing $5 per ${x}.\n_target_: runner.models.MLP\n")
    result = run_cli(["--help", "--config-dir", "my_conf", "model=wide_mlp"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # verbatim: no $ or ${} processing; the column is as wide as the longest option name
    assert re.search(r"^  \* wide_mlp +A wide MLP costing \$5 per \$\{x\}\.$", result.stdout, re.MULTILINE)
    assert re.search(r"^    mlp +Multi-layer perceptron on flattened inputs\.$", result.stdout, re.MULTILINE)
    assert "== Config ==" in result.stdout and "_target_: runner.models.MLP" in result.stdout
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- completion
@pytest.mark.slow
@pytest.mark.parametrize("group,options", [("model", "cnn hf_image mlp pinn resnet timm torchvision vit"), ("data", "audio_folder dataset digits hf image_folder ode shards synthetic synthetic_audio table tensors")])
def test_shell_completion_lists_a_groups_options(tmp_path, group, options):
    # what Hydra's bash function runs for `runner model=<TAB>`: the app with -sc query=bash
    line = f"runner {group}="
    query = run_cli(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))}, executable=[str(CONSOLE_SCRIPT)])
    assert query.returncode == 0, query.stderr
    assert set(query.stdout.split()) >= {f"{group}={option}" for option in options.split()}
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here to run the installed completion function")
    script = (
        'eval "$(runner -sc install=bash)"\n'
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD=1\n'
        'hydra_bash_completion\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    path = f"{CONSOLE_SCRIPT.parent}:{os.environ.get('PATH', '')}"
    completed = run_cli(["-c", script], cwd=tmp_path, env={"PATH": path}, executable=[bash])
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == [f"{group}={option}" for option in options.split()]


# ---------------------------------------------------------------------- run summary
@pytest.mark.slow
def test_run_summary_names_output_dir_checkpoint_mlflow_run_and_metrics(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli([*TINY_RUN, f"logger.tracking_uri={store}", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
    # the paths and the run follow the metrics table, one per line, never wrapped
    assert re.search(rf"^output dir +{re.escape(str(tmp_path / 'out'))}$", out, re.MULTILINE)
    assert re.search(rf"^best checkpoint +{re.escape(str(tmp_path / 'out' / 'checkpoints' / 'best.pt'))}$", out, re.MULTILINE)
    assert re.search(rf"^MLflow run +{run_id} \(experiment 'runner', id 1\)$", out, re.MULTILINE)
    assert f"mlflow ui --backend-store-uri {store}" in out
    assert f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}" in out
    assert re.search(r"┃ metric +┃ +test ┃ +val ┃", out)  # one column per split, test first
    assert re.search(r"│ acc +│ \d\.\d{4} │ \d\.\d{4} │", out)
    assert re.search(r"│ parameters +│ +[\d,]+ │", out)  # the model's size


@pytest.mark.slow
def test_run_summary_says_when_mlflow_is_off(tmp_path):
    result = run_cli([*TINY_RUN, "logger=none", "hydra.run.dir=out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^MLflow +off \(logger=none\)$", result.stdout, re.MULTILINE)
    assert str(tmp_path / "out" / "checkpoints" / "best.pt") in result.stdout
    # the thread count trainer.num_threads=auto chose, and why (a tiny model: one thread)
    assert re.search(r"^CPU threads +1 \(auto: [\d.e+-]+ GFLOP a step, under 1\)$", result.stdout, re.MULTILINE)
    assert "threads: 1 (auto: " in (tmp_path / "out" / "runner.log").read_text()


def test_summary_figures_keep_small_metrics_readable():
    from runner.callbacks import figure

    assert [figure(value) for value in (0.98519, 0.0, 1.5, 0.00123, 3.1e-05, -2e-06)] == [
        "0.9852", "0.0000", "1.5000", "0.0012", "3.100e-05", "-2.000e-06"]


# --------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """Three tiny jobs (optimizer.lr 0.001, 0.003, 0.01) of one --multirun in a sqlite store."""
    root = tmp_path_factory.mktemp("compare")
    store = f"sqlite:///{root / 'mlflow.db'}"
    result = run_cli(
        ["-m", *TINY_RUN, "optimizer.lr=0.001,0.003,0.01", f"logger.tracking_uri={store}", "hydra.sweep.dir=sweep"],
        cwd=root, env={"MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(root)},
    )
    assert result.returncode == 0, result.stderr
    return root, store


def _compare(cwd, *args):
    return subprocess.run([*COMPARE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if re.match(rf"│ {re.escape(name)}\s+│", line))
    return [cell.strip() for cell in line.strip("│").split("│")[1:]]


@pytest.mark.slow
def test_compare_puts_the_runs_side_by_side(sweep_store):
    root, store = sweep_store
    result = _compare(root, "--tracking-uri", store, "--experiment", "runner")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 runs of experiment 'runner'" in out  # the sweep's parent run is left out
    assert _row(out, "optimizer.lr") == ["0.001", "0.003", "0.01"]  # oldest first
    assert re.search(r"│ \d+ params identical", out)
    assert "│ overrides (not shared)" in out
    accuracies = _row(out, "test/acc")
    assert len(accuracies) == 3 and sum(cell.endswith("*") for cell in accuracies) >= 1
    best = max(float(cell.rstrip(" *")) for cell in accuracies)
    assert all(cell.endswith("*") == (float(cell.rstrip(" *")) == best) for cell in accuracies)
    for name in ("val/acc", "best/val/acc", "objective"):
        assert len(_row(out, name)) == 3
    assert "data.num_samples" not in out  # the same in every run


@pytest.mark.slow
def test_compare_selects_a_sweep_the_last_runs_and_metrics(sweep_store):
    root, store = sweep_store
    parent = (root / "sweep" / "mlflow_parent_run_id").read_text().strip()
    swept = _compare(root, "--tracking-uri", store, "--sweep", parent, "--metrics", "test/acc")
    assert swept.returncode == 0, swept.stderr
    assert f"3 runs of sweep {parent[:8]}" in swept.stdout and "val/acc" not in swept.stdout
    last = _compare(root, "--tracking-uri", store, "--last", "2", "--metrics", "val/*")
    assert last.returncode == 0, last.stderr
    assert _row(last.stdout, "optimizer.lr") == ["0.003", "0.01"] and "test/acc" not in last.stdout


@pytest.mark.slow
def test_compare_explains_a_missing_store_experiment_or_run(sweep_store, tmp_path):
    root, store = sweep_store
    cases = {
        ("--tracking-uri", f"sqlite:///{tmp_path / 'nowhere.db'}"): f"no MLflow store at sqlite:///{tmp_path / 'nowhere.db'}; run python -m runner.compare where",
        ("--tracking-uri", store, "--experiment", "ablation"): f"--experiment 'ablation' does not exist in {store}; pick one of: Default, runner",
        ("--tracking-uri", store, "--runs", "0123abcd"): "run '0123abcd' is not in this store",
    }
    for args, message in cases.items():
        result = _compare(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("runner.compare: error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere.db").exists()  # never creates an empty store
    # the default store is mlflow.db in the current directory; there is none in tmp_path
    default = _compare(tmp_path)
    assert default.returncode == 2 and f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}" in default.stderr
