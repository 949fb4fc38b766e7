"""The latent diffusion UNet (LDM `openaimodel.UNetModel`), SD v1 family.

Attribute paths mirror the checkpoint keys under `model.diffusion_model.` (input_blocks.1.1.
transformer_blocks.0.attn2.to_k ...), so a state dict loads by name with no converter; identity
modules hold the places of dropout layers to keep the indices aligned.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import UNetConfig


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """The `dim // 2` float32 frequencies of the sinusoidal timestep embedding, made on the CPU
    (so they are bit-identical on every device) and moved once by the caller."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: Tensor, dim: int, freqs: Tensor | None = None) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, in float32.

    `freqs` already on `t`'s device spares a host-to-device copy per call, which would
    synchronise a CUDA denoising loop and break CUDA-graph capture."""
    freqs = timestep_frequencies(dim).to(t.device) if freqs is None else freqs
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


class Conv2d(nn.Conv2d):
    """A convolution that, in float32 on the CPU, keeps its weight laid out for oneDNN.

    PyTorch's CPU convolution hands oneDNN the plain weight, and oneDNN re-lays it out on every
    call. For the deep 640- and 1280-channel convs at 8x8 to 16x16 latents (up to 59 MB of
    weight each, a few hundred output pixels) that copy costs as much as the arithmetic; done
    once, a UNet call is 9-16 % faster than with the im2col GEMM this replaced
    (docs/benchmarks.md). The autoencoder keeps plain convolutions: on its wide images the
    prepared weight measured slower.

    The laid-out weight replaces the plain one (a 3.4 GB UNet would otherwise be held twice):
    it is made on first use, and turned back into the plain weight before anything else
    reads it — `.to()` and friends, `state_dict()`, loading in place.
    """

    def _cpu_prepared(self, x: Tensor) -> bool:
        # Compiling first: Dynamo folds it to True, so a compiled UNet has no graph break here.
        return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())

    def forward(self, x: Tensor) -> Tensor:
        if not self._cpu_prepared(x):
            return super().forward(x)
        if not self.weight.is_mkldnn:
            prepared = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(x.shape),
            )
            self.weight = nn.Parameter(prepared, requires_grad=False)
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(), self.weight, self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "",
        )

    def plain(self) -> None:
        """Give the weight back its plain (OIHW) layout; a no-op unless it was prepared."""
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)

    def _apply(self, fn, recurse: bool = True):
        self.plain()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self.plain()
        super()._load_from_state_dict(*args, **kwargs)


class Linear(nn.Linear):
    """A linear layer that, in float32 on the CPU, computes few rows (tokens) as weight @ x.T.

    MKL splits a product over threads along its rows; with 32 or 128 tokens (the 4x4 and 8x8
    levels) against 1280-10240 features that leaves threads idle; the transposed product makes
    a 2-core UNet call 1-4 % faster (docs/benchmarks.md).
    """

    GEMM_T_MAX_ROWS = 128

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or x.dtype != torch.float32 or rows > self.GEMM_T_MAX_ROWS:
            return super().forward(x)
        x_t = x.reshape(rows, self.in_features).t()
        out = torch.mm(self.weight, x_t) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, x_t)
        return out.t().contiguous().view(*x.shape[:-1], self.out_features)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Identity(),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention through PyTorch SDPA; self-attention when no context is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Identity())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (
            p.view(b, -1, self.heads, p.shape[-1] // self.heads).transpose(1, 2)
            for p in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-norm and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map; v1 projects with 1x1 convs, v2 with linears."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = group_norm(channels, eps=1e-6)
        proj = (lambda: Linear(channels, channels)) if linear else (
            lambda: Conv2d(channels, channels, 1)
        )
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling to the size of the skip connection it meets, then a conv.

    Doubling alone breaks on latents whose side is not a multiple of 8 (e.g. 96x64 images:
    12 -> 6 -> 3 -> 2 -> 4 != 3), so the target size comes from the skip connection.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A block whose layers each take what they need: the embedding, the text, the skip size."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size or (x.shape[-2] * 2, x.shape[-1] * 2))
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Predicts the noise in latents `x` at timesteps `t`, conditioned on text embeddings.

    `time_freqs`: the timestep frequencies on the model's device, set by the pipeline's fast
    path (not a buffer: checkpoints do not carry it, and meta-device loading would leave it
    empty); `None` makes them per call."""

    time_freqs: Tensor | None = None

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))

        def attention(ch: int) -> SpatialTransformer:
            return SpatialTransformer(
                ch, config.heads(ch), config.context_dim, config.transformer_depth,
                config.linear_projection,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(config.in_channels, mc, 3, padding=1))]
        )
        skips = [mc]
        ch = mc
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if level in config.attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), attention(ch), ResBlock(ch, emb_dim, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if level in config.attention_levels:
                    layers.append(attention(ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), Conv2d(mc, config.out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        t = t.to(x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, self.time_freqs).to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context, hs[-1].shape[-2:] if hs else None)
        return self.out(h)
