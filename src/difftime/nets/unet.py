"""A compact DDPM-style U-Net eps-network for images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftime.nets.time_embedding import FourierTime


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 1) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """GroupNorm/SiLU residual U-Net; attention at the levels in ``attn_levels`` and in the middle.

    ``ch_mult[i]`` scales the width of level i; level i has resolution H / 2^i. Odd sizes
    (28 -> 14 -> 7 -> 4) work because upsampling targets the skip connection's size.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        groups: int = 8,
        heads: int = 1,
    ) -> None:
        super().__init__()
        temb = 4 * ch
        self.time = nn.Sequential(FourierTime(ch), nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, temb, dropout, groups))
                cur = ch * mult
                if level in attn_levels:
                    self.down.append(Attention(cur, groups, heads))
                skips.append(cur)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, dropout, groups)])
        if mid_attention:
            self.mid.append(Attention(cur, groups, heads))
        self.mid.append(ResBlock(cur, cur, temb, dropout, groups))

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * ch_mult[level], temb, dropout, groups))
                cur = ch * ch_mult[level]
                if level in attn_levels:
                    self.up.append(Attention(cur, groups, heads))
            if level > 0:
                self.up.append(_Upsample(cur))

        self.out = nn.Sequential(_norm(cur, groups), nn.SiLU(), nn.Conv2d(cur, in_channels, 3, padding=1))
        # Start as eps_hat = 0, the safe guess, so early training is not dominated by noise.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(t)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, Attention):
                hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            elif isinstance(layer, _Upsample):
                h = layer(h, hs[-1].shape[-2:])
            else:
                h = layer(h)
        return self.out(h)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
