"""V-Net backbone, the UA-MT / SSL4MIS variant that SGRS-Net uses.

Input ``(B, C, D, H, W)`` with every spatial size divisible by 16; output logits
``(B, K, D, H, W)``. With C=1, K=2 and 16 base filters it has 9,448,866 trainable
parameters (the parity figure of the published code).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

#: Widest network built: parameters grow with the square of the base filters (9.4 M at 16,
#: 2.4 G at 256), and a checkpoint's metadata must not be able to ask for more.
MAX_BASE_FILTERS = 256


def _conv_stage(n_convs: int, c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [
            nn.Conv3d(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=1),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)
    )


class VNet(nn.Module):
    """Encoder stages of 1,2,3,3,3 convs (widths F..16F), additive skips, decoder of 3,3,2,1."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_filters: int = 16,
                 dropout: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + target), got {num_classes}")
        if not 1 <= base_filters <= MAX_BASE_FILTERS:
            raise ConfigError(f"base filters must be between 1 and {MAX_BASE_FILTERS}, got {base_filters}")
        f = base_filters
        self.in_channels, self.num_classes, self.base_filters = in_channels, num_classes, f
        self.enc1, self.down1 = _conv_stage(1, in_channels, f), _down(f, 2 * f)
        self.enc2, self.down2 = _conv_stage(2, 2 * f, 2 * f), _down(2 * f, 4 * f)
        self.enc3, self.down3 = _conv_stage(3, 4 * f, 4 * f), _down(4 * f, 8 * f)
        self.enc4, self.down4 = _conv_stage(3, 8 * f, 8 * f), _down(8 * f, 16 * f)
        self.enc5 = _conv_stage(3, 16 * f, 16 * f)
        self.up5, self.dec6 = _up(16 * f, 8 * f), _conv_stage(3, 8 * f, 8 * f)
        self.up6, self.dec7 = _up(8 * f, 4 * f), _conv_stage(3, 4 * f, 4 * f)
        self.up7, self.dec8 = _up(4 * f, 2 * f), _conv_stage(2, 2 * f, 2 * f)
        self.up8, self.dec9 = _up(2 * f, f), _conv_stage(1, f, f)
        self.head = nn.Conv3d(f, num_classes, kernel_size=1)
        # Dropout3d is active only in train mode (nn.Module semantics).
        self.dropout = nn.Dropout3d(p=dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 16 for s in x.shape[2:]):
            raise ConfigError(f"V-Net input sizes must be divisible by 16, got {tuple(x.shape[2:])}")
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.dropout(self.enc5(self.down4(x4)))
        y = self.dec6(self.up5(x5) + x4)
        y = self.dec7(self.up6(y) + x3)
        y = self.dec8(self.up7(y) + x2)
        y = self.dec9(self.up8(y) + x1)
        return self.head(self.dropout(y))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
