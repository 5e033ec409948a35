"""MLflow tracking: one MLflow run per job (a callback), one parent run per sweep (a Hydra
callback). Only MlflowClient is used, never MLflow's global "active run", so many jobs in one
process (Hydra's basic launcher, notebooks) cannot trip over each other.

Metrics are appended to a buffer on the training thread (no I/O there) and sent by a
background thread with log_batch; the buffer is flushed when the run ends. A store that stops
answering never stops training: the values stay buffered and are retried, and what could not
be sent (or a run that could not be closed) is reported in one line at the end.
"""

import base64
import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from omegaconf import DictConfig, OmegaConf

from runner.callbacks import Callback
from runner.distributed import is_rank_zero
from runner.errors import ConfigError
from runner.job_guard import relative_path
from runner.schema import flatten, mask_override, mask_secrets, mask_url, objective_names, redact, secret_values

log = logging.getLogger("runner")

PARENT_RUN_ENV = "RUNNER_MLFLOW_PARENT_RUN_ID"
MAX_PARAM_LENGTH = 6000  # MLflow 3 rejects longer param values
MAX_KEY_LENGTH = 250  # and longer param keys
PARAMS_PER_BATCH = 100  # log_batch limits: 100 params, 1000 metrics, 1000 entries in all
METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"
MAX_RETRY_PAUSE_S = 30.0  # the longest pause between attempts to send metrics to a store that is down
CLOSE_TIMEOUT_S = 60.0  # the longest wait at the end of a run for a send already under way
STORE_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def experiment_name(configured: str | None, choices: dict) -> str:
    """logger.experiment_name, else the experiment preset's name, else "runner"."""
    return configured or choices.get("experiment") or "runner"


def default_tracking_uri(tracking_uri: str | None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else a sqlite file in the launch directory.

    sqlite is the store MLflow 3 itself defaults to and recommends: the old ./mlruns file
    store is deprecated and refuses to start unless MLFLOW_ALLOW_FILE_STORE is set, and a
    database store is what `mlflow ui` and `mlflow server` read without extra flags.
    """
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextlib.contextmanager
def _quiet_store_creation():
    """MLflow and alembic announce a new sqlite store's tables on MLflow's own stderr handler
    ("Creating initial MLflow database tables...", "Context impl SQLiteImpl."); runner says
    it once in runner.log instead. Warnings and errors still show."""
    names = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def connect(tracking_uri: str, experiment_name: str, required: bool = True):
    """A client and experiment id, or (None, None) when the store is unreachable or unusable
    and not required. Fails fast instead of MLflow's minutes of retries."""
    # bounded retries for an http store; the user's own settings win
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    source = _uri_source(tracking_uri)
    shown = mask_url(tracking_uri)
    store_uri = credentials_to_environment(tracking_uri)
    problem = _unreachable(store_uri)
    message = (
        f"{source}='{shown}' is unreachable ({problem}); start a server there "
        "(mlflow server --host 127.0.0.1 --port <port>), or unset logger.tracking_uri and "
        "MLFLOW_TRACKING_URI to use the local store, or pass logger.required=false to train untracked"
    )
    if not problem:
        from mlflow.tracking import MlflowClient

        try:
            with _store_lock(store_uri), _quiet_store_creation():
                created = _new_sqlite_file(store_uri)
                try:
                    client = MlflowClient(store_uri)
                    experiment_id = _experiment_id(client, experiment_name)
                except Exception:
                    _remove_partial_store(created)
                    raise
            if created:
                log.info("created the MLflow store %s", shown)
            return client, experiment_id
        except Exception as error:  # an unknown scheme, missing credentials, a foreign database
            message = _unusable_store_message(source, shown, tracking_uri, error)
    if required:
        raise ConfigError(message)
    log.warning("%s; training without tracking", message)
    return None, None


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created when missing. Jobs that start together all find it missing
    and all create it: the store keeps one and answers the others RESOURCE_ALREADY_EXISTS (by
    its error code, whatever the store's wording), and those read it back."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:  # created and deleted again in between: nothing sensible to join
            raise
        log.info("MLflow experiment '%s' was created by another job at the same moment; using it", name)
        return experiment.experiment_id


def _unusable_store_message(source: str, shown: str, tracking_uri: str, error: Exception) -> str:
    if _out_of_space(error):
        return _unwritable_store_message(source, shown, tracking_uri, error)
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0] if "://" in tracking_uri else ""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if scheme and scheme not in STORE_SCHEMES:
        reason = f"unknown scheme '{scheme}'; MLflow stores are {', '.join(STORE_SCHEMES)}"
    reason = mask_url(reason)[:200]
    status = getattr(error, "get_http_status_code", lambda: None)()
    if scheme in ("http", "https") and status in (401, 403):
        return (
            f"{source}='{shown}' refused the credentials (HTTP {status}); give the server's user and "
            "password as http://<user>:<password>@<host>:<port> or in MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or pass logger.required=false to train untracked"
        )
    return (
        f"{source}='{shown}' is not a tracking store MLflow can open ({reason}); use "
        "sqlite:///<path>/mlflow.db or http://<host>:<port>, or unset logger.tracking_uri and "
        "MLFLOW_TRACKING_URI to use the local store, or pass logger.required=false to train untracked"
    )


# what a full disk or a file-size limit (ulimit -f) looks like from MLflow's sqlite store
_OUT_OF_SPACE_ERRNOS = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_WORDS = ("disk i/o error", "database or disk is full", "file too large", "no space left", "quota exceeded")


def _out_of_space(error: BaseException) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(words in str(error).lower() for words in _OUT_OF_SPACE_WORDS):
            return True
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__
    return False


def _unwritable_store_message(source: str, shown: str, tracking_uri: str, error: Exception) -> str:
    """A sqlite store that could not be written: a full disk or a file-size limit. The
    default store is named as such: the user never typed its URI."""
    default = os.environ.get("MLFLOW_TRACKING_URI") != tracking_uri and tracking_uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    database = Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None
    subject = f"the default MLflow store {database} (logger.tracking_uri is not set)" if default else f"{source}='{shown}'"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if database is None:  # a server's store: its disk
        why = "the store's disk is full"
    elif limit != resource.RLIM_INFINITY:
        why = f"this process may write files of at most {limit} bytes: ulimit -f"
    else:
        folder = next((path for path in database.parents if path.exists()), Path.cwd())
        why = f"{shutil.disk_usage(folder).free // 2**20} MiB free on its disk"
    reason = mask_url(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    reason = re.sub(r"^\([\w.]+\)\s*", "", reason)[:120]  # SQLAlchemy's "(sqlite3.OperationalError) "
    return (
        f"{subject} could not be written ({reason}; {why}); free disk space or raise the file-size limit "
        "(ulimit -f), or set logger.tracking_uri=sqlite:///<path on a disk with room>/mlflow.db (or an "
        "http://<host>:<port> server), or pass logger.required=false to train untracked"
    )


def _new_sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite store that does not exist yet (this job will create it)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return None if database.exists() else database


def _remove_partial_store(database: Path | None) -> None:
    """Remove a sqlite store this job created and could not finish (e.g. on a full disk), and
    its journal files; a store that was there before is never touched."""
    if database is None:
        return
    for path in (database, *(database.with_name(database.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def credentials_to_environment(tracking_uri: str) -> str:
    """http(s)://user:password@host:port -> http(s)://host:port, with the user and password
    handed to MLflow the way it takes basic auth: MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (set in this process, so its later jobs and the processes it
    starts have them too). Left in the URI, the password would reach MLflow's own messages
    ("API request to http://user:password@... failed"). Other URIs come back as they are."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return tracking_uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _uri_source(tracking_uri: str) -> str:
    """Which setting a tracking URI came from, for messages."""
    if os.environ.get("MLFLOW_TRACKING_URI") == tracking_uri:
        return "MLFLOW_TRACKING_URI"
    return "logger.tracking_uri"


def _unreachable(tracking_uri: str) -> str | None:
    """Why an http(s) store does not answer GET /health, or None. The request goes to the
    URI's host and port, never to a user:password@ part, and carries the credentials as MLflow
    sends them (basic auth), in case a proxy in front of the server guards /health too."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(tracking_uri)
    health = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(health)
    username = urllib.parse.unquote(parts.username) if parts.username else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(parts.password) if parts.password is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return None if response.status == 200 else f"GET /health answered {response.status}"
    except urllib.error.HTTPError as error:
        return f"GET /health answered {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return mask_url(str(getattr(error, "reason", error)))


@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """Serialise the creation of a sqlite store: several jobs creating the same new database
    at once race in MLflow's schema migration."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _MetricSender:
    """Buffers metrics and sends them in log_batch calls from a background thread. While the
    store does not answer, values stay buffered in order and are retried with a growing pause
    (up to MAX_RETRY_PAUSE_S); close() leaves in unsent() what could not be sent."""

    def __init__(self, client, run_id: str, interval_s: float):
        self.client, self.run_id, self.interval_s = client, run_id, interval_s
        self.pending: list = []
        self.sending: list = []  # taken from pending by a log_batch call still under way
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.failures = 0  # failed attempts in a row
        self.last_error = ""
        self.thread = threading.Thread(target=self._work, name="runner-mlflow", daemon=True)
        self.thread.start()

    def add(self, metrics: list) -> None:
        with self.lock:
            self.pending.extend(metrics)

    def _work(self) -> None:
        while not self.closed:
            self.wake.wait(min(self.interval_s * 2**self.failures, MAX_RETRY_PAUSE_S))
            if not self.closed:
                self.send()

    def send(self) -> bool:
        with self.lock:
            batch, self.pending = self.pending, []
            self.sending = batch
        if not batch:
            return True
        for start in range(0, len(batch), METRICS_PER_BATCH):
            chunk = batch[start : start + METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as error:  # the store is down or hiccupped: keep the rest, in order
                with self.lock:
                    self.pending[:0] = batch[start:]
                    self.sending = []
                if not self.failures:
                    log.warning("MLflow did not take %d metric values (%s); keeping them and retrying", len(batch) - start, _first_line(error))
                self.failures += 1
                self.last_error = _first_line(error)
                return False
            with self.lock:
                self.sending = batch[start + METRICS_PER_BATCH :]
        if self.failures:
            log.info("MLflow takes metrics again after %d failed attempts", self.failures)
        self.failures = 0
        return True

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread and send what is left, unless the store is known to be gone. A
        thread still in a call to a store that does not answer is left behind (a daemon)."""
        self.closed = True
        self.wake.set()
        if self._store_gone():
            return
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.last_error = f"no answer within {timeout_s:.0f} s"
        elif not self._store_gone():
            self.send()

    def _store_gone(self) -> bool:
        """After a failed send, or during one, a quick probe (an http store's /health, 5 s at
        most) instead of waiting out MLflow's retries and timeouts again."""
        problem = _unreachable(self.client.tracking_uri) if self.failures or self.sending else None
        if problem:
            self.last_error = problem
        return bool(problem)

    def unsent(self) -> list:
        with self.lock:
            return self.sending + self.pending


class MLflowLogger(Callback):
    """One MLflow run per job: params, tags, metrics with their steps, artifacts, status."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        required: bool = True,
        log_checkpoint: bool = True,
        flush_interval_s: float = 2.0,
    ):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.required, self.log_checkpoint, self.flush_interval_s = required, log_checkpoint, flush_interval_s
        self.client = self.run_id = self.sender = None
        self.resume_run_id: str | None = None
        self.secrets: list[str] = []  # secret values in the config, redacted from uploaded text
        self.logged_steps: dict[str, int] = {}

    # ------------------------------------------------------------- run lifecycle
    def on_fit_start(self, loop):
        info = loop.info
        uri = default_tracking_uri(self.tracking_uri)
        experiment = experiment_name(self.experiment_name, info.get("choices", {}))
        self.client, experiment_id = connect(uri, experiment, self.required)
        if self.client is None:
            return
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent and self.experiment_name is None:  # nested runs live in their parent's experiment
            try:
                experiment_id = self.client.get_run(parent).info.experiment_id
                experiment = self.client.get_experiment(experiment_id).name
            except Exception as error:
                log.warning("MLflow parent run %s not found (%s); this run is not nested", parent, error)
        self.secrets = secret_values(loop.config)
        run_id = self.resume_run_id or _read_run_id(info["output_dir"])
        if run_id and self._reopen(run_id):
            log.info("continuing MLflow run %s", run_id)
            self._log_changed_params(loop.config)
        else:
            run = self.client.create_run(experiment_id, run_name=self.run_name or info.get("run_name") or _run_name(info), tags=_tags(loop))
            self.run_id = run.info.run_id
            try:
                self._log_params(loop.config)
            except BaseException:  # the store refused the params: never leave the run RUNNING
                self.client.set_terminated(self.run_id, status="FAILED")
                raise
        (info["output_dir"] / "mlflow_run_id").write_text(self.run_id + "\n")
        self.sender = _MetricSender(self.client, self.run_id, self.flush_interval_s)
        log.info("MLflow run %s in %s (experiment '%s')", self.run_id, mask_url(uri), experiment)

    def _reopen(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            log.warning("MLflow run %s of this output directory is gone from the store; starting a new one", run_id)
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        # a crash can come after metrics were sent but before the checkpoint that the job
        # resumes from: never send a step twice
        for key in run.data.metrics:
            self.logged_steps[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        return True

    def _log_params(self, config: dict) -> None:
        """The resolved config as dotted keys, secrets masked (schema.mask_secrets); the
        .hydra/config.yaml on disk keeps what Hydra wrote."""
        self._send_params(_params(config))

    def _send_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = []
        for key, value in sorted(params.items()):
            if len(key) > MAX_KEY_LENGTH:
                log.warning("param %s... not logged to MLflow: keys are limited to %d characters", key[:60], MAX_KEY_LENGTH)
                continue
            entries.append(Param(key, value))
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[start : start + PARAMS_PER_BATCH])

    def _log_changed_params(self, config: dict) -> None:
        """A run resumed with other settings (trainer.max_epochs=4 after 2). MLflow params are
        written once and keep the first values, so the values now in effect go to new params
        resume/<n>/<key> (n: the resumes that changed something, from 1) and the tag
        resume/<n> lists the changes; a resume with the same config logs nothing."""
        from mlflow.entities import RunTag

        logged = self.client.get_run(self.run_id).data.params
        numbered = [(int(key.split("/")[1]), key.split("/", 2)[2]) for key in logged if re.fullmatch(r"resume/\d+/.+", key)]
        in_effect = {key: value for key, value in logged.items() if not key.startswith("resume/")}
        for number, key in sorted(numbered):
            in_effect[key] = logged[f"resume/{number}/{key}"]
        now = {key: value for key, value in _params(config).items() if len(key) <= MAX_KEY_LENGTH}  # as first logged
        changed = {key: value for key, value in now.items() if in_effect.get(key) != value}
        removed = sorted(key for key in in_effect if key not in now and in_effect[key] != REMOVED)
        if not changed and not removed:
            return
        number = max((n for n, _ in numbered), default=0) + 1
        changed |= {key: REMOVED for key in removed}
        self._send_params({f"resume/{number}/{key}": value for key, value in changed.items()})
        summary = ", ".join(f"{key}: {in_effect.get(key, '(unset)')} -> {value}" for key, value in sorted(changed.items()))
        self.client.log_batch(self.run_id, tags=[RunTag(f"resume/{number}", _truncate(summary))])
        log.info("MLflow params keep the first values; this resume's are params resume/%d/...: %s", number, _truncate(summary)[:500])

    def on_log(self, loop, metrics):
        if self.sender is None:
            return
        from mlflow.entities import Metric

        step, now = loop.state.step, int(time.time() * 1000)
        self.sender.add(
            [Metric(key, float(value), now, step) for key, value in metrics.items() if step > self.logged_steps.get(key, -1)]
        )

    def on_run_end(self, loop, status, error):
        if self.sender is None:
            return
        sender, self.sender = self.sender, None
        sender.close()
        # a store still gone: skip the uploads, each would wait out MLflow's retries
        problem = _unreachable(self.client.tracking_uri) if sender.unsent() else None
        ended = False
        if problem is None:
            try:
                self._end_run(loop, status, error)
                ended = True
            except Exception as failure:  # training's results are on disk: report, never crash
                problem = _first_line(failure)
        if sender.unsent() or not ended:
            log.warning(self._gap_report(loop, status, sender.unsent(), problem or sender.last_error, ended))

    def _end_run(self, loop, status, error) -> None:
        from mlflow.entities import RunTag

        if error is not None:
            text = f"{type(error).__name__}: {error}"
            self.client.log_batch(self.run_id, tags=[RunTag("runner.error", text[:5000])])
        self._log_artifacts(loop.info["output_dir"], loop.checkpoint_dir, loop.info.get("artifacts", []))
        self._log_model(loop.info.get("export"))
        self.client.set_terminated(self.run_id, status=status)

    def _gap_report(self, loop, status: str, unsent: list, problem: str, ended: bool) -> str:
        """One line at the end: what the store lacks, and where the job's own files are."""
        lost = []
        if unsent:
            steps = [metric.step for metric in unsent]
            lost.append(f"{len(unsent)} metric values of steps {min(steps)}-{max(steps)} were not sent")
        if not ended:
            lost.append(f"the run could not be marked {status} (it stays RUNNING there)")
        output_dir = loop.info["output_dir"]
        kept = [name for name in ("checkpoints/last.pt", "metrics.json") if (output_dir / name).is_file()]
        return (
            f"MLflow run {self.run_id} is incomplete: the tracking store {mask_url(self.client.tracking_uri)} stopped "
            f"answering ({problem}); {' and '.join(lost)}. The job's files on disk are unaffected: {output_dir}"
            + (f" ({', '.join(kept)})" if kept else "")
        )

    def _log_model(self, export: dict | None) -> None:
        """The model runner.export.ExportModel exported and checked, as this run's MLflow
        model: mlflow.pyfunc.load_model("runs:/<run id>/model") loads it without runner."""
        if not export or not export.get("mlflow_model") or not export.get("torchscript"):
            return
        from runner.export import log_mlflow_model

        try:
            log.info("MLflow model %s", log_mlflow_model(self.client.tracking_uri, self.run_id, export))
        except Exception as error:
            log.warning("could not log the exported model to MLflow: %s", error)

    def _log_artifacts(self, output_dir: Path, checkpoint_dir: Path, extra: list | None = None) -> None:
        """The job's files, and the (path, artifact folder) pairs callbacks listed in
        loop.info["artifacts"] (e.g. the profiler's trace)."""
        files = [(path, "hydra") for path in sorted((output_dir / ".hydra").glob("*.yaml"))]
        files += [(path, None) for path in sorted(output_dir.glob("*.log"))]
        files += [(output_dir / name, None) for name in ("confusion_matrix.png", "metrics.json")]
        if self.log_checkpoint:
            files.append((checkpoint_dir / "best.pt", "checkpoints"))
        files += [(Path(path), folder) for path, folder in extra or []]
        for path, folder in files:
            if path.is_file():
                try:
                    _upload(self.client, self.run_id, path, folder, self.secrets)
                except Exception as error:
                    log.warning("could not upload %s to MLflow: %s", path.name, error)

    def state_dict(self):
        return {"run_id": self.run_id}

    def load_state_dict(self, state):
        self.resume_run_id = state.get("run_id")


class TensorBoardLogger(Callback):
    """TensorBoard event files: every metric the loop logs, as a scalar at the current
    optimizer step (the steps MLflow records), and the resolved config as text and hparams.
    Browse with `tensorboard --logdir <output_dir>/tensorboard` (or a sweep's directory)."""

    def __init__(self, log_dir: str | None = None, flush_secs: int = 10):
        try:
            import tensorboard  # noqa: F401  (an optional extra; torch's SummaryWriter needs it)
        except ImportError:
            raise ConfigError(
                f"logger: '{__name__}.TensorBoardLogger' needs the tensorboard package, which is not "
                "installed; install it with pip install 'runner[tensorboard]', or use logger=mlflow"
            ) from None
        self.log_dir = relative_path(log_dir or "tensorboard", "logger.log_dir")  # inside the output directory
        self.flush_secs = flush_secs
        self.writer = None

    def on_fit_start(self, loop):
        from omegaconf import OmegaConf
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        path = loop.info["output_dir"] / self.log_dir
        # a resumed job adds an event file to the same directory; TensorBoard reads them as one run
        self.writer = SummaryWriter(str(path), flush_secs=self.flush_secs)
        config = mask_secrets(loop.config)
        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(config) + "```", loop.state.step)
        params = {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in flatten(config).items()}
        objectives = {name: 0.0 for name in objective_names(loop.config.get("optimized_metric", "val/acc"))}
        for summary in hparams(params, objectives):  # the HParams tab: only names are read from objectives
            self.writer.file_writer.add_summary(summary)

    def on_log(self, loop, metrics):
        if self.writer is None:
            return
        step = loop.state.step
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def on_run_end(self, loop, status, error):
        if self.writer is None:
            return
        if error is not None:
            self.writer.add_text("error", f"{status}: {type(error).__name__}: {error}", loop.state.step)
        self.writer.close()
        self.writer = None


def mlflow_config(logger: Any) -> Any:
    """The MLflowLogger settings in the logger config: the logger itself, or one of several
    named loggers (logger=mlflow_tensorboard); None when MLflow is not among them."""
    target = f"{__name__}.MLflowLogger"
    if not logger or logger.get("_target_") == target:
        return logger or None
    if "_target_" in logger:
        return None
    return next((entry for entry in logger.values() if isinstance(entry, (dict, DictConfig)) and entry.get("_target_") == target), None)


MLFLOW_UI_PORT = "5000"  # the port `mlflow ui` listens on unless given --port or $MLFLOW_PORT


def ui_rows(tracking_uri: str, experiment_id: str, run_id: str) -> list[tuple[str, str]]:
    """(label, text) rows saying where to see a run: a server's own run page; for a local
    store, the command that serves the UI (with the port spelled out) and the page it serves."""
    import shlex

    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = mask_url(tracking_uri)  # printed: never a password
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):  # a server already serves the UI, at its own address
        return [("run page", urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", "")) + page)]
    if parts.scheme.startswith("databricks"):
        return []
    port = os.environ.get("MLFLOW_PORT") or MLFLOW_UI_PORT
    host = os.environ.get("MLFLOW_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    command = f"mlflow ui --backend-store-uri {shlex.quote(uri)} --port {port}"  # a path with spaces stays one argument
    return [("to open the UI, run", command), ("then open", f"http://{host}:{port}/{page}")]


REMOVED = "(removed)"  # the value of a resume/<n>/<key> param whose key the resumed config lacks


def _params(config: dict) -> dict[str, str]:
    """The config as MLflow params: dotted keys, secrets masked, long values truncated."""
    return {key: _truncate(value) for key, value in flatten(mask_secrets(config)).items()}


def _read_run_id(output_dir: Path, name: str = "mlflow_run_id") -> str | None:
    path = output_dir / name
    return path.read_text().strip() if path.is_file() else None


def _run_name(info: dict) -> str:
    """model-loss-xxxxxx: MLflow's own random names come from the `random` module, which
    the job has just seeded, so every run would get the same one."""
    import uuid

    choices = info.get("choices", {})
    parts = [choices.get(group) for group in ("experiment", "model", "loss") if choices.get(group)]
    return "-".join([*parts, uuid.uuid4().hex[:6]])


def _tags(loop) -> dict[str, str]:
    import torch

    info = loop.info
    tags = {f"choice.{group}": str(option) for group, option in info.get("choices", {}).items() if not group.startswith("hydra")}
    tags["overrides"] = " ".join(mask_override(override) for override in info.get("overrides", [])) or "(none)"
    tags["output_dir"] = str(info["output_dir"])
    if info.get("job_num") is not None:
        tags["hydra.job.num"] = str(info["job_num"])
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    tags["torch.version"] = torch.__version__
    tags["torch.cuda"] = str(torch.version.cuda)
    tags["device"] = torch.cuda.get_device_name(loop.device) if loop.device.type == "cuda" else loop.device.type
    tags["runner.optimized_metric"] = str(loop.config.get("optimized_metric"))
    tags.update(_git())
    return tags


def _git() -> dict[str, str]:
    """Commit and dirty flag of the git checkout the job was launched from, if any."""
    try:
        commit = _run_git("rev-parse", "HEAD", timeout=5)
        dirty = _run_git("status", "--porcelain", "--untracked-files=no", timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def _run_git(*args: str, timeout: float) -> str:
    """git with nothing a config or the environment can steer: a clean environment (no GIT_*,
    no HOME or XDG config, no system config), no fsmonitor command, no hooks, no pager."""
    git = shutil.which("git", path=os.defpath) or shutil.which("git") or "git"  # the system's first
    environment = {"PATH": os.defpath, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
                   "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    command = [git, "-c", "core.fsmonitor=false", "-c", f"core.hooksPath={os.devnull}", "-c", "core.pager=cat",
               "--no-pager", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True, env=environment,
                          stdin=subprocess.DEVNULL).stdout.strip()


TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".log", ".txt", ".md", ".csv")


def _upload(client, run_id: str, path: Path, folder: str | None, secrets: list[str]) -> None:
    """Upload a file as an artifact; a text file holding a secret value is uploaded as a
    redacted copy, a checkpoint with the secrets masked in its stored config (the files on
    disk stay as they are)."""
    import tempfile

    checkpoint = folder == "checkpoints" and path.suffix == ".pt"  # not export/model.pt (TorchScript)
    if not secrets or not (checkpoint or path.suffix in TEXT_SUFFIXES):
        client.log_artifact(run_id, str(path), folder)
        return
    with tempfile.TemporaryDirectory(prefix="runner-redacted-") as scratch:
        copy = Path(scratch) / path.name
        if checkpoint:
            import torch

            payload = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(payload, dict) and isinstance(payload.get("config"), dict):
                payload["config"] = mask_secrets(payload["config"])
            torch.save(payload, copy)
        else:
            copy.write_text(redact(path.read_text(errors="replace"), secrets))
        client.log_artifact(run_id, str(copy), folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _truncate(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - len(TRUNCATED)] + TRUNCATED


class SweepRun(HydraCallback):
    """Hydra callback: a --multirun becomes one MLflow parent run with every job nested
    under it, and a summary (CSV of jobs, best job, a plot) logged to it when the sweep ends.

    Runs in the process that launches the jobs. The parent's id reaches the jobs through the
    environment, which in-process (basic), local-subprocess and Slurm launchers all pass on.
    Creating the store and experiment here, before any job starts, also keeps parallel jobs
    from racing to create a new database.
    """

    def __init__(self):
        self.client = self.run_id = None
        self.secrets: list[str] = []

    def on_multirun_start(self, config, **kwargs):
        from runner.search import check_sweep_or_exit

        check_sweep_or_exit(config)  # bad sweep input stops here, before a parent run or a trial exists
        logger = mlflow_config(config.get("logger"))
        if logger is None or not is_rank_zero():
            return  # under torchrun every rank runs the sweep; rank 0 alone records it
        choices = config.hydra.runtime.choices
        experiment = experiment_name(logger.experiment_name, choices)
        self.client, experiment_id = connect(default_tracking_uri(logger.tracking_uri), experiment, logger.required)
        if self.client is None:
            return
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.secrets = secret_values(OmegaConf.to_container(config, resolve=False))
        self.metric = objective_names(config.get("optimized_metric", "objective"))[0]
        tags = {
            "runner.sweep": "true",
            "sweep_dir": str(self.sweep_dir.resolve()),
            "overrides": " ".join(mask_override(override) for override in config.hydra.overrides.task) or "(none)",
            "hydra.sweeper": str(config.hydra.sweeper.get("_target_")),
            "hydra.launcher": str(config.hydra.launcher.get("_target_")),
            "runner.optimized_metric": self.metric,
        }
        self.run_id = self._reopen(_read_run_id(self.sweep_dir, "mlflow_parent_run_id"))
        if self.run_id is None:
            run = self.client.create_run(experiment_id, run_name=f"sweep {self.sweep_dir.name}", tags=tags)
            self.run_id = run.info.run_id
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            (self.sweep_dir / "mlflow_parent_run_id").write_text(self.run_id + "\n")
        os.environ[PARENT_RUN_ENV] = self.run_id
        log.info("MLflow sweep run %s", self.run_id)

    def _reopen(self, run_id: str | None) -> str | None:
        """A resumed sweep (same sweep dir) continues its parent run."""
        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:
            return None
        log.info("continuing MLflow sweep run %s", run_id)
        return run_id

    def on_multirun_end(self, config, **kwargs):
        if self.run_id is None:
            return
        error = sys.exc_info()[1]  # set when the sweep itself is ending with an exception
        os.environ.pop(PARENT_RUN_ENV, None)
        try:
            self._summarise()
        finally:
            status = "FINISHED" if error is None else ("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            self.client.set_terminated(self.run_id, status=status)

    def _summarise(self) -> None:
        import csv

        from mlflow.entities import RunTag

        from runner.metrics import metric_direction
        from runner.plots import objective_per_job_png

        parent = self.client.get_run(self.run_id)
        children = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=10000
        )
        rows = sorted(
            (
                {
                    "job": int(child.data.tags.get("hydra.job.num", -1)),
                    "overrides": child.data.tags.get("overrides", ""),
                    "status": child.info.status,
                    "trial_state": child.data.tags.get("optuna.trial.state", ""),
                    self.metric: child.data.metrics.get("objective"),
                    "run_id": child.info.run_id,
                }
                for child in children
            ),
            key=lambda row: row["job"],
        )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        table = self.sweep_dir / "sweep_summary.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["job", "overrides", "status", "trial_state", self.metric, "run_id"])
            writer.writeheader()
            writer.writerows(rows)
        scored = [row for row in rows if row[self.metric] is not None and row["status"] == "FINISHED"]
        pick = min if metric_direction(self.metric) == "minimize" else max
        best = pick(scored, key=lambda row: row[self.metric]) if scored else None
        tags = [RunTag("jobs", str(len(rows))), RunTag("jobs.failed", str(sum(row["status"] != "FINISHED" for row in rows)))]
        if best:
            tags += [RunTag("best.job", str(best["job"])), RunTag("best.overrides", best["overrides"]), RunTag("best.run_id", best["run_id"])]
            self.client.log_metric(self.run_id, f"best/{self.metric}", best[self.metric])
            log.info("sweep best: job %d (%s) %s=%.4f", best["job"], best["overrides"], self.metric, best[self.metric])
        self.client.log_batch(self.run_id, tags=tags)
        plot = objective_per_job_png(
            [row["job"] for row in rows], [row[self.metric] for row in rows], self.metric,
            self.sweep_dir / "sweep_objective.png", best["job"] if best else None,
        )
        # this summary, multirun.yaml, and what the sweeper wrote (Optuna's trials and plots)
        for path in sorted(self.sweep_dir.iterdir()):
            if path.is_file() and path.suffix in (".csv", ".png", ".yaml"):
                _upload(self.client, self.run_id, path, None, self.secrets)


def tag_job_run(job_config: DictConfig | None, output_dir: str | None, tags: dict[str, str]) -> None:
    """Add tags to a finished job's MLflow run (found through its output directory)."""
    logger = mlflow_config(job_config.get("logger")) if job_config is not None else None
    run_id = _read_run_id(Path(output_dir)) if output_dir else None
    if not run_id or logger is None:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(credentials_to_environment(default_tracking_uri(logger.tracking_uri))).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as error:
        log.warning("could not tag MLflow run %s: %s", run_id, error)
