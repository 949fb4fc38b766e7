"""Text to image: load a model once, then generate batches of independent requests.

This is the seam with the worker: `load_pipeline(ref, device, dtype)` and
`Pipeline.generate(requests, **shape.settings())`: a batch shares a `params.BatchShape`
(sampler, steps, size, eta), a LoRA set (`loras=`, see `lora.py`) and, for image-to-image, a
strength, while each `params.Request` carries its own prompt, negative prompt, seed and
guidance scale (and its own init image); an image comes out the same alone or at any position
of any batch because its randomness comes only from its own CPU generator.

Over 400 lines on purpose: the pipeline and the loaders that build it from either
checkpoint layout, which must agree on how the networks are configured.
"""
from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdq.core.init_image import steps_run
from sdq.core.params import BatchShape, Request, short_hash

from . import clip
from .checkpoint import (
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    load_weights,
    read_weights,
    split_ldm,
)
from .compiled import CompileBackend, compile_network
from .configs import (
    LATENT_SCALE,
    UNetConfig,
    VAEConfig,
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
)
from .conditioning import PromptText, encode_prompts
from .devices import default_dtype
from .embeddings import EmbeddingRegistry
from .fastpath import CPU_BATCH_SIZE, FastPath, auto_batch_size, bucket_size
from .guards import SdpaOrder, redo_nonfinite, sdpa_priority
from .img2img import posterior_sample, to_pixels
from .lora import Adapters
from .modelfiles import (
    PREFIXES,
    CheckpointError,
    folder_weights,
    model_identity,
    model_sha256,
    read_config,
    resolve_model_ref,
)
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


class Images(list):
    """A batch's images in request order, with the positions whose decode overflowed in the
    autoencoder's dtype and was redone in float32 (`redecoded`: for the image's record)."""

    redecoded: tuple[int, ...] = ()


class Pipeline:
    """A loaded model on one device: UNet, autoencoder, text encoder and tokenizer.

    `fast` (default: `FastPath.for_device(device)`) picks the speed-ups; `set_fast_path`
    changes them on the loaded networks, which is how the GPU probe measures each one.
    `vae_dtype`: the autoencoder's (default: `dtype`; the networks are moved to it here).
    `sdpa_order`: the fast path's SDPA backend order as a context (`guards.sdpa_priority`),
    dropped for PyTorch's own if it fails (`guards.SdpaOrder`). `compile_backend`: what the
    fast path's `compile` hands `torch.compile` (tests count compilations with their own).
    `embeddings`: the textual-inversion embeddings `a1111` prompts may name (none without).
    `adapters` holds the LoRA set merged now; `lora_dirs` are the folders LoRA names are
    looked up in."""

    def __init__(
        self, unet: UNetModel, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer,
        *, sha256: str, name: str, device: str, dtype: str, fast: FastPath | None = None,
        embeddings: EmbeddingRegistry | None = None, lora_dirs: Sequence[Path | str] = (),
        vae_dtype: str | None = None,
        sdpa_order: Callable[[], AbstractContextManager] = sdpa_priority,
        compile_backend: CompileBackend = "inductor",
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.sha256, self.name, self.device, self.dtype = sha256, name, device, dtype
        self.vae_dtype = vae_dtype or dtype
        self.vae.to(DTYPES[self.vae_dtype])
        self.sdpa = SdpaOrder(sdpa_order)
        self.compile_backend = compile_backend
        self.adapters = Adapters(unet, text_encoder, dirs=lora_dirs)
        self.set_fast_path(fast or FastPath.for_device(device))
        self.set_embeddings(embeddings)

    def set_embeddings(self, embeddings: EmbeddingRegistry | Path | str | None) -> None:
        """Use the embeddings of a registry, or of a folder (read for this model's tokenizer and
        text encoder width); None for none. ValueError for a registry made for another width."""
        width = self.text_encoder.config.hidden_size
        if isinstance(embeddings, (Path, str)):
            embeddings = EmbeddingRegistry(embeddings, self.tokenizer, width)
        if embeddings is not None and embeddings.width not in (None, width):
            raise ValueError(f"embeddings read for a {embeddings.width}-wide text encoder; this one is {width}")
        self.embeddings = embeddings

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
        self._vae_fp32: AutoencoderKL | None = None
        if fast.compile:
            self._unet = compile_network(self.unet, self.compile_backend)
            self._decode = compile_network(self.vae.decode, self.compile_backend)
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

    def _kernels(self, key: tuple, work: Callable[[], Tensor]) -> Tensor:
        """One network call with the fast path's kernel choices (process-wide flags in
        PyTorch): cuDNN benchmarking, and the SDPA order while that order works
        (`guards.SdpaOrder`, which may run the call twice: it must have no side effects)."""
        if self.on_cuda:
            torch.backends.cudnn.benchmark = self.fast.cudnn_benchmark
        return self.sdpa.run(key, work) if self.fast.sdpa_order else work()

    def _fp32_vae(self) -> AutoencoderKL:
        """The autoencoder in float32, copied on first use (it costs the memory of a float32
        autoencoder, so only a model that overflows ever pays it)."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).float()
        return self._vae_fp32

    def _decode_fp32(self, latents: Tensor) -> Tensor:
        """The autoencoder's decode in float32."""
        return self._fp32_vae().decode(self._layout(latents.to(self.device, torch.float32) / LATENT_SCALE))

    def _encode_fp32(self, pixels: Tensor) -> Tensor:
        """The autoencoder's posterior moments (mean, log-variance) in float32, one image at a
        time as on the CPU."""
        vae = self._fp32_vae()
        return torch.cat([torch.cat(vae.encode(self._layout(part.to(self.device, torch.float32))),
                                    dim=1) for part in pixels.split(1)])

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.fast.channels_last else x

    def _unet_by_length(self, x: Tensor, t: Tensor, contexts: list[tuple[Tensor | None, Tensor]]) -> Tensor:
        """The UNet on each group of rows whose contexts have one length (`_by_length`)."""
        if len(contexts) == 1:
            return self._unet_call(x, t, contexts[0][1])
        out = torch.empty_like(x)
        for rows, context in contexts:
            out[rows] = self._unet_call(x[rows], t, context)
        return out

    def _unet_call(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """One UNet call under the fast path's kernel choices, keyed by its shapes."""
        return self._kernels(("unet", x.shape, context.shape),
                             lambda: self._unet(self._layout(x), t, context))

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], generators: Sequence[torch.Generator],
               width: int, height: int) -> Tensor:
        """Init images' scaled latents (float32), as diffusers' img2img pipeline makes them:
        resized to width x height, encoded, and sampled from the posterior with each image's
        generator (its first draw). On the CPU one image at a time, as `decode` and as diffusers
        encodes with a list of generators; GPUs take the batch. An image whose posterior comes
        out NaN or Inf in the autoencoder's dtype is encoded again in float32, as `decode` does
        (the same input gives the same outcome, so a replay takes the same path)."""
        pixels = torch.cat([to_pixels(image, width, height) for image in images])
        x = self._layout(pixels.to(self.device, DTYPES[self.vae_dtype]))
        parts = x.split(1) if torch.device(self.device).type == "cpu" else [x]
        moments = self._kernels(("encode", tuple(x.shape)), lambda: torch.cat(
            [torch.cat(self.vae.encode(part), dim=1) for part in parts]).float())
        redo_nonfinite(moments, None if self.vae_dtype == "fp32"
                       else lambda rows: self._encode_fp32(pixels[rows]),
                       step="encoding", cause="the autoencoder overflows on this init image")
        mean, logvar = moments.chunk(2, dim=1)
        return posterior_sample(mean, logvar, generators)

    @torch.inference_mode()
    def denoise(
        self, requests: Sequence[Request], *, on_step: Callable[[int, int], None] | None = None,
        loras: Iterable[tuple[str, float, str | None]] = (),
        init_images: Sequence[Image.Image] | None = None, strength: float | None = None,
        **settings: Any,
    ) -> Tensor:
        """The final latents (float32, unscaled by the VAE factor) of a batch of requests.

        `settings` are the fields of a `params.BatchShape` (sampler, steps, width, height,
        eta; its defaults for those left out), checked here (ParamError); the requests were
        checked when built, except against this model: InvalidInput for a clip skip deeper
        than its text encoder or an embedding it cannot use (`conditioning.encode_prompts`).
        `loras`, the batch's LoRA set ((name, weight, sha256) triples), is merged unless it is
        merged already; none restores the base weights. `init_images` (RGB, one per request)
        make it image-to-image at `strength` (ParamError outside (0, 1] or for no step run):
        each image's generator draws its latent sample, then its start noise."""
        if not requests:
            raise ValueError("no requests to generate")
        shape = BatchShape(**settings)
        self.adapters.apply(loras)
        sampler, steps, width, height, eta = (shape.sampler, shape.steps, shape.width,
                                              shape.height, shape.eta)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        start, init = 0, None
        if init_images is not None:
            if len(init_images) != len(requests) or strength is None:
                raise ValueError(f"img2img needs a strength and one init image per request, got "
                                 f"{len(init_images)} for {len(requests)} (strength {strength})")
            start = steps - steps_run(steps, strength)
            init = self.encode(init_images, generators, width, height)
        elif strength is not None:
            raise ValueError("a strength without init images")
        noise = torch.cat([
            torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32)
            for g in generators
        ]).to(self.device)
        dtype = DTYPES[self.dtype]
        cfg = torch.tensor([r.cfg for r in requests], device=self.device)[:, None, None, None]
        guided = any(r.cfg > 1 for r in requests)
        texts = [PromptText(r.prompt, r.prompt_syntax, r.clip_skip) for r in requests]
        if guided:
            texts += [PromptText(r.negative_prompt, r.prompt_syntax, r.clip_skip) for r in requests]
        states = [s.to(dtype) for s in encode_prompts(self.text_encoder, self.tokenizer, texts,
                                                      self.device, self.embeddings)]
        n = len(requests)
        contexts = _by_length([*states[n:], *states[:n]] if guided else states, self.device)

        def eps_model(x: Tensor, t: Tensor) -> Tensor:
            x = x.to(dtype)
            if guided:
                x = torch.cat([x, x])
            out = self._unet_by_length(x, t, contexts).float()
            if not guided:
                return out
            e_uncond, e_cond = out.chunk(2)
            return torch.where(cfg > 1, e_uncond + cfg * (e_cond - e_uncond), e_cond)

        return sample(sampler, eps_model, noise, steps, eta=eta, generators=generators,
                      on_step=on_step, predraw=self.fast.device_loop, init=init, start=start)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Images:
        """8-bit RGB images by rounding, as diffusers does (truncating would shift every pixel).

        On the CPU the autoencoder runs one image at a time: its full-resolution activations
        then stay in cache, 8-10 % faster than a batch (docs/benchmarks.md); GPUs take the batch.
        An image that comes out NaN or Inf is decoded again in float32 (`Images.redecoded`)."""
        z = self._layout(latents.to(self.device, DTYPES[self.vae_dtype]) / LATENT_SCALE)
        parts = z.split(1) if torch.device(self.device).type == "cpu" else [z]
        x = self._kernels(("decode", tuple(z.shape)),
                          lambda: torch.cat([self._decode(part) for part in parts]).float())
        redecoded = redo_nonfinite(
            x, None if self.vae_dtype == "fp32" else lambda rows: self._decode_fp32(latents[rows]),
            step="decoding", cause="their latents are not finite (the UNet overflowed?)")
        pixels = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        images = Images(Image.fromarray(np.ascontiguousarray(a)) for a in arrays)
        images.redecoded = tuple(redecoded)
        return images

    def generate(self, requests: Sequence[Request], *,
                 init_images: Sequence[Image.Image] | None = None, **settings) -> Images:
        """Unwatermarked images, one per request; CUDA out-of-memory reaches the caller so it
        can split the batch. Settings are those of `denoise`.

        With `pad_sizes` the batch is filled up to its bucket with copies of its last request
        (and init image), so it costs no new prompt, and those images are dropped."""
        n = len(requests)
        if self.fast.pad_sizes and requests:
            requests = [*requests, *[requests[-1]] * (bucket_size(n) - n)]
            if init_images is not None:
                init_images = [*init_images, *[init_images[-1]] * (bucket_size(n) - n)]
        decoded = self.decode(self.denoise(requests, init_images=init_images, **settings))
        images = Images(decoded[:n])
        images.redecoded = tuple(i for i in decoded.redecoded if i < n)
        return images


def _by_length(states: list[Tensor], device: str) -> list[tuple[Tensor | None, Tensor]]:
    """Contexts stacked per token length, with the batch rows they belong to (None: all).

    Prompts of different chunk counts (a long prompt, a short negative) are never padded to
    one length, which would change their images; each length gets its own UNet call instead,
    as A1111 does when prompt and negative prompt differ in length."""
    lengths: dict[int, list[int]] = {}
    for row, state in enumerate(states):
        lengths.setdefault(len(state), []).append(row)
    if len(lengths) == 1:
        return [(None, torch.stack(states))]
    return [(torch.tensor(rows, device=device), torch.stack([states[r] for r in rows]))
            for rows in lengths.values()]


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
    hash_cache: Path | None = None, fast: FastPath | str | None = None, vae_dtype: str | None = None,
    embeddings_dir: Path | str | None = None, lora_dirs: Sequence[Path | str] = (),
) -> Pipeline:
    """Load a single-file checkpoint, a diffusers folder or a cached Hugging Face repo id.

    `fast`: the fast path, or its setting string (`SDQ_FAST_PATH`, read against the resolved
    device); default: the device's defaults. `vae_dtype` (`SDQ_VAE_DTYPE`): the autoencoder's
    dtype, default `dtype`. `embeddings_dir`: a folder of textual-inversion embeddings
    (`Pipeline.set_embeddings`). `lora_dirs`: where LoRA names are looked up."""
    device = device or default_device()
    if isinstance(fast, str):
        fast = FastPath.parse(fast, device)
    dtype = dtype or default_dtype(device)
    for name, value in (("dtype", dtype), ("vae dtype", vae_dtype or dtype)):
        if value not in DTYPES:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(DTYPES)}")
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
        module_dtype = (vae_dtype or dtype) if module is vae else dtype
        module.to(device=device, dtype=DTYPES[module_dtype]).eval().requires_grad_(False)
        _align_weights(module)
    name = str(ref) if not Path(str(ref)).expanduser().exists() else path.stem if path.is_file() else path.name
    pipe = Pipeline(
        unet, vae, text, tokenizer, sha256=sha256, name=name,
        device=device, dtype=dtype, fast=fast, vae_dtype=vae_dtype, lora_dirs=lora_dirs,
    )
    pipe.set_embeddings(embeddings_dir)
    return pipe
