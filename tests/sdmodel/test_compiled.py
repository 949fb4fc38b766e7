"""torch.compile as the fast path sets it up: every batch size from 1 to 32, guided or not,
runs compiled, each padding bucket compiled once (Dynamo's default limit of 8 graphs per
function would leave most of them running uncompiled, silently).

Dynamo's "eager" path, through a backend that counts, and stand-in networks of a few
operations: tracing the tiny UNet takes Dynamo tens of seconds per shape on a CPU, and what is
under test is the shapes the pipeline hands it, not the network."""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sdq.sdmodel import clip
from sdq.sdmodel.compiled import raise_recompile_limit
from sdq.sdmodel.fastpath import FastPath, bucket_size, compiled_shapes
from sdq.sdmodel.pipeline import Pipeline, Request
from sdq.sdmodel.tiny import TINY_TEXT


class StandInUNet(nn.Module):
    """The UNet's call (latents, timestep, text context) -> noise, in three operations."""

    def __init__(self, context_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.text = nn.Linear(context_dim, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.text(context.mean(1))[:, :, None, None] * t.float() / 1000


class StandInVAE(nn.Module):
    """The decoder's shapes: 4 latent channels to 3 pixel channels, 8x larger."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z).repeat_interleave(8, 2).repeat_interleave(8, 3)


class CountingBackend:
    """A torch.compile backend that runs each graph as traced, counting graphs and their calls."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)
        return run


def test_every_batch_size_runs_compiled_with_one_graph_per_bucket():
    backend = CountingBackend()
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, hidden_act="quick_gelu")).eval()
    pipe = Pipeline(StandInUNet(TINY_TEXT["hidden_size"]), StandInVAE(), text, clip.load_tokenizer(),
                    sha256="0" * 64, name="stand-in", device="cpu", dtype="fp32",
                    fast=FastPath(compile=True, pad_sizes=True), compile_backend=backend)
    sizes = range(1, 33)
    for cfg in (7.5, 1.0):  # guided: the UNet sees the CFG pair, twice the rows
        for n in sizes:
            pipe.generate([Request(f"prompt {i}", "", seed=i, cfg=cfg) for i in range(n)],
                          sampler="ddim", steps=1, width=64, height=64)
    buckets = {bucket_size(n) for n in sizes}
    unet_shapes = buckets | {2 * b for b in buckets}  # unguided and guided rows
    decoded = 2 * sum(bucket_size(n) for n in sizes)  # the CPU decodes one image at a time
    assert backend.graphs == len(unet_shapes) + 1  # + the decoder, at batch 1
    assert backend.calls == 2 * len(sizes) + decoded, "a network call ran uncompiled"
    assert compiled_shapes() >= len(unet_shapes) * 4


def test_the_recompile_limit_is_only_ever_raised():
    from torch._dynamo import config

    before = config.recompile_limit
    raise_recompile_limit(before + 5)
    raise_recompile_limit(1)
    assert config.recompile_limit == before + 5
