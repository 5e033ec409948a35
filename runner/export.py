"""Export the tested model: TorchScript, ONNX, and what a user needs beside the weights.

After the final test (``ExportModel``, on by default in conf/callbacks/default.yaml) or on
demand from a checkpoint::

    python -m runner.export outputs/<date>/<time>/checkpoints/best.pt [--out DIR]

``<output_dir>/export/`` then holds:

    model.pt      TorchScript (torch.jit.load; no runner code needed)
    model.onnx    ONNX with a dynamic batch axis (onnxruntime; pip install 'runner[export]')
    config.yaml   the resolved config of the run
    metrics.json  the metrics of the exported weights
    model.json    class names, input shape and dtype, modality, task, preprocessing, what the
                  output means, and each format's check against the PyTorch model
    README.md     a short model card: data, metrics, run, date, how to load each format

Every format is loaded back from its file and run on a batch of test inputs at two batch
sizes; its outputs must match the PyTorch model's within ``|a - b| <= atol + rtol * |b|``
(default atol 1e-5, rtol 1e-4). A format that cannot be exported is skipped with a warning
and the reason in model.json; a mismatch is logged as an error and flagged ``"ok": false``.
Neither fails the run. With MLflow on, MLflowLogger logs the TorchScript model to the job's
run as an MLflow PyTorch model (input example and signature included), so
``mlflow.pyfunc.load_model("runs:/<run id>/model").predict(batch)`` works without runner.
"""

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.callbacks import Callback
from runner.errors import ConfigError, RunnerError

log = logging.getLogger("runner")

FORMATS = ("torchscript", "onnx")
AUTO = "auto"  # the formats this environment can export: torchscript, and onnx with runner[export]
FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
INSTALL_HINT = "pip install 'runner[export]'"
INPUT_NAME, OUTPUT_NAME = "input", "output"
MLFLOW_MODEL_NAME = "model"  # runs:/<run id>/model
EXAMPLE_ROWS = 2  # rows of the input example stored with the MLflow model

# What the shipped data factories do to raw inputs before the model sees them. A data module
# may say it itself with a ``preprocessing`` attribute, which wins over this table.
PREPROCESSING = {
    "runner.data.digits": "8x8 grayscale digit images as [1, 8, 8] float32: scikit-learn's pixel counts 0..16 divided by 16, so values lie in [0, 1]; nothing else",
    "runner.data.synthetic": "none: standard-normal random inputs of data.input_shape (a synthetic task)",
    "runner.data.tensors": "none by runner: the x array of data.path, cast to float32",
    "runner.data.synthetic_audio": (
        "waveforms at data.sample_rate Hz, data.duration s, turned into data.features (logmel: "
        "log(mel filterbank @ |STFT|^2 + 1e-6) with data.n_fft, data.hop_length, data.n_mels, "
        "data.f_min, data.f_max; see runner/audio.py), then standardised per channel and frequency "
        "with the mean and std of the training split (those statistics are not stored here)"
    ),
    "runner.data.ode": "none: the time t (same unit as data.t_max) as a [1] float32 input",
}


class ExportModel(Callback):
    """After the final test, export the weights that were tested (best.pt, or
    ``loop.eval_model`` such as the EMA average) to ``<output_dir>/export/``. Rank 0 only.
    The bundle's files become MLflow artifacts (export/); with ``mlflow_model`` the
    TorchScript model is also logged as the run's MLflow model by MLflowLogger."""

    def __init__(self, formats: str | list[str] | tuple[str, ...] = AUTO, mlflow_model: bool = True,
                 atol: float = 1e-5, rtol: float = 1e-4, dirname: str = "export"):
        if formats == AUTO:
            formats = available_formats()
        if isinstance(formats, str):
            formats = [formats]
        unknown = [name for name in formats if name not in FORMATS]
        if unknown:
            raise ConfigError(f"callbacks.export.formats={list(formats)}: {', '.join(map(str, unknown))} is not supported; use any of {', '.join(FORMATS)} (or {AUTO}: what is installed)")
        if atol < 0 or rtol < 0:
            raise ConfigError(f"callbacks.export.atol={atol}, rtol={rtol}: tolerances must be >= 0, e.g. atol=1e-5 rtol=1e-4")
        self.formats, self.mlflow_model, self.atol, self.rtol, self.dirname = list(formats), mlflow_model, atol, rtol, dirname

    def on_test_end(self, loop, metrics):
        if loop.dist.rank != 0:
            return
        output_dir = loop.info["output_dir"]
        try:
            model = loop.eval_model if loop.eval_model is not None else loop.model
            weights = "best.pt" if (loop.checkpoint_dir / "best.pt").is_file() else "the final weights"
            if loop.eval_model is not None:
                weights += ", its evaluation weights (loop.eval_model, e.g. the EMA average)"
            info = bundle_info(loop.parts.data, loop.config, metrics, _read_run_id(output_dir), weights)
            result = export_bundle(model, example_batch(loop.parts.data), output_dir / self.dirname, info,
                                   self.formats, self.atol, self.rtol)
        except Exception:  # the run has trained and tested: an export problem must not fail it
            log.exception("export: could not write %s; the run goes on", output_dir / self.dirname)
            return
        loop.info.setdefault("artifacts", []).extend((path, "export") for path in result["files"])
        loop.info["export"] = {
            "dir": result["dir"],
            # only a TorchScript model that passed its check becomes the run's MLflow model
            "torchscript": result["dir"] / FILES["torchscript"] if result["model"]["formats"].get("torchscript", {}).get("ok") else None,
            "input_example": result["example"][:EXAMPLE_ROWS].numpy(),
            "mlflow_model": self.mlflow_model,
        }


def available_formats() -> list[str]:
    """``formats: auto``: TorchScript always, ONNX when its exporter's packages (onnx and
    onnxscript, the runner[export] extra) are installed. A base install then exports what it
    can without a warning; naming onnx explicitly without the extra still warns."""
    from importlib.util import find_spec

    def installed(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):  # a module without a spec: not a package to count on
            return False

    return ["torchscript"] + (["onnx"] if installed("onnx") and installed("onnxscript") else [])


# ------------------------------------------------------------------ the bundle
def example_batch(data) -> torch.Tensor:
    """The first test batch (the split is not shuffled), as float32 on the CPU."""
    x, _ = next(iter(data.loader("test", limit=1)))
    return x.float().cpu()


def bundle_info(data, config: dict, metrics: dict, run_id: str | None, weights: str) -> dict:
    """What export_bundle writes beside the model, from the data module and the run."""
    target = config.get("data", {}).get("_target_", "")
    preprocessing = getattr(data, "preprocessing", None) or PREPROCESSING.get(target, "not recorded: inputs as the data module yields them")
    classification = data.task == "classification"
    return {
        "config": config,
        "metrics": {key: value for key, value in metrics.items() if isinstance(value, (int, float))},
        "run_id": run_id,
        "weights": weights,
        "task": data.task,
        "modality": data.modality,
        "class_names": list(data.class_names),
        "num_outputs": int(data.num_classes),
        "input_shape": [int(size) for size in data.input_shape],
        "preprocessing": preprocessing,
        "output": (
            "logits: one unnormalised score per class in class_names order; softmax gives probabilities, argmax the class"
            if classification else f"predicted values: {data.num_classes} regression output(s) per sample"
        ),
        "data": {"target": target, "samples": {split: len(getattr(data, split)) for split in ("train", "val", "test")}},
    }


def export_bundle(model: nn.Module, example: torch.Tensor, export_dir: Path, info: dict,
                  formats: list[str] | tuple[str, ...] = FORMATS, atol: float = 1e-5, rtol: float = 1e-4) -> dict:
    """Write the model in every format plus config, metrics, model.json and README.md into
    export_dir; return {"dir", "files", "model" (model.json's content), "example"}."""
    from omegaconf import OmegaConf

    started = time.monotonic()
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    # a copy on the CPU in float32 and eval mode: the loop's model stays as it is
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    example = example.float().cpu().contiguous()
    if len(example) < 2:  # torch.export treats a batch of 1 as a constant
        example = torch.cat([example, example])
    batches = [example, example[:-1]]  # two sizes: a batch size baked into a graph shows up
    with torch.no_grad():
        expected = [model(batch) for batch in batches]
    tolerance = {"atol": atol, "rtol": rtol}
    results = {}
    for name in formats:
        path = export_dir / FILES[name]
        path.unlink(missing_ok=True)  # never leave an older run's file beside this one's
        exporter = _torchscript if name == "torchscript" else _onnx
        format_started = time.monotonic()
        results[name] = {"file": path.name, **exporter(model, batches, expected, path, tolerance)}
        results[name]["seconds"] = round(time.monotonic() - format_started, 3)
        _report(name, results[name], tolerance)
    description = _describe(model, example, info, results, tolerance)
    (export_dir / "config.yaml").write_text(OmegaConf.to_yaml(info["config"]))
    (export_dir / "metrics.json").write_text(json.dumps(info["metrics"], indent=2, sort_keys=True) + "\n")
    (export_dir / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    (export_dir / "README.md").write_text(_model_card(description))
    files = [export_dir / FILES[name] for name in formats if (export_dir / FILES[name]).is_file()]
    files += [export_dir / name for name in ("config.yaml", "metrics.json", "model.json", "README.md")]
    log.info("export: %s in %.1f s", export_dir, time.monotonic() - started)
    return {"dir": export_dir, "files": files, "model": description, "example": example}


def _report(name: str, result: dict, tolerance: dict) -> None:
    if not result["exported"]:
        log.warning("export: %s skipped: %s", name, result["error"])
    elif result.get("ok") is False:
        log.error("export: %s outputs differ from the PyTorch model's beyond the tolerance (max |diff| %s, atol %g, rtol %g); "
                  "%s is written but flagged \"ok\": false in model.json", name, _difference(result), tolerance["atol"], tolerance["rtol"], result["file"])
    else:
        log.info("export: %s %s, max |diff| %s (%s)", name, result["file"], _difference(result), result["checked_with"])


def _difference(result: dict) -> str:
    value = result.get("max_abs_diff")
    return f"{value:.3g}" if value is not None else result.get("mismatch", "not compared")


def _compare(outputs: list, expected: list[torch.Tensor], tolerance: dict) -> dict:
    """Outputs of an exported model against the eager model's, batch by batch."""
    maxima, ok = [], True
    for output, reference in zip(outputs, expected):
        output = torch.as_tensor(output)
        if output.shape != reference.shape:
            return {"ok": False, "max_abs_diff": None, "mismatch": f"shape {list(output.shape)}, expected {list(reference.shape)}"}
        difference = (output - reference).abs()
        maxima.append(float(difference.max()))  # NaN when an output is NaN
        ok = ok and bool((difference <= tolerance["atol"] + tolerance["rtol"] * reference.abs()).all())
    finite = all(math.isfinite(value) for value in maxima)
    return {"ok": ok and finite, "max_abs_diff": max(maxima) if finite else None} | ({} if finite else {"mismatch": "non-finite outputs"})


# ----------------------------------------------------------------- TorchScript
def _torchscript(model: nn.Module, batches: list, expected: list, path: Path, tolerance: dict) -> dict:
    """torch.jit.trace first: it records exactly the eval-mode forward and accepts any Python
    the model is written in. The tracer warns when it had to bake a value into the graph (a
    ``len(x)`` batch size, a tensor turned into a Python number or a branch); then, or when
    the trace does not match at the second batch size, torch.jit.script compiles the forward
    with its control flow instead, when TorchScript's compiler accepts the code."""
    record: dict[str, Any] = {"batch_sizes": [len(batch) for batch in batches]}
    try:
        traced, warning = _trace(model, batches[0])
    except Exception as error:
        traced, warning = None, f"trace failed: {_first_line(error)}"
    if traced is not None and warning is None:
        result = _save_and_check(traced, batches, expected, path, tolerance)
        if result["ok"]:
            return record | {"method": "trace"} | result
        warning = f"the trace does not match the model (max |diff| {_difference(result)})"
    record["trace_problem"] = warning
    try:
        with _torchscript_deprecation_ignored():
            scripted = torch.jit.script(model)
    except Exception as error:
        record["script_problem"] = _first_line(error)
        if traced is None:
            return record | {"exported": False, "ok": False, "error": f"{warning}; torch.jit.script failed: {record['script_problem']}"}
        return record | {"method": "trace"} | _save_and_check(traced, batches, expected, path, tolerance)
    return record | {"method": "script"} | _save_and_check(scripted, batches, expected, path, tolerance)


# torch.jit.trace/script/save/load warn that TorchScript is deprecated in favour of
# torch.export (DeprecationWarning in torch 2.13, FutureWarning in some releases before it).
# runner does use torch.export, for ONNX; model.pt stays TorchScript because a TorchScript file
# is what loads with torch alone, without the model's Python code (torch.export's .pt2 needs
# torch.export.load and, for a model with custom code, that code). So these warnings, and
# only these, are silenced at runner's own calls; a real deprecation elsewhere still shows.
_TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is (deprecated|not supported)"


@contextlib.contextmanager
def _torchscript_deprecation_ignored():
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=category)
        yield


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[Any, str | None]:
    """The traced module and the tracer's first warning (None: nothing was baked in)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, FutureWarning):  # recorded, not shown: only TracerWarnings count
            warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=category)
        traced = torch.jit.trace(model, example, check_trace=False)
    problems = [str(item.message) for item in caught if issubclass(item.category, torch.jit.TracerWarning)]
    return traced, (f"the tracer warned: {problems[0].splitlines()[0]}" if problems else None)


def _save_and_check(module, batches: list, expected: list, path: Path, tolerance: dict) -> dict:
    """Save, load the file back and compare: what is checked is what a user loads."""
    with _torchscript_deprecation_ignored():
        torch.jit.save(module, str(path))
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        outputs = [loaded(batch) for batch in batches]
    return {"exported": True} | _compare(outputs, expected, tolerance) | {"checked_with": f"torch.jit.load, torch {torch.__version__}"}


# ------------------------------------------------------------------------ ONNX
def _onnx(model: nn.Module, batches: list, expected: list, path: Path, tolerance: dict) -> dict:
    """torch.export with a dynamic batch axis, then torch.onnx's exporter of that graph.

    This is the torch.export-based exporter (torch.onnx's default since torch 2.9; it needs
    onnx and onnxscript). The older TorchScript-based one (dynamo=False) is deprecated and
    traces, so a ``len(x)`` batch size (the ViT) ends up a constant and the dynamic batch
    breaks. torch.export runs non-strict first (its default; any Python), then strict
    (TorchDynamo), which keeps ``len(x)`` symbolic where non-strict specialises it."""
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as error:
        return {"exported": False, "ok": False, "error": f"{error.name} is not installed; {INSTALL_HINT} to export ONNX"}
    batch_axis = torch.export.Dim("batch")
    problems = []
    for strict in (False, True):
        try:
            # quiet: torch prints a failed export's partial graph to stderr, the exporters log
            # every pass; the reason for a failure is kept in model.json
            with _quiet("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir"), \
                    contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, (batches[0],), dynamic_shapes=({0: batch_axis},), strict=strict)
                onnx_program = torch.onnx.export(program, (batches[0],), dynamo=True, input_names=[INPUT_NAME],
                                                 output_names=[OUTPUT_NAME], verbose=False)
                onnx_program.save(str(path))
        except Exception as error:
            problems.append(f"torch.export(strict={strict}): {_first_line(error)}")
            continue
        opset = next((entry.version for entry in onnx_program.model_proto.opset_import if entry.domain in ("", "ai.onnx")), None)
        record = {"exporter": f"torch.export (strict={strict}) + torch.onnx (dynamo=True)", "opset": opset,
                  "batch_sizes": [len(batch) for batch in batches]}
        return record | _check_onnx(path, batches, expected, tolerance)
    path.unlink(missing_ok=True)
    return {"exported": False, "ok": False, "error": "; ".join(problems)}


def _check_onnx(path: Path, batches: list, expected: list, tolerance: dict) -> dict:
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(str(path))
        return {"exported": True, "ok": None, "checked_with": f"onnx.checker only: onnxruntime is not installed, outputs not compared ({INSTALL_HINT})"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run(None, {INPUT_NAME: batch.numpy()})[0]) for batch in batches]
    return {"exported": True} | _compare(outputs, expected, tolerance) | {"checked_with": f"onnxruntime {onnxruntime.__version__}"}


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise these loggers to ERROR for a moment (the ONNX exporter warns about every
    torchvision op it skips; MLflow about pickles a ScriptModule never uses)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# -------------------------------------------------------- model.json, README.md
def _describe(model: nn.Module, example: torch.Tensor, info: dict, results: dict, tolerance: dict) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": info["run_id"],
        "model": {"class": f"{type(model).__module__}.{type(model).__name__}", "parameters": sum(p.numel() for p in model.parameters()),
                  "weights": info["weights"]},
        "task": info["task"],
        "modality": info["modality"],
        "class_names": info["class_names"],
        "input": {"name": INPUT_NAME, "shape": ["batch", *info["input_shape"]], "dtype": str(example.dtype).removeprefix("torch.")},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", info["num_outputs"]], "dtype": "float32", "meaning": info["output"]},
        "preprocessing": info["preprocessing"],
        "data": info["data"],
        "metrics": info["metrics"],
        "tolerance": tolerance | {"rule": "|exported - pytorch| <= atol + rtol * |pytorch|, elementwise"},
        "formats": results,
    }


def _model_card(description: dict) -> str:
    metrics = description["metrics"]
    shown = [key for key in sorted(metrics) if key.startswith(("test/", "val/"))]
    formats = description["formats"]
    shape = ", ".join(map(str, description["input"]["shape"][1:]))
    run = description["run_id"] or "none (not tracked in MLflow)"
    sizes = " and ".join(map(str, next((result["batch_sizes"] for result in formats.values() if "batch_sizes" in result), [])))
    lines = [
        f"# Model card: {description['model']['class'].rsplit('.', 1)[-1]}",
        "",
        f"- **Run**: MLflow run `{run}`; exported {description['created']}; weights: {description['model']['weights']}",
        f"- **Task**: {description['task']} on {description['modality']} inputs; {description['model']['parameters']:,} parameters",
        f"- **Data**: `{description['data']['target']}`; samples: " + ", ".join(f"{count} {split}" for split, count in description["data"]["samples"].items()),
        f"- **Classes**: {', '.join(description['class_names']) or '(regression)'}",
        f"- **Input**: `{description['input']['name']}`, {description['input']['dtype']} [batch, {shape}]; preprocessing: {description['preprocessing']}",
        f"- **Output**: `{description['output']['name']}` [batch, {description['output']['shape'][1]}]: {description['output']['meaning']}",
        "",
        "## Metrics (of these weights)",
        "",
        *(f"- {key}: {metrics[key]:.4f}" for key in shown),
        "",
        "## Formats",
        "",
        f"Each file was loaded back and run on test inputs at batch sizes {sizes}; its outputs must match "
        f"the PyTorch model's: |exported - pytorch| <= {description['tolerance']['atol']:g} + "
        f"{description['tolerance']['rtol']:g} * |pytorch|.",
        "",
        *(f"- `{result['file']}`: " + (f"not written: {result['error']}" if not result["exported"] else
          f"ok={result['ok']}, max |diff| {_difference(result)}, {result['checked_with']}") for result in formats.values()),
        "",
        "## Load",
        "",
        "```python",
        "import torch  # TorchScript",
        'model = torch.jit.load("model.pt")',
        "logits = model(torch.from_numpy(batch))  # batch: float32 numpy array [batch, " + shape + "]",
        "```",
        "",
        *([
            "```python",
            f"import onnxruntime  # ONNX ({INSTALL_HINT})",
            'session = onnxruntime.InferenceSession("model.onnx")',
            f'logits = session.run(None, {{"{INPUT_NAME}": batch}})[0]',
            "```",
            "",
        ] if formats.get("onnx", {}).get("exported") else []),
        "```python",
        "import mlflow  # the run's MLflow model (set MLFLOW_TRACKING_URI to the run's store)",
        f'model = mlflow.pyfunc.load_model("runs:/{description["run_id"] or "<run id>"}/{MLFLOW_MODEL_NAME}")',
        "logits = model.predict(batch)",
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- MLflow
def log_mlflow_model(tracking_uri: str, run_id: str, export: dict) -> str:
    """Log the exported TorchScript model into an existing MLflow run as an MLflow PyTorch
    model with an input example and a signature; return its model URI. Loading it needs
    torch and mlflow, not runner."""
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    with _global_tracking_uri(tracking_uri), _quiet("mlflow.pytorch", "mlflow.utils.requirements_utils", "mlflow.models.model"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(export["torchscript"]))
        example = export["input_example"]
        with torch.no_grad():
            output = module(torch.from_numpy(example)).numpy()
        # log_model(run_id=...) alone files the model under MLflow's active (default)
        # experiment, where runs:/<id>/model does not look: create it in the run's experiment
        logged = client.create_logged_model(experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id)
        info = mlflow.pytorch.log_model(
            module, name=MLFLOW_MODEL_NAME, run_id=run_id, model_id=logged.model_id,
            input_example=example, signature=infer_signature(example, output),
            # torch and cloudpickle, pinned to this environment: no subprocess to infer them
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            # MLflow 3's default (pt2) refuses ScriptModules; for one, "pickle" means
            # torch.jit.save, no pickled Python objects
            serialization_format="pickle",
        )
    return info.model_uri


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """mlflow.<flavor>.log_model reads MLflow's process-wide tracking URI (runner otherwise
    uses only MlflowClient): set it for the call, then restore both it and
    $MLFLOW_TRACKING_URI, which mlflow.set_tracking_uri also writes. The restore touches
    MLflow's module variable (mlflow is pinned exactly in pyproject.toml); its own
    _use_tracking_uri would unset a user's $MLFLOW_TRACKING_URI for the next job."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


# ------------------------------------------------------------ from a checkpoint
def export_checkpoint(path: Path, out: Path | None = None, formats: list[str] | tuple[str, ...] = FORMATS,
                      atol: float = 1e-5, rtol: float = 1e-4) -> dict:
    """Rebuild the model from the config inside a runner checkpoint, load its weights (the
    evaluation weights when it has them) and export. Default out: <run dir>/export when the
    checkpoint sits in <run dir>/checkpoints/, else an export/ folder beside it."""
    from omegaconf import OmegaConf, open_dict

    from runner import checkpoint
    from runner.build import build

    path = Path(path)
    payload = checkpoint.load(path)
    if not payload.get("config"):
        raise ConfigError(f"checkpoint '{path}' holds no config to rebuild the model from; export it from a run of this runner version")
    cfg = OmegaConf.create(payload["config"])
    with open_dict(cfg):
        # the model and the data are all an export needs: not the run's loggers and
        # callbacks, nor initial weights from another checkpoint (init_from), which the
        # checkpoint's own replace
        cfg.logger, cfg.callbacks = None, None
        for node in (cfg, cfg.model):
            node.pop("init_from", None)
    parts = build(cfg)
    weights = _load_weights(parts.model, payload, path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    metrics = _run_metrics(run_dir, payload)
    info = bundle_info(parts.data, payload["config"], metrics, _read_run_id(run_dir) if run_dir else None, weights)
    out = Path(out) if out is not None else (run_dir or path.parent) / "export"
    return export_bundle(parts.model, example_batch(parts.data), out, info, formats, atol, rtol)


def _load_weights(model: nn.Module, payload: dict, path: Path) -> str:
    evaluation = payload.get("eval_model")
    if evaluation is not None:
        try:
            model.load_state_dict(evaluation)
            return f"{path.name}: its evaluation weights (eval_model, e.g. the EMA average)"
        except RuntimeError as error:
            log.warning("export: %s's eval_model does not fit the model (%s); exporting its trained weights", path.name, _first_line(error))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ConfigError(f"checkpoint '{path}': its weights do not fit the model its config builds ({_first_line(error)})") from None
    return path.name


def _run_metrics(run_dir: Path | None, payload: dict) -> dict:
    """The run's metrics.json (test metrics of best.pt) when beside it, else the metrics the
    checkpoint recorded when it was saved."""
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    return dict(payload.get("state", {}).get("metrics", {}))


def _read_run_id(output_dir: Path | None) -> str | None:
    path = output_dir / "mlflow_run_id" if output_dir else None
    return path.read_text().strip() if path and path.is_file() else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runner.export",
        description="Export a runner checkpoint as TorchScript and ONNX with its config, metrics, model.json and a model card.",
    )
    parser.add_argument("checkpoint", type=Path, help="a runner checkpoint: <run dir>/checkpoints/best.pt or last.pt")
    parser.add_argument("--out", type=Path, default=None, help="directory to write the files into (default: <run dir>/export)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=None,
                        help="formats to export (default: torchscript, and onnx when runner[export] is installed)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the check against PyTorch (default 1e-5)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the check against PyTorch (default 1e-4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        result = export_checkpoint(args.checkpoint, args.out, args.formats or available_formats(), args.atol, args.rtol)
    except RunnerError as error:
        print(f"runner.export: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    formats = result["model"]["formats"]
    print(f"wrote {result['dir']}: " + ", ".join(path.name for path in result["files"]))
    # a format that could not be exported was warned about; a mismatch is a failure
    return 1 if any(entry["exported"] and entry["ok"] is False for entry in formats.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
