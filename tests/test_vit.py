"""model=vit and augmentation=patch: shapes, attention as the textbook formula, the refusals,
and a short training on digits that learns."""

import math

import numpy as np
import pytest
import torch

from runner.augment import PatchMasking
from runner.build import build
from runner.callbacks import Callback
from runner.errors import ConfigError
from runner.loop import Loop
from runner.models import ViT
from runner.models.vit import SelfAttention
from runner.run import resolved
from runner.state import seed_everything
from tests.conftest import compose_config


def naive_attention(module: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out, with the module's own weights."""
    batch, tokens, dim = x.shape
    heads = module.heads
    q, k, v = module.qkv(x).split(dim, dim=-1)
    outputs = []
    for head in range(heads):
        part = slice(head * dim // heads, (head + 1) * dim // heads)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(dim // heads)
        outputs.append(torch.softmax(scores, dim=-1) @ v[..., part])
    return module.proj(torch.cat(outputs, dim=-1))


# ------------------------------------------------------------------------------- model
def test_output_shape_for_images_and_spectrograms():
    assert ViT([1, 8, 8], 10)(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    spectrogram = ViT([2, 8, 12], 7, patch_size=4, dim=32, depth=1, heads=2, pool="mean")
    assert spectrogram(torch.rand(3, 2, 8, 12)).shape == (3, 7)
    assert spectrogram.position_embedding.shape == (1, 2 * 3, 32)  # no class token with mean pooling


def test_attention_equals_the_naive_formula():
    torch.manual_seed(0)
    attention = SelfAttention(dim=16, heads=4, dropout=0.5).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), naive_attention(attention, x), rtol=1e-5, atol=1e-6)
        # attention dropout acts in training only
        assert not torch.allclose(attention.train()(x), naive_attention(attention, x))


def test_patch_size_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ConfigError) as raised:
        ViT([1, 8, 8], 10, patch_size=3)
    message = str(raised.value)
    assert "model.patch_size=3" in message and "8x8" in message and "model.patch_size=2" in message
    # through the config, the same message
    cfg = compose_config(["data=synthetic", "data.num_samples=64", "model=vit", "model.patch_size=3", "logger=none"])
    with pytest.raises(ConfigError, match=r"model.patch_size=3 does not divide the image size 8x8"):
        build(cfg)


def test_vit_refuses_signal_data():
    cfg = compose_config(["data=synthetic", "data.num_samples=64", "data.input_shape=[1,32]", "model=vit", "logger=none"])
    with pytest.raises(ConfigError, match=r"model=vit needs image inputs .* data.input_shape=\[1, 32\]"):
        build(cfg)


class LossPerEpoch(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, loop, metrics):
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def test_short_training_on_digits_learns(tmp_path):
    # the config's model (depth 2, dim 64) on the real digits for five epochs (100 steps);
    # the loss sits near chance for the first two or three, as small transformers do
    cfg = compose_config(["model=vit", "trainer.device=cpu", "trainer.max_epochs=5", "callbacks=none", "logger=none"])
    seed_everything(0, False)
    parts = build(cfg)
    recorder = LossPerEpoch()
    parts.callbacks["recorder"] = recorder
    loop = Loop(parts, cfg.trainer, torch.device("cpu"), tmp_path / "checkpoints", resolved(cfg))
    loop.fit()
    first, *_, last = recorder.losses
    print("train/loss per epoch", recorder.losses)
    assert len(recorder.losses) == 5
    assert last < 0.7 * first and last < 0.7 * math.log(10)  # chance is ln 10
    assert loop.evaluate("val")["val/acc"] > 0.5


# ------------------------------------------------------------------------ patch masking
def _zeroed_patches(x: torch.Tensor, masked: torch.Tensor, size: int) -> torch.Tensor:
    """Per sample: how many size x size patches are all zero in masked but not in x."""
    pooled = torch.nn.functional.max_pool2d(masked.abs().sum(1, keepdim=True), size, ceil_mode=True)
    return (pooled.flatten(1) == 0).sum(1)


@pytest.mark.parametrize("shape,size,ratio", [((6, 3, 8, 8), 2, 0.25), ((4, 1, 8, 12), 4, 0.5), ((5, 1, 7, 7), 2, 0.3)])
def test_patch_masking_zeroes_exactly_k_patches_per_sample(shape, size, ratio):
    torch.manual_seed(0)
    x = torch.rand(shape) + 0.1  # no zeros of its own
    y = torch.arange(shape[0])
    masked, labels = PatchMasking(size, ratio)(x, y)
    patches = math.ceil(shape[-2] / size) * math.ceil(shape[-1] / size)
    assert torch.equal(_zeroed_patches(x, masked, size), torch.full((shape[0],), round(ratio * patches)))
    kept = masked != 0
    assert torch.equal(masked[kept], x[kept]) and torch.equal(labels, y)
    # whole patches over every channel, and a different set per sample
    assert torch.equal(kept, kept[:, :1].expand_as(kept))
    assert not all(torch.equal(kept[0], kept[i]) for i in range(1, shape[0]))


def test_patch_masking_with_ratio_zero_is_the_identity():
    x = torch.rand(4, 1, 8, 8)
    masked, _ = PatchMasking(2, 0.0)(x, torch.zeros(4))
    assert torch.equal(masked, x)


def test_patch_masking_refuses_bad_settings():
    with pytest.raises(ConfigError, match=r"augmentation.patch.ratio=1.5"):
        PatchMasking(2, 1.5)
    with pytest.raises(ConfigError, match=r"augmentation.patch.patch_size=0"):
        PatchMasking(0, 0.5)


def test_patch_masking_is_refused_on_a_signal(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.rand(60, 1, 32).astype("float32"), y=np.arange(60) % 3)
    cfg = compose_config(["data=tensors", f"data.path={tmp_path / 'd.npz'}", "model=mlp", "augmentation=patch", "logger=none"])
    with pytest.raises(ConfigError) as raised:
        build(cfg)
    message = str(raised.value)
    assert message.startswith("augmentation.patch:") and "image" in message and "signal" in message
