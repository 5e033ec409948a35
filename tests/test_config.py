"""Every config file composes and builds; typed keys fail at compose time."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from runner.build import build, build_pruner, build_sampler
from runner.loop import Parts
from runner.losses import bind_context
from tests.conftest import TINY, compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(
    (path.parent.relative_to(CONF).as_posix(), path.stem) for path in CONF.rglob("*.yaml") if path.parent != CONF
)

# files that only make sense beside other choices (a spectrogram augmentation needs
# spectrogram data): the overrides each is composed with here, one line per file
COMPANIONS: dict[tuple[str, str], list[str]] = {
    # physics-informed parts come together: times in, one output, a regression objective
    ("data", "ode"): ["model=pinn", "loss=physics", "optimized_metric=val/rel_l2", "callbacks.checkpoint.monitor=val/rel_l2", "callbacks.checkpoint.mode=min", "callbacks.early_stopping.monitor=val/rel_l2", "callbacks.early_stopping.mode=min"],
    ("model", "pinn"): ["data=ode", "loss=physics", "optimized_metric=val/rel_l2", "callbacks.checkpoint.monitor=val/rel_l2", "callbacks.checkpoint.mode=min", "callbacks.early_stopping.monitor=val/rel_l2", "callbacks.early_stopping.mode=min"],
    ("loss", "physics"): ["data=ode", "model=pinn", "optimized_metric=val/rel_l2", "callbacks.checkpoint.monitor=val/rel_l2", "callbacks.checkpoint.mode=min", "callbacks.early_stopping.monitor=val/rel_l2", "callbacks.early_stopping.mode=min"],
    # a teacher needs a trained checkpoint; alpha=0 composes and builds everything else
    ("loss", "distillation"): ["loss.alpha=0"],
    ("experiment", "distill_cnn_to_mlp"): ["loss.alpha=0"],
    # mixes a batch with probability p: make it certain, so the check below sees a change
    ("augmentation", "cutmix"): ["augmentation.cutmix.p=1"],
    ("augmentation", "specaugment"): ["data=synthetic_audio"],
    ("augmentation", "signal"): ["data=synthetic_audio", "data.features=none", "data.input_shape=[1,4000]", "model=mlp"],
    # regression parts need float targets: the oscillator's (its NaN targets are unobserved)
    ("loss", "mse"): ["data=ode", "model=pinn", "optimized_metric=val/mse", "callbacks.checkpoint.monitor=val/mse", "callbacks.checkpoint.mode=min", "callbacks.early_stopping.monitor=val/mse", "callbacks.early_stopping.mode=min"],
    ("experiment", "regression"): ["data=ode", "model=pinn"],
    # a table's samples are flat feature vectors
    ("data", "table"): ["model=mlp"],
}


def test_every_group_file_is_found():
    groups = {}
    for group, _ in GROUP_FILES:
        groups[group] = groups.get(group, 0) + 1
    assert groups == {
        "augmentation": 7, "callbacks": 6, "data": 11, "debug": 2, "experiment": 6, "logger": 4,
        "loss": 7, "model": 8, "optimizer": 3, "scheduler": 9, "trainer": 3, "hparams_search": 3, "pruner": 4,
        "hydra/launcher": 2, "pipeline": 2,
    }
    assert len(GROUP_FILES) == 77


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_group_file_composes_and_builds(group, name, tmp_path):
    overrides = [f"{group}={name}"]
    if group == "data":
        overrides = [o for o in TINY if not o.startswith("data")] + overrides
        if name == "tensors":
            np.savez(tmp_path / "d.npz", x=np.random.rand(60, 1, 8, 8).astype("float32"), y=np.arange(60) % 3)
            overrides.append(f"data.path={tmp_path / 'd.npz'}")
        if name == "dataset":  # a user's Dataset class, importable as the CLI tests make it
            import sys

            from tests.conftest import HELPERS

            if str(HELPERS) not in sys.path:
                sys.path.append(str(HELPERS))
            import runner_test_helpers

            overrides += ["data.train._target_=runner_test_helpers.Blobs", f"+data.train.root={runner_test_helpers.write_blobs(tmp_path / 'blobs')}",
                          "data.num_classes=3", "data.input_shape=[1,8,8]", "allowed_targets=[runner_test_helpers.*]"]
        if name == "audio_folder":
            from tests.test_audio_folder import write_clips

            overrides += [f"data.root={write_clips(tmp_path / 'clips', per_class=6)}", "data.num_workers=0"]
        if name == "shards":  # written by the packer from a small array file
            from runner.data import tensors
            from runner.data.pack import pack

            np.savez(tmp_path / "d.npz", x=np.random.rand(60, 1, 8, 8).astype("float32"), y=np.arange(60) % 3)
            pack(tensors(str(tmp_path / "d.npz")), tmp_path / "shards", shard_size=20)
            overrides += [f'data.{split}="{tmp_path}/shards/{split}-*.tar"' for split in ("train", "val", "test")] + ["data.num_workers=0"]
        if name == "image_folder":
            from tests.test_image_folder import write_folder

            overrides += [f"data.root={write_folder(tmp_path / 'photos', per_class=8)}", "data.image_size=8", "data.num_workers=0"]
        if name == "hf":  # a saved DatasetDict of images (train, test) with a ClassLabel
            from tests.test_hf import write_images

            overrides += [f"data.path={write_images(tmp_path / 'saved', train_per_class=8, test_per_class=2)}", "data.input=image",
                          "data.label=label", "data.image_size=8", "data.num_workers=0"]
        if name == "table":
            from tests.test_table import write_table

            overrides += [f"data.path={write_table(tmp_path / 't.csv')}", "data.target=label", "data.categorical=[color]"]
    elif (group, name) == ("model", "hf_image"):  # a tiny ViT saved here, taking TINY's data as 3x8x8 images
        from tests.test_hf_model import save_tiny_vit

        overrides = [*TINY, "data.input_shape=[3,8,8]", *overrides, f"model.path={save_tiny_vit(tmp_path / 'vit')}"]
    elif group in ("experiment", "debug", "hparams_search"):
        overrides = ["trainer.device=cpu", *overrides]
    elif group == "hydra/launcher":
        overrides = [*TINY, *overrides]
    elif group == "pruner":
        overrides = ["trainer.device=cpu", "hparams_search=optuna_tpe", *overrides]
    else:
        overrides = [o for o in TINY if not o.startswith(f"{group}=")] + overrides
    companions = COMPANIONS.get((group, name), [])
    companion_keys = {o.split("=")[0] for o in companions}
    # a companion that picks another file of a group (data=ode) also drops the keys set for
    # the old file (data.num_samples), which the new one may not have
    overrides = [o for o in overrides if not {o.split("=")[0], o.split("=")[0].split(".")[0]} & companion_keys] + companions
    cfg = compose_config(overrides, return_hydra_config=group in ("hparams_search", "pruner", "hydra/launcher"))
    if group == "hydra/launcher":
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith({"slurm": "SlurmLauncher", "local": "LocalLauncher"}[name])
        if name == "slurm":
            assert launcher.max_num_timeout > 0  # requeue on timeout: the plugin's default (0) never does
        with open_dict(cfg):
            del cfg["hydra"]
    if group in ("hparams_search", "pruner"):
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_ == "runner.sweeper.Sweeper" and sweeper.study_name.startswith(f"{cfg.hydra.runtime.choices.hparams_search}-")
        sampler = build_sampler(sweeper.sampler, None, {"optimizer.lr": [1e-3]})
        assert type(sampler).__name__ == {"grid": "GridSampler", "random": "RandomSampler"}.get(name, "TPESampler")
        pruner = build_pruner(sweeper.pruner)
        assert (pruner is None) if name in ("none", "grid", "random", "optuna_tpe") else type(pruner).__name__.lower().startswith(name.replace("_", ""))
        with open_dict(cfg):
            del cfg["hydra"]
    # every interpolation resolves (a pipeline's ${stages...} only once its stages have run)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "pipeline"]), resolve=True)
    parts = build(cfg)
    assert isinstance(parts, Parts)
    assert isinstance(parts.model, torch.nn.Module)
    assert isinstance(parts.optimizer, torch.optim.Optimizer)
    x, y = next(iter(parts.data.loader("train", limit=1)))  # a batch, as the loop gets it
    x, y = x[:4], y[:4]
    logits = parts.model.eval()(x)
    assert logits.shape == (4, parts.data.num_classes)
    assert torch.isfinite(bind_context(parts.loss)(logits, y, x, parts.model))
    if group == "scheduler":
        assert (parts.scheduler is None) == (name == "none")
    if group == "augmentation" and name != "none":
        torch.manual_seed(0)
        augmented, _ = parts.augmentation(x, y)
        assert augmented.shape == x.shape and not torch.equal(augmented, x)


def test_data_publishes_shape_and_classes_to_the_model():
    cfg = compose_config([*TINY, "data.num_classes=7", "data.input_shape=[3,4,4]", "model=mlp"])
    assert cfg.model.num_classes == 7
    assert list(cfg.model.input_shape) == [3, 4, 4]
    parts = build(cfg)
    assert parts.model(torch.zeros(2, 3, 4, 4)).shape == (2, 7)


def test_tensors_file_publishes_its_shape_and_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((30, 5), "float32"), y=np.arange(30) % 6)
    cfg = compose_config(["data=tensors", f"data.path={tmp_path / 'd.npz'}", "model=mlp"])
    assert cfg.model.num_classes == 6
    assert list(cfg.model.input_shape) == [5]


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_epoch=3", "Key 'max_epoch' not in 'TrainerConf'"),
        ("trainer.max_epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("trainer.deterministic=maybe", "trainer.deterministic"),
        ("model=nope", "Could not find 'model/nope'"),
        ("optimized_metrc=val/acc", "optimized_metrc"),
    ],
)
def test_typed_keys_fail_at_compose_time(override, message):
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config([override])
    text = str(raised.value) + str(raised.value.__cause__)
    assert message in text


def test_digits_split_is_fixed_by_seed_and_stratified():
    cfg = compose_config([])
    first, second = build(cfg).data, build(cfg).data
    assert [len(first.train), len(first.val), len(first.test)] == [1257, 270, 270]
    assert torch.equal(first.val[:][0], second.val[:][0])
    counts = torch.bincount(first.test[:][1], minlength=10)
    assert int(counts.min()) >= 26 and int(counts.max()) <= 28
