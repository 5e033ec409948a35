"""Export: TorchScript and ONNX checked against PyTorch, the files beside them, the MLflow
model and the on-demand command; the formats are loaded back in fresh processes, as a user
would, and must give the trained model's predictions."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from runner import checkpoint
from runner.build import build
from runner.data import synthetic
from runner.errors import ConfigError
from runner.export import ExportModel, bundle_info, example_batch, export_bundle
from runner.run import run
from tests.conftest import TINY, compose_config

BUNDLE = {"model.pt", "model.onnx", "config.yaml", "metrics.json", "model.json", "README.md"}
# the tolerance the exporter checks with (conf/callbacks/default.yaml), reused here
ATOL, RTOL = 1e-5, 1e-4
# batch sizes the exporter never saw (it checks 64 and 63): the batch axis must be dynamic
FRESH_SIZES = (5, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny CNN run, tracked in a sqlite store under the test's directory, shared by the
    tests below (the conftest cfg fixture's TINY overrides, with MLflow on). Returns the
    directory, the run's output dir and its composed config."""
    root = tmp_path_factory.mktemp("export")
    overrides = [o for o in TINY if not o.startswith("logger=")] + [f"logger.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow puts artifacts in ./mlruns
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = compose_config(overrides)
        (root / "out").mkdir()
        result = run(cfg, output_dir=root / "out")
    return root, result, cfg


def _eager(cfg, weights, batch: torch.Tensor) -> np.ndarray:
    """The trained model's predictions, built and loaded without runner.export."""
    model = build(cfg).model
    model.load_state_dict(weights)
    with torch.no_grad():
        return model.eval()(batch).numpy()


def _test_inputs(cfg, count: int) -> torch.Tensor:
    return build(cfg).data.test[:count][0]


def _python(code: str, cwd, env=None):
    """A fresh interpreter, as a user's own script would be."""
    environment = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=240)


def test_a_run_exports_the_tested_weights_with_what_a_user_needs(trained):
    root, result, _ = trained
    export = root / "out" / "export"
    assert {path.name for path in export.iterdir()} == BUNDLE
    description = json.loads((export / "model.json").read_text())
    for name in ("torchscript", "onnx"):
        check = description["formats"][name]
        assert check["exported"] and check["ok"] is True, check
        assert check["max_abs_diff"] <= ATOL and check["batch_sizes"] == [32, 31]
    assert description["formats"]["onnx"]["checked_with"].startswith("onnxruntime")
    assert description["tolerance"]["atol"] == ATOL and description["tolerance"]["rtol"] == RTOL
    assert description["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    assert description["output"]["shape"] == ["batch", 4] and description["output"]["meaning"].startswith("logits")
    assert description["class_names"] == ["0", "1", "2", "3"]
    assert (description["task"], description["modality"]) == ("classification", "image")
    assert description["model"]["weights"] == "best.pt" and description["preprocessing"]
    run_id = (root / "out" / "mlflow_run_id").read_text().strip()
    assert description["run_id"] == run_id and run_id in (export / "README.md").read_text()
    assert json.loads((export / "metrics.json").read_text()) == pytest.approx(result.metrics)
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert config["model"]["_target_"] == "runner.models.CNN" and config["data"]["num_samples"] == 256


@pytest.mark.slow
def test_a_fresh_process_gets_the_trained_models_predictions_from_both_formats(trained, tmp_path):
    root, result, cfg = trained
    inputs = _test_inputs(cfg, max(FRESH_SIZES))
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    expected = _eager(cfg, checkpoint.load(result.best_checkpoint)["model"], inputs)
    code = f"""
        import sys
        import numpy as np
        import torch
        inputs, export = np.load("inputs.npy"), {str(root / "out" / "export")!r}
        scripted = torch.jit.load(export + "/model.pt")
        outputs = {{f"torchscript_{{n}}": scripted(torch.from_numpy(inputs[:n])).detach().numpy() for n in {FRESH_SIZES}}}
        try:
            import onnxruntime
        except ImportError:  # the export extra is missing: the file is at least valid ONNX
            import onnx
            onnx.checker.check_model(export + "/model.onnx")
            print("note: onnxruntime is not installed; ONNX checked with onnx.checker only")
        else:
            session = onnxruntime.InferenceSession(export + "/model.onnx", providers=["CPUExecutionProvider"])
            outputs.update({{f"onnx_{{n}}": session.run(None, {{"input": inputs[:n]}})[0] for n in {FRESH_SIZES}}})
        assert "runner" not in sys.modules
        np.savez("outputs.npz", **outputs)
    """
    completed = _python(code, tmp_path)
    assert completed.returncode == 0, completed.stderr
    outputs = np.load(tmp_path / "outputs.npz")
    assert set(outputs.files) == {f"{name}_{n}" for name in ("torchscript", "onnx") for n in FRESH_SIZES}
    for key in outputs.files:
        size = int(key.rsplit("_", 1)[1])
        np.testing.assert_allclose(outputs[key], expected[:size], atol=ATOL, rtol=RTOL, err_msg=key)


@pytest.mark.slow
def test_the_runs_mlflow_model_predicts_in_a_fresh_process(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    root, result, cfg = trained
    run_id = (root / "out" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "export")} == {f"export/{name}" for name in BUNDLE}
    inputs = _test_inputs(cfg, 4)
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    expected = _eager(cfg, checkpoint.load(result.best_checkpoint)["model"], inputs)
    code = f"""
        import sys
        import mlflow
        import numpy as np
        model = mlflow.pyfunc.load_model("runs:/{run_id}/model")
        np.save("predicted.npy", model.predict(np.load("inputs.npy")))
        assert "runner" not in sys.modules
    """
    completed = _python(code, tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert completed.returncode == 0, completed.stderr
    np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_the_command_exports_a_checkpoint_and_refuses_a_bad_path_in_one_line(trained, tmp_path):
    root, result, _ = trained
    command = [sys.executable, "-m", "runner.export"]
    completed = subprocess.run([*command, str(result.best_checkpoint), "--out", "bundle"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr
    assert {path.name for path in (tmp_path / "bundle").iterdir()} == BUNDLE
    description = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert all(check["ok"] is True for check in description["formats"].values())
    # the run's own files beside the checkpoint: its test metrics and MLflow run
    assert description["metrics"] == pytest.approx(result.metrics)
    assert description["run_id"] == (root / "out" / "mlflow_run_id").read_text().strip()
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"\x00" * 64)
    for bad in ("missing.pt", "not_a_checkpoint.pt"):
        completed = subprocess.run([*command, bad], cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert completed.returncode == 2
        assert completed.stderr.startswith("runner.export: error: checkpoint") and len(completed.stderr.strip().splitlines()) == 1, completed.stderr


# every other model of conf/model (cnn: the run above), with the parts each needs
MODELS = {
    "mlp": ["model=mlp"],
    "vit": ["model=vit", "model.depth=1"],
    "resnet": ["model=resnet"],
    "pinn": ["data=ode", "model=pinn", "loss=physics", "optimized_metric=val/rel_l2", "callbacks.checkpoint.monitor=val/rel_l2",
             "callbacks.checkpoint.mode=min", "callbacks.early_stopping.monitor=val/rel_l2", "callbacks.early_stopping.mode=min"],
}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_exports_with_a_dynamic_batch(model, tmp_path):
    import onnxruntime

    overrides = [o for o in TINY if not (model == "pinn" and o.startswith("data"))] + MODELS[model]
    parts = build(compose_config(overrides))
    info = bundle_info(parts.data, {"data": {"_target_": "runner.data.x"}}, {}, None, "random")
    result = export_bundle(parts.model, example_batch(parts.data), tmp_path, info)
    for name, check in result["model"]["formats"].items():
        assert check["ok"] is True, (name, check)
    inputs = parts.data.test[:3][0]  # a batch size the export did not see
    with torch.no_grad():
        expected = parts.model.eval()(inputs).numpy()
    scripted = torch.jit.load(str(tmp_path / "model.pt"))(inputs).detach().numpy()
    onnx = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": inputs.numpy()})[0]
    np.testing.assert_allclose(scripted, expected, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(onnx, expected, atol=ATOL, rtol=RTOL)


def _tiny_info():
    data = synthetic(num_samples=64, num_classes=3, input_shape=(4,))
    return data, bundle_info(data, {"data": {"_target_": "runner.data.synthetic"}}, {"test/acc": 0.5}, None, "random")


class ExportsSomethingElse(nn.Module):
    """Its traced, scripted and exported graphs add 1e-3 to what it computes eagerly: the
    mismatch the tolerance check exists to catch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting():
            return self.linear(x) + 1e-3
        return self.linear(x)


class BranchesOnData(nn.Module):
    """A branch on a tensor's value: TorchScript compiles it, torch.export cannot."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def test_a_mismatch_beyond_the_tolerance_is_an_error_and_a_false_flag(tmp_path, caplog):
    data, info = _tiny_info()
    with caplog.at_level(logging.INFO, logger="runner"):
        result = export_bundle(ExportsSomethingElse(), example_batch(data), tmp_path, info)
    formats = json.loads((tmp_path / "model.json").read_text())["formats"]
    for name in ("torchscript", "onnx"):
        assert formats[name]["exported"] and formats[name]["ok"] is False
        assert formats[name]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 2 and all("beyond the tolerance" in message for message in errors)
    assert result["model"]["formats"] == formats


def test_a_model_onnx_cannot_take_is_skipped_with_the_reason_and_scripted(tmp_path, caplog):
    data, info = _tiny_info()
    with caplog.at_level(logging.WARNING, logger="runner"):
        export_bundle(BranchesOnData(), example_batch(data), tmp_path, info)
    formats = json.loads((tmp_path / "model.json").read_text())["formats"]
    assert formats["torchscript"]["ok"] is True and formats["torchscript"]["method"] == "script"
    assert "tracer warned" in formats["torchscript"]["trace_problem"]
    assert formats["onnx"]["exported"] is False and "torch.export" in formats["onnx"]["error"]
    assert not (tmp_path / "model.onnx").exists()
    assert "export: onnx skipped" in caplog.text
    assert "not written" in (tmp_path / "README.md").read_text()


def test_without_the_onnx_packages_onnx_is_skipped_naming_the_extra(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now fails
    data, info = _tiny_info()
    model = nn.Sequential(nn.Linear(4, 3))
    with caplog.at_level(logging.WARNING, logger="runner"):
        result = export_bundle(model, example_batch(data), tmp_path, info)
    formats = result["model"]["formats"]
    assert formats["torchscript"]["ok"] is True
    assert formats["onnx"]["exported"] is False and "pip install 'runner[export]'" in formats["onnx"]["error"]
    assert "pip install 'runner[export]'" in caplog.text


def test_the_ema_weights_are_what_is_exported(cfg, tmp_path):
    result = run(cfg("callbacks=[default,ema]", "callbacks.ema.warmup=false", "callbacks.export.formats=[torchscript]"), output_dir=tmp_path)
    description = json.loads((tmp_path / "export" / "model.json").read_text())
    assert "eval_model" in description["model"]["weights"] and not (tmp_path / "export" / "model.onnx").exists()
    payload = checkpoint.load(result.best_checkpoint)
    composed = cfg("callbacks=[default,ema]")
    inputs = _test_inputs(composed, 4)
    exported = torch.jit.load(str(tmp_path / "export" / "model.pt"))(inputs).detach().numpy()
    np.testing.assert_allclose(exported, _eager(composed, payload["eval_model"], inputs), atol=ATOL, rtol=RTOL)
    assert not np.allclose(exported, _eager(composed, payload["model"], inputs), atol=1e-3)


def test_an_unknown_format_fails_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"callbacks.export.formats=\['tflite'\]: tflite is not supported; use any of torchscript, onnx"):
        ExportModel(formats=["tflite"])
