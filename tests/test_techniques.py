"""Techniques as parts on the one loop: batch mixing, distillation, EMA, progressive
resizing, hard-example mining, schedules, monitors of several keys."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from runner.augment import CutMix, Mixup
from runner.build import build
from runner.callbacks import EMA, ModelCheckpoint, ProgressiveResizing, _Monitor
from runner.data import ResumableBatchSampler
from runner.errors import ConfigError
from runner.losses import CrossEntropyLoss, DistillationLoss
from runner.run import run
from runner.schedulers import InverseSqrtLR, LinearWarmupLR, PhaseLR
from tests.conftest import run_cli


# ------------------------------------------------------------------ mixing
def test_mixup_with_alpha_zero_is_the_identity():
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    mixed, soft = Mixup(num_classes=3, alpha=0.0)(x, y)
    assert torch.equal(mixed, x)
    assert torch.equal(soft, F.one_hot(y, 3).float())


def test_mixup_blends_inputs_and_targets_alike():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.arange(16)  # one class per sample: the partner shows in the target
    mixed, soft = Mixup(num_classes=16, alpha=0.4)(x, y)
    assert torch.allclose(soft.sum(dim=1), torch.ones(16))
    own = soft.diagonal()
    lam = own.min()
    assert 0.5 <= lam < 1.0
    assert ((own == lam) | (own == 1.0)).all()  # 1.0: the permutation paired the sample with itself
    partner = torch.where(own == 1.0, torch.arange(16), (soft - torch.diag(own)).argmax(dim=1))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner], atol=1e-6)


def test_mixing_probability_zero_leaves_the_batch_alone():
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 2
    for transform in (Mixup(2, alpha=1.0, p=0.0), CutMix(2, alpha=1.0, p=0.0)):
        assert transform(x, y)[0] is x


def test_cutmix_pastes_one_box_and_weights_targets_by_its_area():
    torch.manual_seed(3)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 8, 8).clone()  # sample i is all i
    y = torch.arange(4)
    mixed, soft = CutMix(num_classes=4, alpha=1.0)(x, y)
    for i in range(4):
        own = (mixed[i] == i).float().mean().item()
        assert soft[i, i].item() == pytest.approx(own) or torch.equal(mixed[i], x[i])
        assert soft[i].sum().item() == pytest.approx(1.0)


def test_batch_mixing_composes_with_every_loss():
    logits = torch.randn(6, 3)
    _, soft = Mixup(num_classes=3, alpha=1.0)(torch.randn(6, 2), torch.arange(6) % 3)
    from runner.losses import FocalLoss

    for loss in (CrossEntropyLoss(), CrossEntropyLoss(label_smoothing=0.1), FocalLoss(gamma=2.0)):
        assert torch.isfinite(loss(logits, soft))


def test_cutmix_on_a_signal_is_refused_at_build_time(cfg):
    with pytest.raises(ConfigError, match=r"augmentation.cutmix: 'runner.augment.CutMix' works on image or spectrogram inputs, but the data gives signal"):
        build(cfg("data.input_shape=[1,32]", "model=mlp", "augmentation=cutmix"))


def test_augmentations_compose_in_the_order_named(cfg):
    parts = build(cfg("augmentation=[mixup,noise_shift]"))
    assert [type(t).__name__ for t in parts.augmentation.transforms] == ["Mixup", "Compose"]


# ------------------------------------------------------------ distillation
@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A CNN trained briefly on digits: a teacher to distil from."""
    from tests.conftest import compose_config

    out = tmp_path_factory.mktemp("teacher")
    config = compose_config(["trainer.device=cpu", "logger=none", "trainer.max_epochs=3", "callbacks=[default]", "~callbacks.progress"])
    run(config, output_dir=out)
    return out / "checkpoints" / "best.pt"


def _distillation(teacher_checkpoint, **kwargs):
    from runner.models import CNN

    return DistillationLoss(CNN([1, 8, 8], 10, channels=[32, 64], dropout=0.1), teacher_checkpoint=str(teacher_checkpoint), **kwargs)


def test_distillation_with_alpha_zero_equals_the_base_loss(teacher_checkpoint):
    loss = _distillation(teacher_checkpoint, alpha=0.0)
    outputs, target, inputs = torch.randn(5, 10), torch.arange(5), torch.rand(5, 1, 8, 8)
    assert torch.equal(loss(outputs, target, inputs=inputs), CrossEntropyLoss()(outputs, target))


def test_distillation_soft_term_vanishes_when_the_student_matches_the_teacher(teacher_checkpoint):
    loss = _distillation(teacher_checkpoint, alpha=0.6, temperature=3.0)
    inputs, target = torch.rand(5, 1, 8, 8), torch.arange(5)
    with torch.no_grad():
        same = loss.teacher(inputs)
    assert loss(same, target, inputs=inputs).item() == pytest.approx(0.4 * CrossEntropyLoss()(same, target).item(), rel=1e-5)
    assert loss(torch.zeros(5, 10), target, inputs=inputs) > 0.4 * CrossEntropyLoss()(torch.zeros(5, 10), target)


def test_the_teacher_stays_frozen_in_eval_mode(teacher_checkpoint):
    loss = _distillation(teacher_checkpoint).train()
    assert not loss.teacher.training
    assert not any(p.requires_grad for p in loss.teacher.parameters())
    weights = torch.load(teacher_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(loss.teacher.state_dict()[k], v) for k, v in weights.items())


def test_distillation_without_a_teacher_or_with_the_wrong_one_is_refused(teacher_checkpoint):
    from runner.models import MLP

    with pytest.raises(ConfigError, match="loss.teacher_checkpoint and loss.teacher_run_id are both null"):
        DistillationLoss(MLP([1, 8, 8], 10))
    with pytest.raises(ConfigError, match=r"loss.teacher does not fit the weights in .*best.pt.*model@loss.teacher=resnet"):
        DistillationLoss(MLP([1, 8, 8], 10), teacher_checkpoint=str(teacher_checkpoint))


def test_teacher_from_an_mlflow_run_id(tmp_path, teacher_checkpoint):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("teachers", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    client.log_artifact(run_id, str(teacher_checkpoint), "checkpoints")
    from runner.models import CNN

    loss = DistillationLoss(CNN([1, 8, 8], 10, channels=[32, 64]), teacher_run_id=run_id, tracking_uri=uri)
    weights = torch.load(teacher_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(loss.teacher.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ConfigError, match=r"loss.teacher_run_id='nope': no checkpoints/best.pt in that run"):
        DistillationLoss(CNN([1, 8, 8], 10), teacher_run_id="nope", tracking_uri=uri)


# --------------------------------------------------------------- schedules
def _rates(scheduler_class, count, **kwargs):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = scheduler_class(optimizer, **kwargs)
    rates = []
    for _ in range(count):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_inverse_sqrt_warms_up_linearly_then_decays_as_one_over_root_step():
    rates = _rates(InverseSqrtLR, 400, warmup_steps=100)
    assert rates[0] == pytest.approx(0.01) and rates[99] == pytest.approx(1.0)
    assert rates[399] == pytest.approx(math.sqrt(100 / 400))
    assert max(rates) == pytest.approx(1.0)


def test_linear_warmup_reaches_the_rate_then_decays_to_the_floor():
    rates = _rates(LinearWarmupLR, 100, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[99] == pytest.approx(0.1 + 0.9 / 90, rel=1e-6)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    flat = _rates(LinearWarmupLR, 50, warmup_steps=10, total_steps=50, decay=False)
    assert flat[10:] == [1.0] * 40


def test_phases_switch_at_the_step_counts_and_log_the_change(caplog):
    with caplog.at_level(logging.INFO, logger="runner.schedulers"):
        rates = _rates(PhaseLR, 30, lrs=[1e-3, 1e-4], steps=[20, 10])
    assert rates[:20] == [1e-3] * 20 and rates[20:] == [1e-4] * 10
    assert "phase 2/2 starts at step 20: lr 0.0001" in caplog.text


def _fit_with_spy(config, tmp_path):
    """Fit in-process; return the loop and every metrics dict it logged, with its step."""
    from runner.callbacks import Callback
    from runner.loop import Loop
    from runner.run import resolved

    logged = []
    parts = build(config)
    parts.callbacks["spy"] = type("Spy", (Callback,), {"on_log": lambda self, loop, metrics: logged.append((loop.state.step, dict(metrics)))})()
    loop = Loop(parts, config.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(config))
    loop.fit()
    return loop, logged


def test_the_phase_is_logged_as_a_metric(cfg, tmp_path):
    _, logged = _fit_with_spy(cfg("scheduler=phases", "scheduler.steps=[5,5]", "trainer.max_steps=8", "trainer.log_every_n_steps=1"), tmp_path)
    phases = {step: metrics["lr/phase"] for step, metrics in logged if "lr/phase" in metrics}
    assert phases == {step: 1.0 if step < 5 else 2.0 for step in range(1, 9)}


# ---------------------------------------------------- monitors of several keys
def test_a_list_monitor_compares_keys_in_order():
    tracker = _Monitor("callbacks.checkpoint", [["val/loss", "min"], ["val/acc", "max"]], "max")
    assert tracker.improved([0.5, 0.8])
    tracker.best = [0.5, 0.8]
    assert tracker.improved([0.4, 0.1])  # lower loss wins whatever the accuracy
    assert not tracker.improved([0.6, 1.0])  # higher loss loses whatever the accuracy
    assert tracker.improved([0.5, 0.9])  # a tie on loss: the higher accuracy wins
    assert not tracker.improved([0.5, 0.8])  # a full tie is no improvement


def test_a_list_monitor_with_a_bad_entry_is_refused():
    with pytest.raises(ConfigError, match=r"callbacks.checkpoint.monitor='val/far' is not a metric"):
        ModelCheckpoint(monitor=[["val/far", "min"]])
    with pytest.raises(ConfigError, match=r"must be a metric name or a list of \[metric, mode\] pairs"):
        ModelCheckpoint(monitor=[["val/loss"]])
    with pytest.raises(ConfigError, match=r"callbacks.checkpoint.mode='up' is not supported"):
        ModelCheckpoint(monitor=[["val/loss", "up"]])


def test_a_list_monitor_keeps_the_lexicographic_best(cfg, tmp_path):
    config = cfg("trainer.max_epochs=4", "callbacks=[default]", "~callbacks.progress", "~callbacks.early_stopping",
                 "callbacks.checkpoint.monitor=[[val/acc,max],[val/loss,min]]", "data.num_samples=128")
    loop, logged = _fit_with_spy(config, tmp_path)
    validations = [(m["val/acc"], -m["val/loss"], step) for step, m in logged if "val/acc" in m]
    best_step = max(validations)[2]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["state"]["step"] == best_step
    assert best["callbacks"]["checkpoint"]["best"] == [max(validations)[0], -max(validations)[1]]


def test_a_list_monitor_from_the_command_line(tmp_path):
    result = run_cli([
        "data=synthetic", "data.num_samples=128", "trainer.device=cpu", "logger=none", "trainer.max_epochs=2",
        "callbacks.checkpoint.monitor=[[val/loss,min],[val/acc,max]]",
        "callbacks.early_stopping.monitor=[[val/acc,max],[val/loss,min]]", f"hydra.run.dir={tmp_path}",
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["callbacks"]["checkpoint"]["best"]) == 2


# --------------------------------------------------------------------- EMA
def test_ema_follows_the_weights_by_its_decay(cfg, tmp_path):
    from runner.loop import Loop
    from runner.run import resolved

    config = cfg("callbacks=none", "trainer.limit_train_batches=3", "trainer.max_epochs=1", "model=mlp")
    parts = build(config)
    ema = EMA(decay=0.9, warmup=False)
    parts.callbacks["ema"] = ema
    loop = Loop(parts, config.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(config))
    start = {k: v.clone() for k, v in loop.model.state_dict().items()}
    history = []
    parts.callbacks["spy"] = type("Spy", (EMA.__mro__[1],), {"on_step_end": lambda self, loop: history.append({k: v.clone() for k, v in loop.model.state_dict().items()})})()
    loop.fit()
    expected = start
    for weights in history:
        expected = {k: (0.9 * expected[k] + 0.1 * weights[k]) if weights[k].is_floating_point() else weights[k] for k in weights}
    for key, value in ema.average.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert loop.eval_model is ema.average
    first = next(name for name, _ in loop.model.named_parameters())
    assert not torch.equal(ema.average.state_dict()[first], loop.model.state_dict()[first])


def test_ema_weights_are_evaluated_and_checkpointed(cfg, tmp_path):
    result = run(cfg("callbacks=[default,ema]", "callbacks.ema.decay=0.5", "~callbacks.progress"), output_dir=tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["eval_model"] is not None
    assert best["eval_model"].keys() == best["model"].keys()
    assert any(not torch.equal(best["eval_model"][k], best["model"][k]) for k in best["model"])
    # the test metrics are those of the averaged weights, not the trained ones
    from runner.loop import Loop
    from runner.run import resolved

    config = cfg("callbacks=none")
    parts = build(config)
    loop = Loop(parts, config.trainer, torch.device("cpu"), tmp_path / "again", resolved(config))
    loop.model.load_state_dict(best["eval_model"])
    assert loop.evaluate("test")["test/acc"] == pytest.approx(result.metrics["test/acc"])


# ------------------------------------------------------- progressive resizing
def test_progressive_resizing_follows_its_schedule_and_leaves_evaluation_alone(cfg, tmp_path):
    seen: dict[int, set] = {}
    config = cfg("model=cnn", "trainer.max_epochs=4", "callbacks=[progressive_resizing]",
                 "callbacks.progressive_resizing.schedule=[[0,0.5],[2,0.75],[3,1.0]]")
    parts = build(config)
    from runner.loop import Loop
    from runner.run import resolved

    loop = Loop(parts, config.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(config))
    loop.model.register_forward_pre_hook(lambda module, args: seen.setdefault(loop.state.epoch if module.training else -1, set()).add(tuple(args[0].shape[-2:])))
    loop.fit()
    assert seen == {0: {(4, 4)}, 1: {(4, 4)}, 2: {(6, 6)}, 3: {(8, 8)}, -1: {(8, 8)}}
    assert parts.callbacks["progressive_resizing"].state_dict() == {"scale": 1.0}


def test_progressive_resizing_refuses_inputs_without_height_and_width(cfg):
    with pytest.raises(ConfigError, match=r"callbacks.progressive_resizing: .* works on image or spectrogram inputs, but the data gives signal"):
        build(cfg("data.input_shape=[1,32]", "model=mlp", "callbacks=[progressive_resizing]"))
    with pytest.raises(ConfigError, match=r"schedule=\[\[2, 0.5\], \[0, 1.0\]\] must be \[epoch, scale\] pairs sorted by epoch"):
        ProgressiveResizing(schedule=[[2, 0.5], [0, 1.0]])


# ------------------------------------------------------- hard-example mining
def test_weighted_sampling_draws_in_proportion_to_the_weights():
    weights = torch.tensor([1.0, 1.0, 8.0, 0.0])
    sampler = ResumableBatchSampler(4, 4, True, seed=0, weights=weights)
    counts = torch.zeros(4)
    for epoch in range(500):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts += torch.bincount(torch.tensor(batch), minlength=4)
    shares = counts / counts.sum()
    assert shares[3] == 0 and shares[2] == pytest.approx(0.8, abs=0.02) and shares[0] == pytest.approx(0.1, abs=0.02)


def test_hard_example_mining_weights_the_hard_and_the_negative(cfg, tmp_path):
    logged = []
    config = cfg("callbacks=[hard_example_mining]", "trainer.max_epochs=2", "data.num_classes=3",
                 "callbacks.hard_example_mining.negative_classes=[0]",
                 "callbacks.hard_example_mining.negative_weight=0.5",
                 "callbacks.hard_example_mining.hard_positive_weight=4.0",
                 "callbacks.hard_example_mining.hard_negative_weight=2.0")
    parts = build(config)
    from runner.callbacks import Callback
    from runner.loop import Loop
    from runner.run import resolved

    parts.callbacks["spy"] = type("Spy", (Callback,), {"on_log": lambda self, loop, metrics: logged.append(dict(metrics))})()
    loop = Loop(parts, config.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(config))
    loop.fit()
    mining = parts.callbacks["hard_example_mining"]
    assert parts.data.sample_weights is mining.weights and len(mining.weights) == len(parts.data.train)
    reports = [m for m in logged if "mining/hard" in m]
    assert len(reports) == 1  # scored once: at the start of the second epoch
    # score with the final model and recompute who is hard by hand: kind by kind
    weights, found = mining.score(loop)
    x, y = parts.data.train[:]
    with torch.no_grad():
        probabilities = loop.model.eval()(x).softmax(dim=1)
    hard = (probabilities.argmax(dim=1) != y) | (probabilities.gather(1, y.view(-1, 1)).squeeze(1) < 0.5)
    negative = y == 0
    expected = torch.where(negative, torch.where(hard, 2.0, 0.5), torch.where(hard, 4.0, 1.0)).double()
    assert torch.equal(weights, expected)
    assert found["mining/hard"] == float(hard.sum()) and found["mining/hard_negatives"] == float((hard & negative).sum())


# ---------------------------------------------- resume with every technique on
TECHNIQUES = [
    "data=synthetic", "data.num_samples=256", "model=cnn", "trainer.device=cpu", "trainer.seed=3",
    "trainer.deterministic=true", "logger=none",
    "augmentation=[noise_shift,mixup,cutmix]", "scheduler=linear_warmup", "scheduler.warmup_steps=4",
    # the schedule's length is part of the job: the same in the 2-epoch and the 4-epoch run
    "scheduler.total_steps=24",
    "callbacks=[default,ema,progressive_resizing,hard_example_mining]", "callbacks.ema.decay=0.9",
    "callbacks.progressive_resizing.schedule=[[0,0.5],[2,1.0]]",
]


@pytest.mark.slow
def test_resume_with_every_technique_is_bit_identical(tmp_path):
    straight = run_cli([*TECHNIQUES, "trainer.max_epochs=4", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    for epochs in (2, 4):
        part = run_cli([*TECHNIQUES, f"trainer.max_epochs={epochs}", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
        assert part.returncode == 0, part.stderr
    assert "resumed from" in part.stdout
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("a", "b"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["eval_model"]:
        assert torch.equal(a["eval_model"][key], b["eval_model"][key]), key
    assert torch.equal(a["callbacks"]["hard_example_mining"]["weights"], b["callbacks"]["hard_example_mining"]["weights"])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == json.loads((tmp_path / "b" / "metrics.json").read_text())


@pytest.mark.slow
def test_distilled_mlp_beats_the_same_mlp_trained_alone(tmp_path):
    """experiment=distill_cnn_to_mlp, as its README recipe runs it, against loss.alpha=0
    (the same MLP, data, seed and schedule on the labels alone)."""
    teacher = run_cli(["model=cnn", "data.test_fraction=0.5", "trainer.max_epochs=20", "trainer.device=cpu",
                       "logger=none", f"hydra.run.dir={tmp_path / 'teacher'}"], cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr
    accuracy = {}
    for alpha in (0.0, 0.9):
        student = run_cli(["experiment=distill_cnn_to_mlp", f"loss.alpha={alpha}", "trainer.device=cpu", "logger=none",
                           f"loss.teacher_checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'best.pt'}",
                           f"hydra.run.dir={tmp_path / str(alpha)}"], cwd=tmp_path)
        assert student.returncode == 0, student.stderr
        accuracy[alpha] = json.loads((tmp_path / str(alpha) / "metrics.json").read_text())["test/acc"]
    teacher_accuracy = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["test/acc"]
    print(f"teacher {teacher_accuracy:.4f}  MLP alone {accuracy[0.0]:.4f}  distilled {accuracy[0.9]:.4f}")
    assert accuracy[0.9] > accuracy[0.0] + 0.01
