"""A Hugging Face ``transformers`` image classifier saved with ``save_pretrained``, trained here:

    python -m runner data=image_folder data.root=photos/ model=hf_image model.path=DIR

Nothing is downloaded: the folder is read with ``local_files_only=True`` and ``HF_HUB_OFFLINE``
is set before ``transformers`` is imported (the ``transformers`` extra), so a Hub name stops with
how to save the model first. A class count other than the saved head's gets a new head.
"""

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from runner.errors import ConfigError
from runner.models.arguments import count
from runner.models.cnn import image_channels

log = logging.getLogger("runner")

INSTALL = "pip install 'runner[transformers]'"


def _save_hint(path: str) -> str:
    name = path if path and not Path(path).exists() else "NAME"
    return ("runner does not download models: on a machine with network, save one first with "
            f"python -c \"from transformers import AutoModelForImageClassification as M; "
            f"M.from_pretrained('{name}').save_pretrained('DIR')\", then model.path=DIR")


def _transformers():
    """The transformers package, kept offline: it reads local folders only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model=hf_image loads Hugging Face models with the transformers package, which is not installed; {INSTALL}") from None
    return transformers


def _pair(value: Any) -> tuple[int, int] | None:
    """A config's image_size as (height, width); None where it gives none."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _check_shape(config: Any, input_shape: Sequence[int], path: str) -> None:
    """The data's [C, H, W] against the channels and size the saved model was built for."""
    channels, size = getattr(config, "num_channels", None), _pair(getattr(config, "image_size", None))
    given = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    wanted = (channels if channels is not None else given[0], *(size or given[1:]))
    if wanted == given:
        return
    raise ConfigError(
        f"model.path='{path}' takes {wanted[0]}x{wanted[1]}x{wanted[2]} images (num_channels={channels}, "
        f"image_size={getattr(config, 'image_size', None)} in its config.json), but data.input_shape={list(given)}; "
        f"give the data that shape, e.g. data.image_size={wanted[1] if wanted[1] == wanted[2] else list(wanted[1:])} "
        f"data.channels={wanted[0]} with data=image_folder"
    )


class HFImageClassifier(nn.Module):
    """``AutoModelForImageClassification`` from a local folder; ``forward`` returns its logits."""

    modalities = ("image",)

    def __init__(self, path: str, num_classes: int, input_shape: Sequence[int]):
        super().__init__()
        num_classes = count(num_classes, "model.num_classes", "3")
        image_channels(input_shape, "hf_image")  # [C, H, W] or a message naming model=mlp
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"model.path='{path}' is not a local folder; {_save_hint(str(path))}")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path='{path}' holds no config.json: not a model saved with save_pretrained; {_save_hint('')}")
        transformers = _transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"model.path='{path}' holds no model saved with save_pretrained ({_first_line(error)}); {_save_hint('')}") from None
        _check_shape(config, input_shape, str(path))
        saved = int(getattr(config, "num_labels", 0) or 0)
        try:
            self.model = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder), num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as error:  # not an image classifier, or missing weights
            raise ConfigError(f"model.path='{path}' cannot be loaded as an image classifier ({_first_line(error)}); "
                              "give a folder saved from AutoModelForImageClassification") from None
        if saved != num_classes:
            log.info("model.path=%s: a new %d-class head replaces the saved %d-class one; it starts untrained", path, num_classes, saved)
        else:
            log.info("model.path=%s: loaded with its %d-class head", path, saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
