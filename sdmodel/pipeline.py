"""Text to image: load a model once, then generate batches of independent requests.

This is the seam with the worker: `load_pipeline(ref, device, dtype)` and
`Pipeline.generate(requests, **shape.settings())`: a batch shares a `params.BatchShape`
(sampler, steps, size, eta) while each `params.Request` carries its own prompt, negative
prompt, seed and guidance scale; an image comes out the same alone or at any position of any
batch because its noise comes only from its own CPU generator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import clip
from .checkpoint import (
    PREFIXES,
    CheckpointError,
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    folder_weights,
    load_weights,
    model_sha256,
    read_weights,
    resolve_model_ref,
    split_ldm,
)
from .configs import (
    LATENT_SCALE,
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
)
from .params import BatchShape, Request, short_hash
from .samplers import sample
from .unet import UNetModel
from .vae import AutoencoderKL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    """Half precision where the hardware is made for it; fp32 on the CPU."""
    return "fp32" if device == "cpu" else "fp16"


class Pipeline:
    """A loaded model on one device: UNet, autoencoder, text encoder and tokenizer."""

    def __init__(
        self, unet: UNetModel, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer,
        *, sha256: str, name: str, device: str, dtype: str,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.sha256, self.name, self.device, self.dtype = sha256, name, device, dtype

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @torch.inference_mode()
    def denoise(
        self, requests: Sequence[Request], *, on_step: Callable[[int, int], None] | None = None,
        **settings: Any,
    ) -> Tensor:
        """The final latents (float32, unscaled by the VAE factor) of a batch of requests.

        `settings` are the fields of a `params.BatchShape` (sampler, steps, width, height,
        eta; its defaults for those left out), checked here (ParamError); the requests were
        checked when built."""
        if not requests:
            raise ValueError("no requests to generate")
        shape = BatchShape(**settings)
        sampler, steps, width, height, eta = (shape.sampler, shape.steps, shape.width,
                                              shape.height, shape.eta)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        noise = torch.cat([
            torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32)
            for g in generators
        ]).to(self.device)
        dtype = DTYPES[self.dtype]
        cfg = torch.tensor([r.cfg for r in requests], device=self.device)[:, None, None, None]
        guided = bool((cfg > 1).any())
        ids = clip.tokenize(self.tokenizer, [r.prompt for r in requests]
                            + ([r.negative_prompt for r in requests] if guided else []))
        embeddings = clip.encode(self.text_encoder, ids, self.device).to(dtype)
        if guided:
            cond, uncond = embeddings.chunk(2)
            context = torch.cat([uncond, cond])
        else:
            context = embeddings

        def eps_model(x: Tensor, t: Tensor) -> Tensor:
            x = x.to(dtype)
            if guided:
                x = torch.cat([x, x])
            out = self.unet(x, t, context).float()
            if not guided:
                return out
            e_uncond, e_cond = out.chunk(2)
            return torch.where(cfg > 1, e_uncond + cfg * (e_cond - e_uncond), e_cond)

        return sample(sampler, eps_model, noise, steps, eta=eta, generators=generators, on_step=on_step)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        """8-bit RGB images by rounding, as diffusers does (truncating would shift every pixel).

        On the CPU the autoencoder runs one image at a time: its full-resolution activations
        then stay in cache, 8-10 % faster than a batch (docs/benchmarks.md); GPUs take the batch."""
        z = latents.to(self.device, DTYPES[self.dtype]) / LATENT_SCALE
        parts = z.split(1) if torch.device(self.device).type == "cpu" else [z]
        x = torch.cat([self.vae.decode(part) for part in parts]).float()
        pixels = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]

    def generate(self, requests: Sequence[Request], **settings) -> list[Image.Image]:
        """Unwatermarked images, one per request; CUDA out-of-memory reaches the caller so it
        can split the batch. Settings are those of `denoise`."""
        return self.decode(self.denoise(requests, **settings))


def _load_text_encoder(sd: dict[str, Tensor], source: Path, prefix: str = "") -> torch.nn.Module:
    """Build the text encoder and load it; checkpoints say `text_model.embeddings...`, while
    transformers 5's CLIPTextModel has dropped that level, so keys follow the module."""
    try:
        text = clip.build_text_encoder(clip.text_config_from_state_dict(sd))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(source, str(exc)) from None
    nested = any(k.startswith("text_model.") for k in text.state_dict())
    head = "text_model." if nested else ""
    load_weights(text, {head + k.removeprefix("text_model."): v for k, v in sd.items()},
                 source, prefix + ("" if nested else "text_model."))
    return text


def _detect(detect: Callable[[dict[str, Tensor]], object], sd: dict[str, Tensor], source: Path, prefix: str):
    """Architecture from shapes; a weight the detection needs and cannot find is named."""
    try:
        return detect(sd)
    except KeyError as exc:
        raise CheckpointError(source, f"missing weights: {prefix}{exc.args[0]}") from None
    except ValueError as exc:
        raise CheckpointError(source, f"unrecognised layout under {prefix}*: {exc}") from None


def _load_single_file(path: Path) -> tuple[UNetModel, AutoencoderKL, torch.nn.Module, object]:
    parts = split_ldm(read_weights(path), path)
    with torch.device("meta"):
        unet = UNetModel(_detect(unet_config_from_state_dict, parts["unet"], path, PREFIXES["unet"]))
        vae = AutoencoderKL(_detect(vae_config_from_state_dict, parts["vae"], path, PREFIXES["vae"]))
    load_weights(unet, parts["unet"], path, PREFIXES["unet"])
    load_weights(vae, parts["vae"], path, PREFIXES["vae"])
    text = _load_text_encoder(parts["text_encoder"], path, PREFIXES["text_encoder"])
    return unet, vae, text, clip.load_tokenizer()


def _load_folder(path: Path) -> tuple[UNetModel, AutoencoderKL, torch.nn.Module, object]:
    def config(part: str) -> dict:
        file = path / part / "config.json"
        if not file.is_file():
            raise CheckpointError(path, f"not a diffusers model folder: {part}/config.json missing")
        return json.loads(file.read_text())

    unet_cfg, vae_cfg = config("unet"), config("vae")
    unet_sd = diffusers_unet_to_ldm(
        read_weights(folder_weights(path / "unet", "diffusion_pytorch_model")), unet_cfg["layers_per_block"]
    )
    vae_sd = diffusers_vae_to_ldm(
        read_weights(folder_weights(path / "vae", "diffusion_pytorch_model")), len(vae_cfg["block_out_channels"])
    )
    text_sd = {
        k: v for k, v in read_weights(folder_weights(path / "text_encoder", "model")).items()
        if not k.endswith("position_ids")
    }
    with torch.device("meta"):
        unet = UNetModel(unet_config_from_diffusers(unet_cfg))
        vae = AutoencoderKL(vae_config_from_diffusers(vae_cfg))
    load_weights(unet, unet_sd, path / "unet")
    load_weights(vae, vae_sd, path / "vae")
    text = _load_text_encoder(text_sd, path / "text_encoder")
    tokenizer = clip.load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else None)
    return unet, vae, text, tokenizer


def _align_weights(module: torch.nn.Module, alignment: int = 64) -> None:
    """Move weights that sit at odd addresses into fresh, aligned memory.

    A `.safetensors` file is mapped as it is, so each tensor starts wherever the header's length
    puts it; MKL picks its kernels by alignment too, and the same weights read from two files
    with different headers would then give results a float ulp apart. PyTorch's own
    allocations (and any device or dtype change) are aligned already.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def load_pipeline(
    ref: str | Path, *, device: str | None = None, dtype: str | None = None,
    hash_cache: Path | None = None,
) -> Pipeline:
    """Load a single-file checkpoint, a diffusers folder or a cached Hugging Face repo id."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    path = resolve_model_ref(ref)
    unet, vae, text, tokenizer = (_load_folder if path.is_dir() else _load_single_file)(path)
    for module in (unet, vae, text):
        module.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        _align_weights(module)
    name = str(ref) if not Path(str(ref)).expanduser().exists() else path.stem if path.is_file() else path.name
    return Pipeline(
        unet, vae, text, tokenizer, sha256=model_sha256(path, hash_cache), name=name,
        device=device, dtype=dtype,
    )
