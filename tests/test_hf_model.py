"""model=hf_image: a transformers image classifier saved with save_pretrained, loaded from a
local folder only, its head resized to the data's classes, its input shape checked, and the
whole CLI run (training, test, TorchScript and ONNX export) on a folder of images."""

import json
import logging
from pathlib import Path

import pytest
import torch

from runner.errors import ConfigError
from runner.models import HFImageClassifier
from tests.conftest import run_cli
from tests.test_image_folder import write_folder

import transformers  # noqa: E402  (the test extra installs it: a missing one fails here, never skips)


def save_tiny_vit(folder: Path, num_labels: int = 2) -> Path:
    """A 1-block ViT for 3x8x8 images (4x4 patches), saved as a user would save a Hub model."""
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=num_labels)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_the_wrapper_returns_logits_and_a_new_class_count_gets_a_new_head(tmp_path, caplog):
    folder = save_tiny_vit(tmp_path / "vit")
    saved = transformers.ViTForImageClassification.from_pretrained(folder)
    same = HFImageClassifier(str(folder), 2, [3, 8, 8]).eval()
    x = torch.rand(5, 3, 8, 8)
    logits = same(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, 2)
    assert torch.equal(same.model.classifier.weight, saved.classifier.weight)  # the saved head, as it was
    with caplog.at_level(logging.INFO, logger="runner"):
        wider = HFImageClassifier(str(folder), 3, [3, 8, 8]).eval()
    assert wider(x).shape == (5, 3) and wider.model.classifier.out_features == 3
    assert "a new 3-class head replaces the saved 2-class one" in caplog.text
    # the body is the saved one; only the head is new
    assert torch.equal(wider.model.vit.embeddings.patch_embeddings.projection.weight, saved.vit.embeddings.patch_embeddings.projection.weight)
    assert HFImageClassifier.modalities == ("image",)


@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 16, 16]])
def test_an_input_shape_the_model_was_not_built_for_is_refused_with_the_fix(tmp_path, shape):
    folder = save_tiny_vit(tmp_path / "vit")
    with pytest.raises(ConfigError) as raised:
        HFImageClassifier(str(folder), 3, shape)
    message = str(raised.value)
    assert f"takes 3x8x8 images (num_channels=3, image_size=8 in its config.json), but data.input_shape={shape}" in message
    assert "data.image_size=8 data.channels=3" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["hub name", "file", "empty folder"])
def test_a_path_that_is_not_a_saved_model_folder_says_runner_does_not_download(tmp_path, kind):
    path = {"hub name": "google/vit-base-patch16-224", "file": tmp_path / "weights.bin", "empty folder": tmp_path / "empty"}[kind]
    if kind == "file":
        path.write_bytes(b"")
    if kind == "empty folder":
        path.mkdir()
    with pytest.raises(ConfigError) as raised:
        HFImageClassifier(str(path), 3, [3, 8, 8])
    message = str(raised.value)
    assert message.startswith(f"model.path='{path}' ") and "\n" not in message
    assert "runner does not download models" in message and ".save_pretrained('DIR')" in message
    if kind == "hub name":
        assert "from_pretrained('google/vit-base-patch16-224')" in message


@pytest.mark.slow
def test_a_saved_vit_trains_on_a_folder_of_images_and_exports_through_the_cli(tmp_path):
    """3 classes of 40 images; test accuracy well above chance (1/3), TorchScript and ONNX files."""
    write_folder(tmp_path / "photos", per_class=40)
    save_tiny_vit(tmp_path / "vit")
    # At 8x8 the stripes blur away and the classes differ by brightness. The ViT's LayerNorm
    # takes each token's scale away, so with the measured statistics (dark and stripes both
    # below the mean) it tells the two apart only once its biases have grown (~150 steps at
    # lr 0.01); statistics centred on the middle class keep all three apart from the start.
    result = run_cli(["data=image_folder", "data.root=photos", "data.image_size=8", "data.batch_size=16",
                      "data.mean=[0.35,0.35,0.35]", "data.std=[0.25,0.25,0.25]", "data.num_workers=0",
                      "model=hf_image", "model.path=vit", "trainer.max_epochs=4", "trainer.device=cpu", "trainer.num_threads=1",
                      "~callbacks.drift", "~callbacks.curves", "logger=none", "hydra.run.dir=out"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.8, metrics  # measured 1.0 with seeds 0-3
    export = tmp_path / "out" / "export"
    assert (export / "model.pt").is_file() and (export / "model.onnx").is_file()
    formats = json.loads((export / "model.json").read_text())["formats"]
    assert formats["torchscript"]["ok"] and formats["onnx"]["ok"], formats


def test_without_transformers_the_model_stops_naming_the_extra(tmp_path, monkeypatch):
    folder = save_tiny_vit(tmp_path / "vit")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"transformers package, which is not installed; pip install 'runner\[transformers\]'"):
        HFImageClassifier(str(folder), 3, [3, 8, 8])
