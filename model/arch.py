"""CSAEGAN generator: ESRGAN's RRDBNet with one CSA (channel + spatial) attention block per RRDB.

Reconstructed from Appl. Sci. 2026, 16(4), 1797 (see DESIGN.md §6). The paper configuration
(23 RRDBs, 64 features, growth 32, 1 channel in and out, ``attention="csa"``) has exactly
16,746,902 parameters; ``csa_pooled`` has the same count, since pooling has none.

Channel attention in the paper's block has **no pooling**: the two 1x1 convolutions act on every
position, so the gate is a per-pixel, per-channel sigmoid. The pooled ablation applies the same
MLP to global average- and max-pooled vectors, as CBAM does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Attention = Literal["csa", "csa_pooled", "none"]
ATTENTIONS: tuple[str, ...] = ("csa", "csa_pooled", "none")


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """Everything needed to rebuild a generator; stored in every checkpoint card."""

    attention: Attention = "csa"
    num_blocks: int = 23
    num_feat: int = 64
    num_grow: int = 32
    scale: int = 4
    in_channels: int = 1
    reduction: int = 4
    spatial_kernel: int = 7
    global_skip: bool = False  # add bicubic(x) to the output; with a zero last conv it starts at bicubic

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.scale != 4:
            raise ValueError(f"scale must be 4 (the model upsamples x2 twice), got {self.scale}")
        for name in ("num_blocks", "num_feat", "num_grow", "in_channels", "reduction"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_feat % self.reduction:
            raise ValueError(
                f"num_feat ({self.num_feat}) must be divisible by reduction ({self.reduction})"
            )
        if self.spatial_kernel % 2 != 1:
            raise ValueError(f"spatial_kernel must be odd, got {self.spatial_kernel}")

    @classmethod
    def from_dict(cls, data: dict) -> ArchConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


PAPER = ArchConfig()


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions with dense connections, residual scaled by 0.2 (ESRGAN)."""

    def __init__(self, *, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow, num_grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow, num_grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow, num_grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, a=0.2)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F, H, W) -> (B, F, H, W)
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, *, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat=num_feat, num_grow=num_grow)
        self.rdb2 = ResidualDenseBlock(num_feat=num_feat, num_grow=num_grow)
        self.rdb3 = ResidualDenseBlock(num_feat=num_feat, num_grow=num_grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class CSA(nn.Module):
    """Channel attention then spatial attention.

    ``pooled=False`` (the paper): ``x * sigmoid(W2 relu(W1 x))`` with 1x1 convolutions applied
    at every position. ``pooled=True`` (ablation, CBAM): the same MLP on the global average- and
    max-pooled vectors, summed. Spatial: ``x * sigmoid(conv7x7([mean_c(x), max_c(x)]))``.
    """

    def __init__(self, *, num_feat: int, reduction: int, spatial_kernel: int, pooled: bool) -> None:
        super().__init__()
        self.pooled = pooled
        self.fc1 = nn.Conv2d(num_feat, num_feat // reduction, 1)
        self.fc2 = nn.Conv2d(num_feat // reduction, num_feat, 1)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, 1, spatial_kernel // 2)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F, H, W)
        if self.pooled:
            gate = self._mlp(F.adaptive_avg_pool2d(x, 1)) + self._mlp(F.adaptive_max_pool2d(x, 1))
        else:
            gate = self._mlp(x)  # (B, F, H, W): per position, no pooling
        x = x * torch.sigmoid(gate)
        desc = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.spatial(desc))


class Generator(nn.Module):
    """RRDBNet (+ CSA after each RRDB) for 1-channel images, x4: (B, 1, H, W) -> (B, 1, 4H, 4W)."""

    def __init__(self, config: ArchConfig = PAPER) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv_first = nn.Conv2d(c.in_channels, c.num_feat, 3, 1, 1)
        blocks: list[nn.Module] = []
        for _ in range(c.num_blocks):
            blocks.append(RRDB(num_feat=c.num_feat, num_grow=c.num_grow))
            if c.attention != "none":
                blocks.append(
                    CSA(
                        num_feat=c.num_feat,
                        reduction=c.reduction,
                        spatial_kernel=c.spatial_kernel,
                        pooled=c.attention == "csa_pooled",
                    )
                )
        self.body = nn.Sequential(*blocks)
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.in_channels, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        if c.global_skip:
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, 1, 4H, 4W)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        if self.config.global_skip:
            out = out + F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
        return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs(generator: Generator, size: int = 64) -> int:
    """Multiply-accumulates of one ``size``² -> (4·size)² pass, from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, generator.config.in_channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generator(x)
    return counter.get_total_flops() // 2
