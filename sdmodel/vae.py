"""The KL autoencoder (LDM `AutoencoderKL`, f=8) that maps between pixels and latents.

Attribute paths mirror the checkpoint keys under `first_stage_model.` (encoder.down.0.block.1.
conv2, decoder.up.3.upsample.conv ...). The decoder's `up` list is indexed by resolution level,
so it is built in reverse, as in the original.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import VAEConfig

# Nearest 2x upsampling makes a 3x3 kernel's rows fall on two source rows: an even output row
# sees source rows (i-1, i) through kernel rows (0, 1+2), an odd one (i, i+1) through (0+1, 2).
# _PHASES[phase, tap, kernel row] holds those sums; the same holds for columns.
_PHASES = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # In place where the tensor is our own fresh intermediate: at 512x512 each one is
        # 32-128 MB, and every new one costs page faults on the CPU.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 conv projections, as in the checkpoint).

    `contiguous_qkv` (the fast path's `contiguous_attention`) lays q, k and v out token-major:
    CUDA's fused SDPA kernels need the last dimension contiguous, and without it SDPA falls
    back to the math kernel and its 4096x4096 score matrix per 512x512 image. In channels_last
    the projections come out token-major already, and the copy is free."""

    contiguous_qkv: bool = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (self._tokens(p(y)) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))

    def _tokens(self, y: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, H*W, C): one head over all pixels."""
        tokens = y.flatten(2).transpose(1, 2)[:, None]
        return tokens.contiguous() if self.contiguous_qkv else tokens


class Downsample(nn.Module):
    """Stride-2 conv after asymmetric padding (right and bottom only), as the checkpoint expects."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`conv(nearest_2x(x))` for a 3x3, padding-1 conv, computed as four 2x2 convs on `x` itself
    (one per output phase, stacked as output channels): 16/36 of the multiply-adds, and the
    4x larger upsampled input is never made. Equal up to float rounding of the summed taps."""
    b, _, h, w = x.shape
    o = conv.out_channels
    m = _PHASES.to(conv.weight)
    weight = torch.einsum("aik,ockl,bjl->abocij", m, conv.weight, m).reshape(4 * o, -1, 2, 2)
    y = F.conv2d(x, weight, conv.bias.repeat(4), padding=1).view(b, 2, 2, o, h + 1, w + 1)
    # output pixel (2i + a, 2j + c) is phase (a, c) at (i + a, j + c)
    rows = [torch.stack([y[:, a, c, :, a : a + h, c : c + w] for c in (0, 1)], -1) for a in (0, 1)]
    return torch.stack(rows, 3).view(b, o, 2 * h, 2 * w)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":  # measured there (docs/benchmarks.md); GPUs keep the plain path
            return upsample_conv(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: its res blocks and the resampling that leaves it (if any)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, width in enumerate(widths):
            blocks = [ResnetBlock(ch if j == 0 else width, width) for j in range(cfg.num_res_blocks)]
            ch = width
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = Mid(ch)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            blocks = [
                ResnetBlock(ch if j == 0 else widths[i], widths[i])
                for j in range(cfg.num_res_blocks + 1)
            ]
            ch = widths[i]
            levels.insert(0, Level(blocks, Upsample(ch) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """Pixels in [-1, 1] <-> unscaled latents (the pipeline applies the 0.18215 scale factor)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of the latent distribution (the log-variance clamped to
        [-30, 20] as LDM and diffusers clamp it); sampling from it is the caller's, with each
        image's own generator."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


