"""Models built by conf/model/*.yaml. Each takes input_shape and num_classes from data."""

from runner.models.cnn import CNN
from runner.models.hf import HFImageClassifier
from runner.models.library import TimmModel, TorchvisionModel
from runner.models.mlp import MLP
from runner.models.pinn import PINN
from runner.models.resnet import ResNet
from runner.models.vit import ViT

__all__ = ["CNN", "HFImageClassifier", "MLP", "PINN", "ResNet", "TimmModel", "TorchvisionModel", "ViT"]
