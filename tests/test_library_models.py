"""model=timm and model=torchvision: one override each, num_classes and the input channels from
data, random weights unless asked, no download offline, and the library's own builders refused
from a config file (their arguments load checkpoints and fetch URLs). A torchvision dataset class
over a local root trains through data=dataset."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from runner.errors import ConfigError
from runner.models import TimmModel, TorchvisionModel
from runner.targets import judge
from tests.conftest import compose_config, run_cli

import timm  # noqa: E402,F401  (the test extra installs both: a missing one fails here, never skips)
import torchvision  # noqa: E402

QUIET = ["~callbacks.drift", "~callbacks.curves", "logger=none", "trainer.device=cpu", "hydra.run.dir=out"]


@pytest.mark.parametrize("wrapper, name", [(TimmModel, "resnet18"), (TorchvisionModel, "resnet18"), (TorchvisionModel, "mobilenet_v3_small")])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_the_data_gives_classes_and_channels(wrapper, name, channels):
    model = wrapper(name, 7, [channels, 32, 32]).eval()
    assert model(torch.rand(2, channels, 32, 32)).shape == (2, 7)
    first = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    assert first.in_channels == channels


def test_a_pretrained_first_convolution_keeps_what_it_computes_on_grey_images():
    """torchvision's adaptation sums the RGB filters for one channel: a grey image gives the
    same first feature maps through both convolutions."""
    from runner.models.library import _adapt_first_convolution

    rgb = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    grey = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    grey.load_state_dict(rgb.state_dict())
    _adapt_first_convolution(grey, 1, "resnet18")
    image = torch.rand(2, 1, 16, 16)
    assert torch.allclose(grey.conv1(image), rgb.conv1(image.expand(-1, 3, -1, -1)), atol=1e-5)


@pytest.mark.parametrize("wrapper, model", [(TimmModel, "timm"), (TorchvisionModel, "torchvision")])
def test_an_unknown_name_and_a_file_argument_are_refused_with_the_fix(wrapper, model):
    with pytest.raises(ConfigError, match=rf"^model.name='resnet_nineteen' is not a {model}"):
        wrapper("resnet_nineteen", 3, [3, 8, 8])
    with pytest.raises(ConfigError) as raised:
        wrapper("resnet18", 3, [3, 8, 8], checkpoint_path="/tmp/x.pth", cache_dir="/tmp")
    assert str(raised.value) == (
        f"model={model} does not pass model.checkpoint_path, model.cache_dir to the library (model.checkpoint_path loads a file; "
        "model.cache_dir writes outside the run's directory); drop ~model.checkpoint_path ~model.cache_dir"
    )
    with pytest.raises(ConfigError, match=rf"^model={model} needs image inputs shaped \[channels, height, width\], but data.input_shape=\[13\]"):
        wrapper("resnet18", 3, [13])


@pytest.mark.parametrize("wrapper, model", [(TimmModel, "timm"), (TorchvisionModel, "torchvision")])
def test_pretrained_without_network_stops_with_one_message(tmp_path, monkeypatch, wrapper, model):
    """No network here: the download fails, and the message says what to do; nothing lands
    outside tmp_path (the caches point there)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub client's own offline switch: fails at once
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as raised:
        wrapper("resnet18", 3, [3, 8, 8], pretrained=True)
    message = str(raised.value)
    assert message.startswith(f"model.pretrained=true: the {model} weights of 'resnet18' could not be downloaded (")
    assert message.endswith(f"run once on a machine with network (the weights stay in the {model} cache), or set model.pretrained=false")
    assert "\n" not in message


@pytest.mark.parametrize("target", ["timm.create_model", "timm.models.resnet18", "torchvision.models.get_model", "torchvision.models.resnet18"])
def test_the_libraries_builders_are_refused_from_a_config_and_their_classes_are_not(target):
    with pytest.raises(ConfigError, match=r"a builder whose arguments also load checkpoints, download from URLs or write caches"):
        judge(target, "model._target_")
    assert judge("timm.models.resnet.ResNet", "model._target_").real_name == "timm.models.resnet.ResNet"
    assert judge("torchvision.models.resnet.ResNet", "model._target_").real_name == "torchvision.models.resnet.ResNet"


def test_a_dataset_that_unpickles_its_files_or_downloads_is_refused():
    with pytest.raises(ConfigError, match=r"'torchvision.datasets.cifar.CIFAR10', which can load code or write files"):
        judge("torchvision.datasets.CIFAR10", "data.train._target_")
    from runner.build import build

    cfg = compose_config(["data=dataset", "data.train._target_=torchvision.datasets.MNIST", "+data.train.root=x",
                          "+data.train.download=true", "data.num_classes=10", "data.input_shape=[1,28,28]"])
    with pytest.raises(ConfigError, match=r"^data.train.download=true: runner downloads nothing at run time; .* then set data.train.download=false$"):
        build(cfg)


def test_the_model_options_compose_with_nothing_to_delete():
    for option in ("timm", "torchvision"):
        model = compose_config([f"model={option}"]).model
        assert sorted(model) == ["_target_", "input_shape", "name", "num_classes", "pretrained"]
        assert model.pretrained is False


@pytest.mark.slow
@pytest.mark.parametrize("option", ["timm", "torchvision"])
def test_a_library_resnet18_trains_on_digits_and_exports(tmp_path, option):
    """model=<library> model.name=resnet18 on the 8x8 grey digits: in_chans=1 and 10 classes
    from data; 4 epochs reach test accuracy far above chance (0.1; measured 0.95 for both),
    TorchScript and ONNX exports match PyTorch."""
    result = run_cli([f"model={option}", "model.name=resnet18", "trainer.max_epochs=4", *QUIET], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.8, metrics
    card = json.loads((tmp_path / "out" / "export" / "model.json").read_text())
    assert card["formats"]["torchscript"]["ok"] and card["formats"]["onnx"]["ok"], card["formats"]
    assert card["input"]["shape"] == ["batch", 1, 8, 8] and card["model"]["class"].endswith(("TimmModel", "TorchvisionModel"))


@pytest.mark.slow
def test_a_library_builder_in_a_config_file_stops_before_anything_is_built(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        "_target_: timm.create_model\nmodel_name: resnet18\npretrained: true\npretrained_cfg_overlay: {url: 'http://example.invalid/w.pth'}\n")
    result = run_cli(["--config-dir", "conf", "model=mine", *QUIET], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "model._target_='timm.create_model' is 'timm.models._factory.create_model', a builder" in result.stderr
    assert "use model=timm model.name=<name>" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def write_mnist_root(root: Path) -> None:
    """The digits in MNIST's raw file format (idx), as torchvision.datasets.MNIST reads it."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(0, 1500)), ("t10k", slice(1500, None))):
        x, y = images[part], digits.target[part].astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, len(x), 8, 8) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, len(y)) + y.tobytes())


@pytest.mark.slow
def test_a_torchvision_dataset_over_a_local_root_trains_through_data_dataset(tmp_path):
    """torchvision.datasets.MNIST over files the test wrote (nothing downloaded), its test split
    held out: test accuracy far above chance (0.1)."""
    write_mnist_root(tmp_path / "mnist")
    assert len(torchvision.datasets.MNIST(str(tmp_path / "mnist"), train=True)) == 1500
    result = run_cli([
        "data=dataset", "data.train._target_=torchvision.datasets.MNIST", "+data.train.root=mnist",
        "+data.train.train=true", "+data.train.download=false",
        "+data.test._target_=torchvision.datasets.MNIST", "+data.test.root=mnist", "+data.test.train=false",
        "data.num_classes=10", "data.input_shape=[1,8,8]", "trainer.max_epochs=3", "~callbacks.export", *QUIET,
    ], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.8, metrics
