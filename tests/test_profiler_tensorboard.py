"""callbacks=profiler (section times from hooks, a torch.profiler trace) and the TensorBoard
loggers (logger=tensorboard, logger=mlflow_tensorboard), read back from disk and MLflow."""

import json
import sys
import time
from collections import Counter

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runner.build import build
from runner.callbacks import Callback, Profiler
from runner.errors import ConfigError
from runner.loop import Loop
from runner.run import resolved, run
from runner.state import seed_everything
from runner.tracking import mlflow_config
from tests.conftest import TINY, compose_config, run_cli

# TINY's synthetic data: 179 training samples / 32 = 6 steps per epoch, 2 epochs


class Recorder(Callback):
    """Every logged metric with its step, and the training batches seen."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.batches = 0

    def on_train_batch(self, loop, x, y):
        self.batches += 1
        return x, y

    def on_log(self, loop, metrics):
        self.logged.append((loop.state.step, dict(metrics)))

    def keys(self) -> set[str]:
        return {key for _, metrics in self.logged for key in metrics}


def tiny(*overrides: str):
    """TINY with these overrides; theirs win where both set a key."""
    keys = {override.split("=")[0] for override in overrides}
    return compose_config([o for o in TINY if o.split("=")[0] not in keys] + list(overrides))


def make_loop(overrides, tmp_path, **callbacks) -> Loop:
    cfg = tiny(*overrides)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    parts = build(cfg)
    parts.callbacks.update(callbacks)
    loop = Loop(parts, cfg.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(cfg))
    loop.info["output_dir"] = tmp_path
    return loop


# -------------------------------------------------------------------------- profiler
@pytest.mark.parametrize("accumulate,steps", [(1, 12), (2, 6)])
def test_profiler_sections_cover_fit_and_count_steps(tmp_path, accumulate, steps):
    profiler, recorder = Profiler(), Recorder()
    overrides = [f"trainer.accumulate_grad_batches={accumulate}", "callbacks=default", "~callbacks.progress"]
    loop = make_loop(overrides, tmp_path, profiler=profiler, recorder=recorder)
    started = time.perf_counter()
    loop.fit()
    wall = time.perf_counter() - started
    assert loop.state.step == steps == profiler.steps and recorder.batches == 12
    sections = profiler.sections()
    main = {name: sections[name] for name in Profiler.SECTIONS}
    assert all(value >= 0 for value in sections.values())
    for name in ("data", "forward", "backward", "optimizer", "validation", "callbacks"):
        assert main[name] > 0, name
    # the sections split fit's wall time: their sum is that time, within the call to fit()
    assert sum(main.values()) == pytest.approx(profiler.wall, rel=1e-9) and profiler.wall <= wall
    metrics = next(metrics for _, metrics in recorder.logged if "profile/forward_ms" in metrics)
    assert sum(metrics[f"profile/{name}_ms"] for name in Profiler.SECTIONS) <= 1000 * wall / steps
    # every callback gets its row; the recorder's own handlers are among them
    assert {"callbacks/checkpoint", "callbacks/lr_monitor", "callbacks/recorder"} <= sections.keys()
    assert sections["callbacks"] == pytest.approx(sum(v for k, v in sections.items() if k.startswith("callbacks/")))
    # one forward and one backward per batch, one optimizer call per step
    assert profiler.counts == {"forward": 12, "backward": 12, "optimizer": steps}


def test_profiler_leaves_nothing_behind(tmp_path):
    profiler = Profiler()
    loop = make_loop(["callbacks=default"], tmp_path, profiler=profiler)
    plain_hooks = list(loop._handlers("on_step_end"))
    loop.fit()
    assert not loop.model._forward_hooks and not loop.model._forward_pre_hooks
    assert not loop.optimizer._optimizer_step_pre_hooks and not loop.optimizer._optimizer_step_post_hooks
    assert "on_step_end" not in loop._dispatch  # emit() lists the plain handlers again
    assert loop._batch_hooks == loop._handlers("on_train_batch") and loop._handlers("on_step_end") == plain_hooks


def test_profiler_metrics_reach_on_log_and_the_table_prints(tmp_path, capsys):
    recorder = Recorder()
    loop = make_loop(["callbacks=none"], tmp_path, profiler=Profiler(), recorder=recorder)
    loop.fit()
    expected = {f"profile/{name}_ms" for name in Profiler.SECTIONS} | {"profile/step_ms", "profile/callbacks/recorder_ms"}
    assert expected <= recorder.keys()
    step, _ = next(entry for entry in recorder.logged if "profile/step_ms" in entry[1])
    assert step == 12
    table = capsys.readouterr().out
    assert "profile: 12 steps" in table and "backward" in table and "recorder" in table


@pytest.mark.parametrize("wait,trace_steps,name", [(1, 2, "steps2-3"), (10, 5, "steps11-12")])
def test_profiler_trace_is_chrome_json_listed_as_an_artifact(tmp_path, wait, trace_steps, name):
    profiler = Profiler(trace_steps=trace_steps, wait=wait)
    loop = make_loop(["callbacks=none"], tmp_path, profiler=profiler)
    loop.fit()
    # the second case asks for more steps than the run has: the trace ends with fit
    (trace,) = (tmp_path / "profiler").glob("*.json")
    assert trace == profiler.trace_path and trace.name == f"trace_rank0_{name}.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("name") == "aten::addmm" for event in events)
    assert loop.info["artifacts"] == [(trace, "profiler")]


def test_profiler_refuses_negative_settings():
    with pytest.raises(ConfigError, match=r"callbacks.profiler.trace_steps=-1 is negative"):
        Profiler(trace_steps=-1)


# ------------------------------------------------------------------------ tensorboard
def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_writes_what_was_logged(tmp_path):
    recorder = Recorder()
    loop = make_loop(["logger=tensorboard", "callbacks=default", "trainer.log_every_n_steps=1"], tmp_path, recorder=recorder)
    assert type(loop.callbacks["logger"]).__name__ == "TensorBoardLogger"
    loop.fit()
    loop.emit("on_run_end", "FINISHED", None)
    logged: dict[str, list] = {}
    for step, metrics in recorder.logged:
        for key, value in metrics.items():
            logged.setdefault(key, []).append((step, pytest.approx(value, rel=1e-6)))  # stored as float32
    written = scalars(tmp_path / "tensorboard")
    assert written == logged
    assert {"train/step_loss", "val/acc", "lr", "epoch"} <= written.keys()


def test_tensorboard_and_mlflow_get_the_same_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny("logger=mlflow_tensorboard", f"logger.mlflow.tracking_uri={uri}", "logger.tensorboard.log_dir=tb", "trainer.log_every_n_steps=1")
    assert cfg.logger.tensorboard.log_dir == "tb" and mlflow_config(cfg.logger) is cfg.logger.mlflow
    names = [name for name in build(cfg).callbacks if name.startswith("logger")]
    assert names == ["logger", "logger.tensorboard"]
    (tmp_path / "out").mkdir()
    result = run(cfg, output_dir=tmp_path / "out")
    client = MlflowClient(uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    in_mlflow = {
        key: sorted((m.step, pytest.approx(m.value, rel=1e-6)) for m in client.get_metric_history(mlflow_run.info.run_id, key))
        for key in mlflow_run.data.metrics
    }
    written = scalars(tmp_path / "out" / "tb")  # a relative log_dir is inside the output directory
    assert {key: sorted(values) for key, values in written.items()} == in_mlflow
    assert written["test/acc"] == [(12, pytest.approx(result.metrics["test/acc"], rel=1e-6))]


def test_logger_selection_finds_mlflow():
    assert mlflow_config(compose_config(["logger=mlflow"]).logger)._target_ == "runner.tracking.MLflowLogger"
    assert mlflow_config(compose_config(["logger=tensorboard"]).logger) is None
    assert mlflow_config(compose_config(["logger=none"]).logger) is None


def test_missing_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    for logger in ("tensorboard", "mlflow_tensorboard"):
        with pytest.raises(ConfigError, match=r"pip install 'runner\[tensorboard\]'"):
            build(tiny(f"logger={logger}"))


@pytest.mark.slow
def test_cli_profiler_trace_and_metrics_land_in_mlflow_and_tensorboard(tmp_path):
    args = [*(o for o in TINY if o != "logger=none"), "logger=mlflow_tensorboard", "callbacks=profiler", "callbacks.profiler.trace_steps=2", "callbacks.profiler.wait=1", "hydra.run.dir=out"]
    result = run_cli(args, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "profile: 12 steps" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    run_id = mlflow_run.info.run_id
    assert [a.path for a in client.list_artifacts(run_id, "profiler")] == ["profiler/trace_rank0_steps2-3.json"]
    profile = {key for key in mlflow_run.data.metrics if key.startswith("profile/")}
    assert {"profile/data_ms", "profile/forward_ms", "profile/backward_ms", "profile/optimizer_ms", "profile/callbacks_ms"} <= profile
    written = scalars(tmp_path / "out" / "tensorboard")
    assert profile <= written.keys()
    assert Counter(key.split("/")[0] for key in written)["profile"] == len(profile)
