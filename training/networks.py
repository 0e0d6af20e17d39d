"""LeNet-type encoders (paper appendix C) for m classes at once, as one grouped network.

Encoder i is conv5x5(32) -> BN -> leaky ReLU -> maxpool2, then 64 and 128 filters alike, then a
dense layer of ``rep_dim`` units. Not in the paper: ``width`` multiplies every layer's filters, and
with ``dropout`` > 0 the final feature map is dropped out before the dense layer in training only
(evaluation and the exported graph never see it).
DeepSVDD's convention: no biases and BatchNorm without affine parameters, so the network cannot map
every input onto the centre by a constant shift.

The m encoders are stacked as grouped convolutions (``groups=m``): group i's weights only ever see
group i's channels, so this is exactly m independent networks, trained in one forward/backward pass.
BatchNorm statistics are per channel and therefore per encoder. The dense layer is a grouped
convolution whose kernel covers the whole final feature map.

Activations are channels-last (NHWC): oneDNN's CPU convolutions, grouped ones above all, run their
forward and backward faster in that layout (bench/train.py; docs/performance.md). The layout does not
change any value, and an exported graph does not record it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

WIDTHS = (32, 64, 128)
KERNEL = 5
LEAK = 0.01
BN_EPS = 1e-4


def feature_sizes(size: int) -> list[int]:
    """Spatial size after each 2x2 pool, starting with the input: 32 -> [32, 16, 8, 4]."""
    sizes = [size]
    for _ in WIDTHS:
        sizes.append(sizes[-1] // 2)
    return sizes


class GroupedEncoder(nn.Module):
    """m LeNet encoders. ``forward`` takes [B, m, C, H, W] (one image per encoder) -> [B, m, rep_dim]."""

    def __init__(self, groups: int, channels: int, size: int, rep_dim: int = 128, dropout: float = 0.0, width: int = 1):
        super().__init__()
        self.groups, self.channels, self.size, self.rep_dim = groups, channels, size, rep_dim
        self.dropout = dropout
        layers: list[nn.Module] = []
        width_in = channels
        for out in (w * width for w in WIDTHS):
            layers += [
                nn.Conv2d(groups * width_in, groups * out, KERNEL, padding=KERNEL // 2, bias=False, groups=groups),
                nn.BatchNorm2d(groups * out, eps=BN_EPS, affine=False),
                nn.LeakyReLU(LEAK),
                nn.MaxPool2d(2),
            ]
            width_in = out
        self.features = nn.Sequential(*layers)
        final = feature_sizes(size)[-1]
        self.dense = nn.Conv2d(groups * width_in, groups * rep_dim, final, bias=False, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.reshape(batch, self.groups * self.channels, self.size, self.size)
        return self._embedding(self.features(_channels_last(x)))

    def embed_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The same images [B, C, H, W] through every encoder -> [B, m, rep_dim].

        The first grouped convolution over m copies of x equals one ungrouped convolution of x with the
        same weights ([m * 32, C, 5, 5]): the input is read and unfolded once instead of m times.
        """
        first = self.features[0]
        h = F.conv2d(_channels_last(x), first.weight, padding=first.padding)
        for layer in self.features[1:]:
            h = layer(h)
        return self._embedding(h)

    def _embedding(self, features: torch.Tensor) -> torch.Tensor:
        if self.dropout > 0 and self.training:  # no dropout call at all when off: seeded runs keep their RNG
            features = F.dropout(features, self.dropout, training=True)
        return self.dense(features).reshape(features.shape[0], self.groups, self.rep_dim)


class GroupedDecoder(nn.Module):
    """Mirror of the encoder for autoencoder pretraining: [B, m, rep_dim] -> [B, m, C, H, W]."""

    def __init__(self, groups: int, channels: int, size: int, rep_dim: int = 128, width: int = 1):
        super().__init__()
        self.groups, self.channels, self.size = groups, channels, size
        self.sizes = feature_sizes(size)
        widths = [w * width for w in reversed(WIDTHS)]  # 128, 64, 32 (times width)
        self.dense = nn.ConvTranspose2d(groups * rep_dim, groups * widths[0], self.sizes[-1], bias=False, groups=groups)
        self.dense_bn = nn.BatchNorm2d(groups * widths[0], eps=BN_EPS, affine=False)
        outs = [*widths[1:], channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(groups * w_in, groups * w_out, KERNEL, padding=KERNEL // 2, bias=False, groups=groups)
            for w_in, w_out in zip(widths, outs, strict=True)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(groups * w, eps=BN_EPS, affine=False) for w in outs[:-1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        x = F.leaky_relu(self.dense_bn(_channels_last(self.dense(z.reshape(batch, -1, 1, 1)))), LEAK)
        targets = list(reversed(self.sizes[:-1]))  # 8, 16, 32
        for k, (conv, target) in enumerate(zip(self.convs, targets, strict=True)):
            x = conv(F.interpolate(x, size=(target, target), mode="nearest"))
            if k < len(self.bns):
                x = F.leaky_relu(self.bns[k](x), LEAK)
        return x.reshape(batch, self.groups, self.channels, self.size, self.size)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class GroupedAutoencoder(nn.Module):
    def __init__(self, groups: int, channels: int, size: int, rep_dim: int = 128, dropout: float = 0.0, width: int = 1):
        super().__init__()
        self.encoder = GroupedEncoder(groups, channels, size, rep_dim, dropout, width)
        self.decoder = GroupedDecoder(groups, channels, size, rep_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class GroupedLogitHead(nn.Module):
    """DROCC's classifier on top of the LeNet encoder: leaky ReLU -> dense(rep_dim/2) -> leaky ReLU -> dense(1).

    As in DROCC's CIFAR-10 network (no biases). Grouped like the encoder: [B, m, rep_dim] -> logits
    [B, m], plus the rep_dim/2 hidden features [B, m, rep_dim/2] that section 5.1 analyses.
    """

    def __init__(self, groups: int, rep_dim: int = 128):
        super().__init__()
        self.groups, self.hidden = groups, rep_dim // 2
        self.fc2 = nn.Conv2d(groups * rep_dim, groups * self.hidden, 1, bias=False, groups=groups)
        self.fc3 = nn.Conv2d(groups * self.hidden, groups, 1, bias=False, groups=groups)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = z.shape[0]
        hidden = F.leaky_relu(self.fc2(F.leaky_relu(z, LEAK).reshape(batch, -1, 1, 1)), LEAK)
        logits = self.fc3(hidden).reshape(batch, self.groups)
        return logits, hidden.reshape(batch, self.groups, self.hidden)


class GroupedClassifier(nn.Module):
    """m DROCC networks (encoder + logit head): [B, m, C, H, W] -> (logits [B, m], features [B, m, F])."""

    def __init__(self, groups: int, channels: int, size: int, rep_dim: int = 128):
        super().__init__()
        self.encoder = GroupedEncoder(groups, channels, size, rep_dim)
        self.head = GroupedLogitHead(groups, rep_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x))

    def forward_shared(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same images [B, C, H, W] through every network."""
        return self.head(self.encoder.embed_shared(x))
