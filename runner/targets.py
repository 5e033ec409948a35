"""What a config file may build, judged by what each ``_target_`` *is*, not how it is spelled.

Every target is resolved to the object it names before anything is built, and that object
is judged:

* where it may come from: an installed distribution (runner, torch, a user's ``pip install``-ed
  package, ...), a package named in ``allowed_targets``, or a target typed on the command line
  for that key. Python's standard library never, and a module that is not installed (e.g. a
  folder in the launch directory) is refused by name, before it is imported;
* what it really is: its defining module and qualified name, so ``torch.functional.torch.load``
  is judged as ``torch.serialization.load``;
* its kind: each config key expects one (``model`` an ``nn.Module`` class, ``optimizer`` an
  ``Optimizer`` class, ``callbacks.*`` a runner ``Callback``, ...). A plain function builds only
  where runner declares it (``FACTORIES``) or where its return annotation is the expected kind
  (runner's data factories are annotated ``-> DataModule``). So ``torch.load``,
  ``torch.utils.collect_env.run`` or ``SummaryWriter`` are refused at every key: none of them is
  a model, loss, optimizer or callback.
"""

import importlib
import importlib.metadata
import inspect
import sys
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from runner.errors import ConfigError

# kinds by dotted name, imported when first needed (optuna is not imported on a plain run)
MODULE = "torch.nn.Module"
DATASET = "torch.utils.data.Dataset"
KINDS: dict[str, tuple[str, ...]] = {
    "model": (MODULE,),
    "loss": (MODULE,),
    "optimizer": ("torch.optim.Optimizer",),
    "scheduler": ("torch.optim.lr_scheduler.LRScheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"),
    "data": ("runner.data.DataModule",),
    "augmentation": ("runner.augment.BatchTransform",),
    "callbacks": ("runner.callbacks.Callback",),
    "logger": ("runner.callbacks.Callback",),
    "pruner": ("optuna.pruners.BasePruner",),
    "hydra.sweeper.sampler": ("optuna.samplers.BaseSampler",),
    "hydra.sweeper.pruner": ("optuna.pruners.BasePruner",),
}
# what a part's own building blocks may be (a loss's teacher, a model's backbone, a data
# option's per-sample transforms and datasets)
NESTED = (MODULE, DATASET)
# groups whose entries are named (callbacks.<name>._target_): the part is one level deeper
NAMED_GROUPS = ("callbacks", "augmentation", "logger")
# plain functions that build a part without a return annotation runner could read:
# "module.qualname" -> the kind they build
FACTORIES: dict[str, str] = {}
# inside installed packages, never from a config, whatever their kind: these load code,
# unpickle, write files anywhere, open network services or run whole jobs. Judged on the
# object's defining module, so an alias reached through another namespace is caught too.
DENIED_MODULES = (
    "torch.hub", "torch.serialization", "torch.package", "torch.utils.cpp_extension", "torch.utils.model_zoo",
    "torch.utils.tensorboard", "torch.utils.collect_env", "torch.jit", "torch.export", "torch.onnx",
    "torch.distributed", "torch.multiprocessing", "torch.library", "torch.ops", "torch.classes", "torch._",
    "runner.checkpoint", "runner.run", "runner.api", "runner.pipeline", "runner.build", "runner.bench",
    "runner.compare", "runner.__main__", "runner.plots", "runner.targets",
    # dataset classes that unpickle the files under their root (CIFAR's batches, LSUN's cache)
    "torchvision.datasets.cifar", "torchvision.datasets.lsun",
)

# the model builders of vision libraries (functions; their classes are judged like any other):
# timm.create_model and every timm entry point pass keyword arguments on to checkpoint_path,
# pretrained_cfg_overlay (any URL) and cache_dir; torchvision's builders take weights= and
# write TORCH_HOME. runner's own options pass the architecture's arguments only.
LIBRARY_BUILDERS = {
    "timm.": "use model=timm model.name=<name> (runner.models.TimmModel)",
    "torchvision.models.": "use model=torchvision model.name=<name> (runner.models.TorchvisionModel)",
}


@dataclass(frozen=True)
class Verdict:
    """A target that passed: the object and the name it really has."""

    obj: Any
    real_name: str


def judge(target: str, key: str, allowed: tuple[str, ...] = (), typed: bool = False) -> Verdict:
    """Resolve ``target`` (the value at config key ``key``, e.g. ``model._target_``) and judge
    it; a ConfigError naming the key, the target and the fix when it may not be built here."""
    part = key.removesuffix("._target_")
    if not _is_dotted(target):
        raise ConfigError(f"{key}='{target}' is not a dotted name; write e.g. {key}=my_pkg.models.Net")
    package = target.split(".")[0]
    if package in sys.stdlib_module_names:
        raise ConfigError(
            f"{key}='{target}' is in Python's standard library, which a config cannot open; "
            f"{part} must be {_kind_words(part)}"
        )
    if not (typed or _matches(target, allowed) or _installed(package)):
        raise ConfigError(
            f"{key}='{target}': package '{package}' is not installed, and not on the allow-list; "
            f"install it (pip install -e <its folder>), allow it with 'allowed_targets=[{package}.*]', "
            f"or type {key}={target} on the command line"
        )
    obj = _locate(target, key)
    real = real_name(obj)
    if real is None:
        raise ConfigError(f"{key}='{target}' is not a class or a function; {part} must be {_kind_words(part)}")
    if real.split(".")[0] in sys.stdlib_module_names:
        raise ConfigError(
            f"{key}='{target}' is '{real}' from Python's standard library, which a config cannot open; "
            f"{part} must be {_kind_words(part)}"
        )
    if any(real == denied or real.startswith(denied if denied.endswith(("_", ".")) else denied + ".") for denied in DENIED_MODULES):
        raise ConfigError(
            f"{key}='{target}' is '{real}', which can load code or write files, so runner does not build it "
            f"from a config; {part} must be {_kind_words(part)}"
        )
    builder = next((prefix for prefix in LIBRARY_BUILDERS if real.startswith(prefix)), None)
    if builder is not None and not inspect.isclass(obj):
        raise ConfigError(
            f"{key}='{target}' is '{real}', a builder whose arguments also load checkpoints, download from "
            f"URLs or write caches, so runner does not call it from a config; {LIBRARY_BUILDERS[builder]}"
        )
    kinds = expected_kinds(part)
    if not _is_kind(obj, real, kinds):
        what = "class" if inspect.isclass(obj) else "function"
        hint = ("; a function builds only where runner declares it, or where its return annotation is that kind"
                if what == "function" else "")
        raise ConfigError(f"{key}='{target}' is the {what} '{real}', but {part} must be {_kind_words(part)}{hint}")
    return Verdict(obj, real)


def expected_kinds(part: str) -> tuple[str, ...]:
    """The kinds a target at this config path may be: the group's own for the part itself,
    and for the part's building blocks also modules and datasets."""
    bare = part.split("[")[0]
    if bare.rsplit(".", 1)[-1] == "pruner":  # a sweep's pruner, also where a job's callback takes it
        return KINDS["pruner"]
    for prefix, kinds in sorted(KINDS.items(), key=lambda item: -len(item[0])):
        if bare == prefix or bare.startswith(prefix + "."):
            depth = 1 if prefix in NAMED_GROUPS else 0
            rest = part[len(prefix):].lstrip(".")
            is_part = (rest == "" and "[" not in part) or (depth == 1 and rest.count(".") == 0 and "[" not in rest)
            return kinds if is_part else kinds + NESTED
    return tuple(dict.fromkeys(kind for kinds in KINDS.values() for kind in kinds)) + NESTED


def real_name(obj: Any) -> str | None:
    """``module.qualname`` of a class or function, where it is defined."""
    if not (inspect.isclass(obj) or callable(obj)) or inspect.ismodule(obj):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    return f"{module}.{qualname}"


def _is_kind(obj: Any, real: str, kinds: tuple[str, ...]) -> bool:
    classes = [kind for kind in (_kind(name) for name in kinds) if kind is not None]
    if inspect.isclass(obj):
        return issubclass(obj, tuple(classes))
    if FACTORIES.get(real) in kinds:
        return True
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        returned = typing.get_type_hints(obj).get("return")
    except Exception:  # an annotation that does not resolve: no declared kind
        return False
    return inspect.isclass(returned) and issubclass(returned, tuple(classes))


@lru_cache(maxsize=None)
def _kind(name: str) -> type | None:
    module, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:  # e.g. optuna absent: nothing can be of that kind
        return None


def _locate(target: str, key: str) -> Any:
    """The object a dotted path names, found the way Hydra's instantiate finds it: attribute
    first, then the submodule of that name."""
    parts = target.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except Exception as error:
        raise ConfigError(f"{key}='{target}' cannot be imported ({type(error).__name__}: {error}); check the spelling, or install its package") from None
    for index, attribute in enumerate(parts[1:], start=1):
        if hasattr(obj, attribute):
            obj = getattr(obj, attribute)
            continue
        if not inspect.ismodule(obj):
            raise ConfigError(f"{key}='{target}' cannot be found: '{'.'.join(parts[:index])}' has no '{attribute}'; check the spelling")
        name = ".".join(parts[: index + 1])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as missing:
            if missing.name != name:
                raise ConfigError(f"{key}='{target}' cannot be imported ({missing}); install what it needs") from None
            raise ConfigError(f"{key}='{target}' cannot be found: '{'.'.join(parts[:index])}' has no '{attribute}'; check the spelling") from None
        except Exception as error:
            raise ConfigError(f"{key}='{target}' cannot be imported ({type(error).__name__}: {error})") from None
    return obj


@lru_cache(maxsize=None)
def _installed(package: str) -> bool:
    """Whether a top-level module belongs to an installed distribution (found without importing
    it): a distribution of that name (torch, runner: quick), else any distribution's top-level
    modules (sklearn in scikit-learn: reads every distribution's metadata once)."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return package in _top_level_modules()


@lru_cache(maxsize=1)
def _top_level_modules() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


def _matches(target: str, patterns: tuple[str, ...]) -> bool:
    return any(target == entry or (entry.endswith(".*") and target.startswith(entry[:-1])) for entry in patterns)


def _is_dotted(target: str) -> bool:
    return all(part.isidentifier() for part in target.split("."))


KIND_WORDS = {
    MODULE: "a torch.nn.Module class", DATASET: "a torch.utils.data.Dataset class",
    "torch.optim.Optimizer": "a torch.optim.Optimizer class",
    "torch.optim.lr_scheduler.LRScheduler": "an LR scheduler class (torch.optim.lr_scheduler)",
    "torch.optim.lr_scheduler.ReduceLROnPlateau": "",
    "runner.data.DataModule": "a data factory returning runner.data.DataModule",
    "runner.augment.BatchTransform": "a runner.augment.BatchTransform class",
    "runner.callbacks.Callback": "a runner.callbacks.Callback class",
    "optuna.samplers.BaseSampler": "an Optuna sampler class (optuna.samplers)",
    "optuna.pruners.BasePruner": "an Optuna pruner class (optuna.pruners)",
}


def _kind_words(part: str) -> str:
    words = [KIND_WORDS.get(kind, kind) for kind in expected_kinds(part)]
    return " or ".join(dict.fromkeys(word for word in words if word))
