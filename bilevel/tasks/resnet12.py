"""ResNet-12, the few-shot backbone of TADAM (Oreshkin, Rodríguez López, Lacoste, NeurIPS 2018)
at the widths of MetaOptNet (Lee, Maji, Ravichandran, Soatto, CVPR 2019), the scale of ESJ's
mini-ImageNet experiment (Sow, Ji, Liang, arXiv 2110.07004).

Four residual blocks of 64-160-320-640 channels. Each block: three conv 3x3 - BatchNorm, with
LeakyReLU(0.1) after the first two; a conv 1x1 - BatchNorm shortcut added to the third; a
LeakyReLU(0.1) after the sum; a 2x2 max-pool. A global average pool ends the network, so the
feature length is the last width at any input size (>= 16 px: four poolings). About 12.4M
parameters (convolutions have no bias: a BatchNorm follows each). DropBlock and dropout of the
published versions are left out (they would make the losses random inside the hypergradient).

BatchNorm keeps no running statistics (``track_running_stats=False``) and normalises with the
batch it sees, as conv-4 does in :mod:`bilevel.tasks.few_shot`: it then runs inside
``torch.func`` transforms. Evaluate it with a parameter tree through
:func:`bilevel.modules.functional` like any ``nn.Module``.
"""

from __future__ import annotations

from torch import Tensor, nn

WIDTHS = (64, 160, 320, 640)
NEGATIVE_SLOPE = 0.1


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
    ]


class ResidualBlock(nn.Module):
    """[conv3x3-BN-LeakyReLU]x2 - conv3x3-BN, plus a conv1x1-BN shortcut, LeakyReLU, max-pool 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            *_conv_bn(out_channels, out_channels, 3),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            *_conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))
        self.activation = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.activation(self.body(images) + self.shortcut(images)))


def check_widths(widths: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``widths`` as a tuple of 4 positive integers (one per block), else ``ValueError``."""
    ok = isinstance(widths, (tuple, list)) and len(widths) == 4
    if not ok or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be 4 positive integers (one per block), got {widths!r}")
    return tuple(widths)


def resnet12(in_channels: int = 1, widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    """The four residual blocks of ``widths`` channels, global average pool, flatten:
    [n, in_channels, H, W] -> [n, widths[-1]] for H, W >= 16."""
    widths = check_widths(widths)
    inputs = (in_channels, *widths[:-1])
    blocks = [ResidualBlock(c_in, c_out) for c_in, c_out in zip(inputs, widths, strict=True)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
