"""Image models from timm and torchvision, one override each:

    python -m runner model=timm model.name=resnet18
    python -m runner model=torchvision model.name=resnet18

``num_classes`` and the input channels come from ``data``; any other argument the architecture
takes passes through (``+model.drop_rate=0.1``, ``+model.img_size=32`` for a timm ViT). Weights
start random: ``pretrained=false`` is the default, and ``true`` downloads the library's weights
into its own cache (``HF_HOME`` for timm, ``TORCH_HOME`` for torchvision), says so, and stops
with one message where there is no network.

The wrapped model is ``self.model``, so a checkpoint's tensors are named ``model.<name>``.
The library's own factories are not built from config files directly: their keyword
arguments also take checkpoint paths, download URLs and cache folders.
"""

import logging
from typing import Any, Sequence

import torch
from torch import nn

from runner.errors import ConfigError
from runner.models.arguments import count
from runner.models.cnn import image_channels

log = logging.getLogger("runner")

INSTALL = "pip install 'runner[vision]' (install the torch/torchvision pair you want first: README, Install)"
# keyword arguments of timm.create_model / torchvision's builders that read or write files, or
# fetch from a URL of the config's choosing: never from a config file
REFUSED = {
    "checkpoint_path": "loads a file", "pretrained_cfg": "can point at any URL or file",
    "pretrained_cfg_overlay": "can point at any URL or file", "cache_dir": "writes outside the run's directory",
    "weights": "use model.pretrained=true", "weights_backbone": "use model.pretrained=true",
    "features_only": "returns feature maps, not class scores",
}


def _library(name: str):
    try:
        if name == "timm":
            import timm

            return timm
        import torchvision

        return torchvision
    except ImportError as error:
        raise ConfigError(f"model={name} needs the {name} package, which cannot be imported ({error}); {INSTALL}") from None


def _check_options(model: str, options: dict[str, Any]) -> None:
    refused = [key for key in options if key in REFUSED]
    if refused:
        reasons = "; ".join(f"model.{key} {REFUSED[key]}".rstrip() for key in refused)
        raise ConfigError(
            f"model={model} does not pass {', '.join(f'model.{key}' for key in refused)} to the library ({reasons}); "
            f"drop {' '.join(f'~model.{key}' for key in refused)}"
        )


def _offline_hint(model: str, name: str, error: BaseException) -> ConfigError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(
        f"model.pretrained=true: the {model} weights of '{name}' could not be downloaded ({text}); "
        f"run once on a machine with network (the weights stay in the {model} cache), or set model.pretrained=false"
    )


class TimmModel(nn.Module):
    """``timm.create_model(name, num_classes, in_chans, pretrained, **options)``."""

    # a [C, H, W] grid: images, and spectrograms [C, F, T]
    modalities = ("image", "spectrogram")

    def __init__(self, name: str, num_classes: int, input_shape: Sequence[int], pretrained: bool = False, **options: Any):
        super().__init__()
        channels = image_channels(input_shape, "timm")
        num_classes = count(num_classes, "model.num_classes", "10")
        _check_options("timm", options)
        timm = _library("timm")
        if not timm.is_model(str(name)):
            close = timm.list_models(f"*{str(name).split('.')[0][:4]}*")[:8]
            raise ConfigError(
                f"model.name='{name}' is not a timm model; e.g. {', '.join(close) or 'resnet18, efficientnet_b0, vit_tiny_patch16_224'} "
                "(python -c \"import timm; print(timm.list_models())\" lists them)"
            )
        if pretrained:
            log.info("model.pretrained=true: timm's weights of %s come from the Hugging Face Hub into its cache (HF_HOME) unless cached", name)
        try:
            self.model = timm.create_model(str(name), pretrained=bool(pretrained), num_classes=num_classes, in_chans=channels, **options)
        except TypeError as error:
            raise ConfigError(f"model=timm: '{name}' does not take one of {sorted(options)} ({error}); drop it with ~model.<key>") from None
        except Exception as error:  # without network the Hub client fails in its own way
            if not pretrained:
                raise
            raise _offline_hint("timm", str(name), error) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TorchvisionModel(nn.Module):
    """``torchvision.models.get_model(name, num_classes=..., **options)``; inputs with other than
    3 channels get a first convolution of that width (pretrained weights summed or repeated
    over the channels, the way timm adapts them)."""

    modalities = ("image", "spectrogram")

    def __init__(self, name: str, num_classes: int, input_shape: Sequence[int], pretrained: bool = False, **options: Any):
        super().__init__()
        channels = image_channels(input_shape, "torchvision")
        num_classes = count(num_classes, "model.num_classes", "10")
        _check_options("torchvision", options)
        models = _library("torchvision").models
        known = models.list_models(module=models)
        if str(name) not in known:
            raise ConfigError(f"model.name='{name}' is not a torchvision classification model; one of {', '.join(known[:12])}, ...")
        self.model = self._build(models, str(name), num_classes, bool(pretrained), options)
        if channels != 3:
            _adapt_first_convolution(self.model, channels, str(name))

    @staticmethod
    def _build(models, name: str, num_classes: int, pretrained: bool, options: dict) -> nn.Module:
        try:
            if not pretrained:
                return models.get_model(name, weights=None, num_classes=num_classes, **options)
            log.info("model.pretrained=true: torchvision's weights of %s come from download.pytorch.org into its cache (TORCH_HOME) unless cached", name)
            model = models.get_model(name, weights="DEFAULT", **options)
        except TypeError as error:
            raise ConfigError(f"model=torchvision: '{name}' does not take one of {sorted(options)} ({error}); drop it with ~model.<key>") from None
        except Exception as error:  # URLError without network, a hash mismatch, ...
            if not pretrained:
                raise
            raise _offline_hint("torchvision", name, error) from None
        _replace_head(model, num_classes, name)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _replace_head(model: nn.Module, num_classes: int, name: str) -> None:
    """Pretrained weights come with ImageNet's 1000-class head: the last Linear gets a new one."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ConfigError(f"model.name='{name}' has no Linear classifier runner can replace; use model.pretrained=false")
    head: nn.Linear = model.get_submodule(last)
    if head.out_features == num_classes:
        return
    parent, _, attribute = last.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    if isinstance(owner, nn.Sequential):
        owner[int(attribute)] = new
    else:
        setattr(owner, attribute, new)
    log.info("model=torchvision %s: a new %d-class head replaces the pretrained 1000-class one", name, num_classes)


def _adapt_first_convolution(model: nn.Module, channels: int, name: str) -> None:
    """The first Conv2d reading 3 channels reads ``channels`` instead."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(
                channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
            )
            with torch.no_grad():
                weight = module.weight
                if channels == 1:
                    conv.weight.copy_(weight.sum(dim=1, keepdim=True))
                else:
                    repeats = -(-channels // 3)
                    conv.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :channels] * (3 / channels))
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            parent, _, attribute = module_name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if isinstance(owner, nn.Sequential):
                owner[int(attribute)] = conv
            else:
                setattr(owner, attribute, conv)
            return
    raise ConfigError(f"model.name='{name}' has no first convolution over 3 channels to adapt to {channels}; give the data 3 channels (data.channels=3)")
