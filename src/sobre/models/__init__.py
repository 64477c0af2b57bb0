"""Models by name: sobre's small nets, torchvision classifiers and timm models, random init only.

- :func:`create` builds any of them (``tv:``/``timm:`` prefixes force the source) and adapts the
  input channels; weights come only from a local file (``weights_path=``), never a download.
- :func:`names` lists sobre's own nets: ``lenet5``, ``small_cnn``, ``resnet8``/``20``/``32``/``56``,
  ``mlp``, ``vit_tiny28``, ``simple_conv``/``simple_conv_s``; ``MODELS`` is their registry.
- :func:`load_weights` loads a ``.safetensors``/``.pt``/``.pth`` state dict strictly;
  :func:`replace_first_conv` swaps a model's first conv for one with other input channels.
"""

from sobre.models.cnn import SmallCNN
from sobre.models.factory import create, names, replace_first_conv
from sobre.models.lenet import LeNet5
from sobre.models.mlp import MLP
from sobre.models.registry import MODELS
from sobre.models.resnet_cifar import CifarResNet, resnet8, resnet20, resnet32, resnet56
from sobre.models.simple_conv import SimpleConvNet
from sobre.models.vit import ViTTiny28
from sobre.models.weights import load_weights

__all__ = [
    "MLP",
    "MODELS",
    "CifarResNet",
    "LeNet5",
    "SimpleConvNet",
    "SmallCNN",
    "ViTTiny28",
    "create",
    "load_weights",
    "names",
    "replace_first_conv",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
]
