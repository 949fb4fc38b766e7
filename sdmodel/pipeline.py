"""Text to image: load a model once, then generate batches of independent requests.

This is the seam with the worker: `load_pipeline(ref, device, dtype)` and
`Pipeline.generate(requests, **shape.settings())`: a batch shares a `params.BatchShape`
(sampler, steps, size, eta) while each `params.Request` carries its own prompt, negative
prompt, seed and guidance scale; an image comes out the same alone or at any position of any
batch because its noise comes only from its own CPU generator.
"""
from __future__ import annotations

from contextlib import ExitStack
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
    model_identity,
    model_sha256,
    read_config,
    read_weights,
    resolve_model_ref,
    split_ldm,
)
from .configs import (
    LATENT_SCALE,
    UNetConfig,
    VAEConfig,
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
)
from .fastpath import CPU_BATCH_SIZE, FastPath, auto_batch_size, bucket_size
from sdq.core.params import BatchShape, Request, short_hash
from .samplers import sample
from .unet import UNetModel, timestep_frequencies
from .vae import AttnBlock, AutoencoderKL

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


def _sdpa_priority() -> ExitStack:
    """SDPA backends tried in the order cuDNN, flash, memory-efficient, math: on Hopper the
    cuDNN kernel is the fastest where it applies, and PyTorch's default order skips it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    stack = ExitStack()
    try:
        stack.enter_context(sdpa_kernel(order, set_priority=True))
    except TypeError:  # torch < 2.6 has no priorities: its own order stands
        pass
    return stack


class Pipeline:
    """A loaded model on one device: UNet, autoencoder, text encoder and tokenizer.

    `fast` (default: `FastPath.for_device(device)`) picks the speed-ups; `set_fast_path`
    changes them on the loaded networks, which is how the GPU probe measures each one."""

    def __init__(
        self, unet: UNetModel, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer,
        *, sha256: str, name: str, device: str, dtype: str, fast: FastPath | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.sha256, self.name, self.device, self.dtype = sha256, name, device, dtype
        self.set_fast_path(fast or FastPath.for_device(device))

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def set_fast_path(self, fast: FastPath) -> None:
        """Lay out the networks and build the UNet / decoder callables `fast` asks for."""
        memory_format = torch.channels_last if fast.channels_last else torch.contiguous_format
        self.unet.to(memory_format=memory_format)
        self.vae.to(memory_format=memory_format)
        # A captured graph cannot copy from the host, so graphs need the frequencies in place too.
        self.unet.time_freqs = (timestep_frequencies(self.unet.config.model_channels).to(self.device)
                                if fast.device_loop or fast.cuda_graphs else None)
        for module in self.vae.modules():
            if isinstance(module, AttnBlock):
                module.contiguous_qkv = fast.contiguous_attention
        self._unet: Callable[..., Tensor] = self.unet
        self._decode: Callable[[Tensor], Tensor] = self.vae.decode
        if fast.compile:
            self._unet = torch.compile(self.unet, dynamic=False)
            self._decode = torch.compile(self.vae.decode, dynamic=False)
        elif fast.cuda_graphs and self.on_cuda:
            from .cudagraph import GraphedCall

            self._unet = GraphedCall(self.unet)
        self.fast = fast

    def default_batch_size(self, width: int = 512, height: int = 512) -> int:
        """On CUDA, the batch the free device memory holds (`fastpath.auto_batch_size`);
        elsewhere `CPU_BATCH_SIZE`."""
        if not self.on_cuda:
            return CPU_BATCH_SIZE
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return auto_batch_size(free, width, height, self.dtype)

    def _kernels(self) -> ExitStack:
        """The per-call kernel choices of the fast path (process-wide flags in PyTorch)."""
        if not self.on_cuda:
            return ExitStack()
        torch.backends.cudnn.benchmark = self.fast.cudnn_benchmark
        return _sdpa_priority() if self.fast.sdpa_order else ExitStack()

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.fast.channels_last else x

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
        guided = any(r.cfg > 1 for r in requests)
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
            out = self._unet(self._layout(x), t, context).float()
            if not guided:
                return out
            e_uncond, e_cond = out.chunk(2)
            return torch.where(cfg > 1, e_uncond + cfg * (e_cond - e_uncond), e_cond)

        with self._kernels():
            return sample(sampler, eps_model, noise, steps, eta=eta, generators=generators,
                          on_step=on_step, predraw=self.fast.device_loop)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        """8-bit RGB images by rounding, as diffusers does (truncating would shift every pixel).

        On the CPU the autoencoder runs one image at a time: its full-resolution activations
        then stay in cache, 8-10 % faster than a batch (docs/benchmarks.md); GPUs take the batch."""
        z = self._layout(latents.to(self.device, DTYPES[self.dtype]) / LATENT_SCALE)
        parts = z.split(1) if torch.device(self.device).type == "cpu" else [z]
        with self._kernels():
            x = torch.cat([self._decode(part) for part in parts]).float()
        pixels = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]

    def generate(self, requests: Sequence[Request], **settings) -> list[Image.Image]:
        """Unwatermarked images, one per request; CUDA out-of-memory reaches the caller so it
        can split the batch. Settings are those of `denoise`.

        With `pad_sizes` the batch is filled up to its bucket with copies of its last request
        (so it costs no new prompt), and those images are dropped."""
        n = len(requests)
        if self.fast.pad_sizes and requests:
            requests = [*requests, *[requests[-1]] * (bucket_size(n) - n)]
        return self.decode(self.denoise(requests, **settings))[:n]


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
    prefix = PREFIXES["text_encoder"]
    text = clip.load_text_encoder({prefix + k: v for k, v in parts["text_encoder"].items()}, path, prefix=prefix)
    return unet, vae, text, clip.load_tokenizer()


def _folder_part(
    part: Path, stem: str, architecture: Callable[[dict], object],
    load: Callable[[object, dict[str, Tensor], Path], torch.nn.Module],
) -> torch.nn.Module:
    """One component of a diffusers folder, built as its config.json says, then given the
    weights, which must fit exactly; a misfit is reported against the config that promised it."""
    config_file = part / "config.json"
    settings = read_config(part)
    try:
        config = architecture(settings)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(config_file, str(exc)) from None
    weights_file = folder_weights(part, stem)
    weights = read_weights(weights_file)
    try:
        return load(config, weights, weights_file)
    except CheckpointError as exc:
        raise CheckpointError(config_file, f"does not match {weights_file.name}: {exc.problem}") from None


def _load_unet(config: UNetConfig, weights: dict[str, Tensor], source: Path) -> UNetModel:
    with torch.device("meta"):
        model = UNetModel(config)
    load_weights(model, diffusers_unet_to_ldm(weights, config.num_res_blocks), source)
    return model


def _load_vae(config: VAEConfig, weights: dict[str, Tensor], source: Path) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    load_weights(model, diffusers_vae_to_ldm(weights, len(config.ch_mult)), source)
    return model


def _load_folder(path: Path) -> tuple[UNetModel, AutoencoderKL, torch.nn.Module, object]:
    """A folder's configs are its truth: each network is built as its config says."""
    unet = _folder_part(path / "unet", "diffusion_pytorch_model", unet_config_from_diffusers, _load_unet)
    vae = _folder_part(path / "vae", "diffusion_pytorch_model", vae_config_from_diffusers, _load_vae)
    text = _folder_part(
        path / "text_encoder", "model", clip.text_config_from_diffusers,
        lambda config, weights, source: clip.load_text_encoder(weights, source, config),
    )
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
    hash_cache: Path | None = None, fast: FastPath | str | None = None,
) -> Pipeline:
    """Load a single-file checkpoint, a diffusers folder or a cached Hugging Face repo id.

    `fast`: the fast path, or its setting string (`SDQ_FAST_PATH`, read against the resolved
    device); default: the device's defaults."""
    device = device or default_device()
    if isinstance(fast, str):
        fast = FastPath.parse(fast, device)
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    path = resolve_model_ref(ref)
    # The hash names the weights loaded only if the files stayed the same meanwhile: checked
    # once per load by their identity (`file_identity`), which the hash cache is keyed by.
    before = model_identity(path)
    unet, vae, text, tokenizer = (_load_folder if path.is_dir() else _load_single_file)(path)
    sha256 = model_sha256(path, hash_cache)
    if model_identity(path) != before:
        raise CheckpointError(path, "changed while it was being loaded; try again once it is "
                                    "written")
    for module in (unet, vae, text):
        module.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        _align_weights(module)
    name = str(ref) if not Path(str(ref)).expanduser().exists() else path.stem if path.is_file() else path.name
    return Pipeline(
        unet, vae, text, tokenizer, sha256=sha256, name=name, device=device, dtype=dtype,
        fast=fast,
    )
