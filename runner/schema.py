"""Typed schema of the keys runner owns (top level and ``trainer``).

Registered in Hydra's ConfigStore and listed first in ``conf/train.yaml``'s defaults, so a
typo (``trainer.max_epoch``) or a wrong type (``trainer.max_epochs=abc``) fails at compose
time with Hydra's message. The groups that build objects (data, model, ...) stay free-form:
their keys are the constructor arguments of their ``_target_``.

This module must not import torch: it is on the ``--help`` / ``--cfg job`` path.
"""

import hashlib
import importlib.resources
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf as HydraBasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, ListConfig, OmegaConf

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "ddp")
NONFINITE_POLICIES = ("error", "skip")
CLIP_ALGORITHMS = ("norm", "value")


@dataclass
class TrainerConf:
    # where to train: auto (CUDA when present, else CPU), cpu, cuda or cuda:N
    device: str = "auto"
    # auto: one process; ddp: DistributedDataParallel over the processes torchrun or Slurm
    # tasks started (data.batch_size is per process: the global batch is that x world size)
    strategy: str = "auto"
    # 32, bf16-mixed (autocast to bfloat16) or 16-mixed (float16 autocast + GradScaler)
    precision: str = "32"
    # wrap the model in torch.compile
    compile: bool = False
    # channels_last memory format for 4-D inputs (faster convolutions on CUDA tensor cores)
    channels_last: bool = False
    max_epochs: int = 10
    # stop after this many optimizer steps; -1: no limit
    max_steps: int = -1
    # micro-batches summed into one optimizer step
    accumulate_grad_batches: int = 1
    # clip gradients before each optimizer step; 0: off
    gradient_clip_val: float = 0.0
    # norm (clip_grad_norm_) or value (clip_grad_value_)
    gradient_clip_algorithm: str = "norm"
    # validate every N optimizer steps; 0: once at the end of each epoch
    val_check_interval: int = 0
    # use only the first N batches of an epoch / of an evaluation; -1: all
    limit_train_batches: int = -1
    limit_val_batches: int = -1
    # train on the same N batches every epoch (epoch 0's shuffled order; debug=overfit); 0: off.
    # Takes the place of limit_train_batches. A model and loss that cannot drive train/loss
    # towards 0 on them have a bug (as Lightning's overfit_batches; validation keeps its split)
    overfit_batches: int = 0
    seed: int = 0
    # seed python/numpy/torch and switch torch to deterministic algorithms
    deterministic: bool = False
    # CPU threads for torch's intra-op work (torch.set_num_threads). auto: 1 when a training
    # step is small (under 1 GFLOP, counted once on the model; more threads only wait on
    # each other), else this process's cores shared between the ranks of the machine
    # (runner/threads.py); a number sets it; 0 keeps torch's default
    num_threads: Union[int, str] = "auto"
    # a non-finite training loss: error (stop with a message) or skip (drop that step)
    nonfinite_loss: str = "error"
    # a progress line every N steps in runner.log (and on the terminal when it shows no
    # progress bar); 0: per epoch only
    log_every_n_steps: int = 50


@dataclass
class RunConf:
    # one object-building config per group; see conf/<group>/*.yaml
    data: Any = None
    model: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    augmentation: Any = None
    callbacks: Any = field(default_factory=dict)
    logger: Any = None
    trainer: TrainerConf = field(default_factory=TrainerConf)
    # the metric returned to a sweeper (e.g. val/acc, val/loss, test/acc), or a list of
    # metrics for a multi-objective search (e.g. [val/acc, model/params])
    optimized_metric: Any = "val/acc"
    # resume from this checkpoint; null: resume from <output_dir>/checkpoints/last.pt if present
    ckpt_path: Optional[str] = None
    # packages a config's _target_ may come from that are not installed (installed ones need nothing)
    allowed_targets: list = field(default_factory=list)
    # initial weights for the model from a runner checkpoint (its tensors whose names and
    # shapes match; a new head stays random); not a resume: optimizer and step start fresh
    init_from: Optional[str] = None
    # a multi-stage pipeline (conf/pipeline/): stages run as jobs in order; null: one job
    pipeline: Any = None


def objective_names(optimized_metric: Any) -> list[str]:
    """optimized_metric as a list: one name (the usual case) or several (multi-objective)."""
    if isinstance(optimized_metric, str):
        return [optimized_metric]
    return [str(name) for name in optimized_metric]


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for a nested dict: {"optimizer": {"lr": 1e-3}} -> {"optimizer.lr": 1e-3}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------ secrets
# What runner sends to a tracking store goes through mask_secrets (params) or mask_override
# (the overrides tag), and text artifacts through redact, so a credential typed into a
# config never leaves the machine. Three rules, each applied wherever a value goes:
# * a key is a secret when its last component names one, as a word of it (api_token,
#   db_password, apiKey, client_secret, aws_access_key, credentials, ssh_passphrase,
#   authorization, webhook_url, ...); pat, dsn, cookie and session (or session_id) count only
#   as the name's last word (github_pat, sentry_dsn, auth_cookie), because as its first word
#   they name a setting (session_length, cookie_name), and path, patience, pattern are other words;
# * a value is partly secret, whatever its key, where it holds a credential in a known shape:
#   the password of scheme://user:password@host, a credential query parameter (?token=,
#   &api_key=, ?key=, ?sig=), the path after a webhook's hooks/ or webhooks/ segment or on a
#   hooks.* host (Slack, Discord), and the token after "Bearer ";
# * a value read from the environment by ${oc.env:NAME} is a secret at its key and wherever
#   its text appears (remember_env_values, called with the unresolved job config).
MASK = "***"
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:token|password|passwd|passphrase|secret|authorization|api_?key|access_?key|private_?key"
    r"|credentials?|webhooks?)(?:$|_)"
    r"|(?:^|_)(?:pat|dsn|cookies?|session(?:_?id)?)$"
)
# scheme://user:password@host: the password part (userinfo cannot hold an unescaped / or @)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)@", re.IGNORECASE)
_URL = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s'\"<>]+", re.IGNORECASE)
_BEARER = re.compile(r"\bbearer\s+(?P<token>[A-Za-z0-9\-._~+/]{8,}=*)", re.IGNORECASE)
# query parameters that carry a credential besides the secret key names (Google's ?key=, signed URLs' sig)
_QUERY_SECRETS = ("key", "sig", "signature", "auth")
_HOOK_SEGMENT = re.compile(r"(?:web)?hooks?|webhook\w*", re.IGNORECASE)
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")
# what ${oc.env:...} put into this process's job configs: the keys (paths) and the values
_env_keys: set[tuple] = set()
_env_values: set[str] = set()


def is_secret_key(key: str) -> bool:
    """True for a dotted key whose last component looks like a credential's name."""
    name = str(key).lstrip("+~").rsplit(".", 1)[-1]
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).replace("-", "_").lower()  # apiKey -> api_key
    return bool(_SECRET_KEY.search(name))


def _url_spans(url: str, offset: int) -> list[tuple[int, int]]:
    """Where a URL holds a credential: credential query values and a webhook's secret path."""
    spans = []
    rest_start = url.index("://") + 3
    end_of_path = next((i for i, char in enumerate(url) if char in "?#" and i >= rest_start), len(url))
    slash = url.find("/", rest_start, end_of_path)
    host = url[rest_start : slash if slash >= 0 else end_of_path].rpartition("@")[2].lower()
    if slash >= 0 and url.lower().startswith(("http://", "https://")):
        if host.startswith("hooks.") or "webhook" in host:  # hooks.slack.com/services/T../B../secret
            start = slash + 1
        else:  # discord.com/api/webhooks/<id>/<token>, example.com/hooks/<secret>
            start, position = None, slash + 1
            for segment in url[slash + 1 : end_of_path].split("/"):
                position += len(segment) + 1
                if _HOOK_SEGMENT.fullmatch(segment):
                    start = position
                    break
        if start is not None and start < end_of_path:
            spans.append((offset + start, offset + end_of_path))
    if end_of_path < len(url) and url[end_of_path] == "?":
        query_end = url.find("#", end_of_path)
        query_end = len(url) if query_end < 0 else query_end
        position = end_of_path + 1
        for pair in re.split(r"[&;]", url[end_of_path + 1 : query_end]):
            name, equals, value = pair.partition("=")
            if equals and value and (is_secret_key(name) or name.lower() in _QUERY_SECRETS):
                start = position + len(name) + 1
                spans.append((offset + start, offset + start + len(value)))
            position += len(pair) + 1
    return spans


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """Where a text holds a credential in a known shape, as sorted, non-overlapping spans."""
    spans = [match.span("password") for match in _URL_PASSWORD.finditer(text)]
    spans += [match.span("token") for match in _BEARER.finditer(text)]
    for match in _URL.finditer(text):
        spans += _url_spans(match.group(), match.start())
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def mask_url(text: str) -> str:
    """The credentials in a text masked: scheme://user:password@host -> scheme://user:***@host,
    ?token=abc -> ?token=***, https://hooks.slack.com/services/... -> https://hooks.slack.com/***,
    Bearer abc... -> Bearer ***."""
    if not isinstance(text, str):
        return text
    for start, end in reversed(_secret_spans(text)):
        text = text[:start] + MASK + text[end:]
    return text


def remember_env_values(config: Any) -> None:
    """Note what ${oc.env:NAME} interpolations in an unresolved job config read: their keys
    and the variables' values become secrets for mask_secrets and secret_values. Call it with
    the config before it is resolved (runner.run does); what Hydra writes to .hydra/ keeps the
    ${oc.env:...} text, not the value."""
    raw = OmegaConf.to_container(config, resolve=False) if OmegaConf.is_config(config) else config

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, str(key)))
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, (*path, index))
        elif isinstance(node, str) and _ENV_REFERENCE.search(node):
            _env_keys.add(path)
            _env_values.update(_env_values_in(node))

    walk(raw, ())


def _env_values_in(text: str) -> list[str]:
    """The values of the environment variables that ${oc.env:NAME} references in text read."""
    import os

    return [os.environ[name] for name in _ENV_REFERENCE.findall(text) if os.environ.get(name)]


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        for secret in sorted(_env_values, key=len, reverse=True):
            if value == secret or len(secret) >= 3:
                value = value.replace(secret, MASK)
        return mask_url(value)
    return value


def mask_secrets(config: Any, _path: tuple = ()) -> Any:
    """A copy of a nested config in which the values of secret keys and of keys set from
    ${oc.env:...} (whole subtrees) are MASK and credentials inside values are masked; unset
    values (null, "") stay as they are."""
    if isinstance(config, dict):
        return {
            key: MASK if (is_secret_key(key) or (*_path, str(key)) in _env_keys) and value not in (None, "")
            else mask_secrets(value, (*_path, str(key)))
            for key, value in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [MASK if (*_path, index) in _env_keys and value not in (None, "") else mask_secrets(value, (*_path, index))
                for index, value in enumerate(config)]
    return _mask_value(config)


def mask_override(override: str) -> str:
    """A command-line override with a secret's value masked: +db.password=x -> +db.password=***."""
    key, equals, value = str(override).partition("=")
    if equals and value and is_secret_key(key):
        return f"{key}={MASK}"
    return key + equals + _mask_value(value)


def secret_values(config: Any) -> list[str]:
    """The secret strings in a nested config (values of secret keys, credentials inside
    values, what ${oc.env:...} read), longest first: what redact removes from text before it
    is uploaded."""
    found: set[str] = set(_env_values)

    def walk(node: Any, secret: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, secret or is_secret_key(key))
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, secret)
        elif node not in (None, ""):
            text = str(node)
            if secret:
                found.add(text)
            found.update(text[start:end] for start, end in _secret_spans(text))
            found.update(_env_values_in(text))  # an unresolved config: ${oc.env:NAME}'s value

    walk(config, False)
    # a value of one or two characters would mangle every file it is removed from; the
    # params and tags still mask it
    return sorted((value for value in found if len(value) >= 3), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return mask_url(text)


def _tensor_file_info(path: str, key: str) -> Any:
    """OmegaConf resolver: facts about a user's data file, read when first interpolated."""
    from runner.data.tensors import file_info  # lazy: only a job that uses data=tensors pays

    return file_info(path)[key]


def _table_file_info(key: str, *, _parent_: Any) -> Any:
    """OmegaConf resolver ${table_file:num_classes} (or input_shape, task, class_names) in
    data=table: read from the data node it sits in, since the path, target, features,
    categorical, task and split keys all change the answer; the file is read once per process."""
    from runner.data.table import table_info

    return table_info(_parent_)[key]


def _image_folder_shape(root: str, channels: Any, image_size: Any, extensions: Any) -> list[int]:
    """OmegaConf resolver: [C, H, W] of an image folder's samples (channels from the headers
    when data.channels is null)."""
    from runner.data.image_folder import published_shape

    return published_shape(root, channels, image_size, extensions)


def _audio_shape(features: str, sample_rate: Any, duration: Any, hop_length: Any, n_mels: Any, multi_n_ffts: Any) -> list[int]:
    """OmegaConf resolver ${audio_shape:...}: an audio folder's sample shape, from its keys
    alone (every clip is resampled, cut and padded to the same size)."""
    from runner.data.audio_folder import feature_shape

    return feature_shape(features, sample_rate, duration, hop_length, n_mels, multi_n_ffts)


def _shard_facts(key: str, *, _parent_: Any) -> Any:
    """OmegaConf resolver ${shard_facts:num_classes|input_shape} in data=shards: read from the
    shards the data node names (labels and the first sample), once per process."""
    from runner.data.shards import published

    return published(_parent_, key)


def _hf_facts(key: str, *, _parent_: Any) -> Any:
    """OmegaConf resolver ${hf_facts:num_classes|input_shape} in data=hf: read from the saved
    dataset the data node names (its path, input, label, and the image or audio settings that
    shape a sample), once per process."""
    from runner.data.hf import published

    return published(_parent_, key)


def _folder_classes(root: str, suffixes: Any) -> int:
    """OmegaConf resolver ${folder_classes:${data.root},${data.extensions}}: how many class
    folders a class-folder tree has (image and audio folders), from names only, cached."""
    from runner.data.folders import class_names, suffixes as normalised

    return len(class_names(root, normalised(suffixes)))


def study_name(*, _root_: Any) -> str:
    """Resolver: a study name that stays the same when the same sweep command is run again
    (so it resumes), in the launching process and in every job alike.

    Made of the hparams_search preset and a digest of what defines the study: the search
    space, the sampler, direction and metric, and the overrides that are not searched over.
    Run-length settings (n_trials, n_jobs, storage) and per-job overrides do not count.
    """
    hydra = _root_.hydra
    params = hydra.sweeper.get("params")  # None with hydra/sweeper=runner_optuna and no preset
    space = OmegaConf.to_container(params, resolve=True) if params else {}
    kept = sorted(
        override for override in hydra.overrides.task
        if not override.split("=")[0].lstrip("+~").startswith(("hydra.", "hydra/", "hparams_search"))
        and override.split("=")[0].lstrip("+~") not in space
    )
    sampler = hydra.sweeper.get("sampler")
    sampler = sampler if isinstance(sampler, str) else OmegaConf.select(hydra.sweeper, "sampler._target_")
    defining = [kept, space, str(sampler), str(hydra.sweeper.get("direction")), str(_root_.get("optimized_metric"))]
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{hydra.runtime.choices.get('hparams_search') or 'sweep'}-{digest}"


@dataclass
class SweeperConf(OptunaSweeperConf):
    """runner's Optuna sweeper: the plugin's keys and search-space syntax, plus pruning,
    persistent storage by default, resume, and a failure budget over the whole sweep."""

    _target_: str = "runner.sweeper.Sweeper"
    # a hydra/sweeper/sampler config, or a bare name: tpe, random, gp, cmaes, qmc, nsgaii, grid
    sampler: Any = MISSING  # MISSING, not None: the sampler group's content must win
    # seed of a sampler given by name
    seed: Optional[int] = None
    # an optuna.pruners config (pruner=median|hyperband|successive_halving|none)
    pruner: Any = None
    # null: sqlite:///<sweep dir>/optuna.db
    storage: Any = None
    study_name: Optional[str] = "${runner_study_name:}"
    # stop the sweep when more than this fraction of its finished trials failed
    max_failure_rate: float = 0.5
    # trials launched together (parallel where the launcher runs jobs in parallel)
    n_jobs: int = 1


@dataclass
class BasicSweeperConf(HydraBasicSweeperConf):
    """Hydra's basic sweeper (a plain -m), with deletions (~key) handed to the jobs as typed
    (runner/sweeper.py); the default hydra/sweeper of conf/train.yaml."""

    _target_: str = "runner.sweeper.BasicSweeper"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="runner_schema", node=RunConf)
    store.store(group="hydra/sweeper", name="runner_basic", node=BasicSweeperConf, provider="runner")
    # listed early in conf/train.yaml's defaults: hparams_search=... and hydra/sweeper=... override it
    store.store(name="runner_sweeper", node={"defaults": [{"override /hydra/sweeper": "runner_basic"}]}, provider="runner")
    store.store(group="hydra/sweeper", name="runner_optuna", node=SweeperConf, provider="runner")
    # not use_cache: OmegaConf caches on the literal "${data.path}", not on its value
    OmegaConf.register_resolver("tensor_file", _tensor_file_info, replace=True)
    OmegaConf.register_resolver("table_file", _table_file_info, replace=True)
    OmegaConf.register_resolver("folder_classes", _folder_classes, replace=True)
    OmegaConf.register_resolver("shard_facts", _shard_facts, replace=True)
    OmegaConf.register_resolver("hf_facts", _hf_facts, replace=True)
    OmegaConf.register_resolver("image_folder_shape", _image_folder_shape, replace=True)
    OmegaConf.register_resolver("audio_shape", _audio_shape, replace=True)
    OmegaConf.register_resolver("runner_study_name", study_name, replace=True)
    OmegaConf.register_resolver("runner_groups", config_groups_help, replace=True)


# ------------------------------------------------------------------ --help listing
# Config sources whose groups --help lists: runner's conf/, --config-dir, hydra.searchpath;
# not Hydra's own (hydra/help, hydra/job_logging, ...) nor structured configs.
_HIDDEN_PROVIDERS = ("hydra", "schema")
# a sentence ends at . ! ? followed by a capital: "Lin et al. 2017" and "e.g. data=..." go on
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def config_groups_help(*, _root_: Any) -> str:
    """Resolver for --help (``${runner_groups:}`` in hydra.help.template): every config group
    with its options, one line each, taken from the option file's leading comment, so the
    files stay the one place that says what an option does. ``*`` marks this command's choice.

    Reads the files of the config search path (runner's package, --config-dir,
    hydra.searchpath) directly: a few dozen small files, no torch, no instantiation.
    """
    sources = OmegaConf.select(_root_, "hydra.runtime.config_sources", default=None)
    sources = sources or [{"path": "runner.conf", "schema": "pkg", "provider": "main"}]
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) or {}
    options: dict[str, dict[str, str]] = {}
    for source in sources:
        if source["provider"] in _HIDDEN_PROVIDERS:
            continue
        directory = _source_directory(source["schema"], source["path"])
        for group, name, text in _group_files(directory) if directory is not None else ():
            options.setdefault(group, {}).setdefault(name, _summary(text))  # first source wins, as in Hydra
    # a terminal's width; piped into less or grep, longer lines (and a cut still readable)
    width = max(60, shutil.get_terminal_size().columns) if sys.stdout.isatty() else 120
    lines = []
    for group in sorted(options, key=lambda g: (g.startswith("hydra/"), g)):
        chosen = choices.get(group)
        chosen = set(chosen) if isinstance(chosen, (list, ListConfig)) else {chosen}
        column = max(map(len, options[group]))
        lines.append(f"{group}:")
        for name, summary in sorted(options[group].items()):
            line = f"  {'*' if name in chosen else ' '} {name:<{column}}  {summary}".rstrip()
            lines.append(line if len(line) <= width else line[: width - 3] + "...")
    # Hydra puts the template through string.Template: a literal $ must be $$
    return "\n".join(lines).replace("$", "$$")


def _source_directory(schema: str, path: str) -> Any:
    """The directory of one config source: a package (pkg://runner.conf) or a folder."""
    if schema == "file":
        return Path(path) if Path(path).is_dir() else None
    if schema != "pkg":
        return None
    module, _, below = path.partition("/")  # pkg://package.name[/folder]
    try:
        directory = importlib.resources.files(module)
    except (ModuleNotFoundError, TypeError):
        return None
    return directory.joinpath(*below.split("/")) if below else directory


def _group_files(directory: Any, prefix: str = ""):
    """(group, option, text) for every YAML file below directory; files at the top are
    primary configs (train.yaml), not options."""
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_dir():
            yield from _group_files(entry, f"{prefix}{entry.name}/")
        elif prefix and entry.name.endswith((".yaml", ".yml")):
            yield prefix.rstrip("/"), entry.name.rsplit(".", 1)[0], entry.read_text()


def _summary(text: str) -> str:
    """The first sentence of a config file's leading comment (its prose lines, after any
    '# @package' line); the _target_ when the file has no leading comment."""
    prose: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package"):
            continue
        if prose and (not body.strip() or body.startswith("  ")):  # a blank or an indented example ends it
            break
        prose.append(body.strip())
        if _SENTENCE_END.search(" ".join(prose)) or prose[-1].endswith((".", ":")):
            break
    sentence = _SENTENCE_END.split(" ".join(prose), maxsplit=1)[0].rstrip(":").strip()
    if sentence:
        return sentence
    target = re.search(r"^_target_:\s*(\S+)", text, re.MULTILINE)
    return target.group(1) if target else ""


register()
