"""The GPU fast path: which speed-ups a pipeline uses, one switch per piece so each can be
measured on and off (bench/gpu_probe.py does that A/B on a real GPU).

Torch-free at import, so settings and the CLI can parse `SDQ_FAST_PATH` without loading torch.
A setting string is a base (`default`, `off` or `all`) followed by `+piece` / `-piece` edits:
`default,-channels_last,+compile`. Every piece keeps images within one 8-bit level of the plain
path (tests/sdmodel/test_fastpath.py checks each one on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from sdq.core.params import MAX_BATCH


@dataclass(frozen=True)
class FastPath:
    """One boolean per piece; see docs/sdmodel.md ("GPU fast path") for what each buys."""

    device_loop: bool = False
    """No host-device sync in the denoising loop: timestep frequencies made on the device,
    ancestral noise pre-drawn per image (same generators, same order) into pinned memory."""
    channels_last: bool = False
    """UNet and VAE weights and activations in NHWC, the layout cuDNN's half convolutions use."""
    contiguous_attention: bool = False
    """Contiguous q/k/v in the VAE attention so SDPA can pick a fused kernel, not math."""
    sdpa_order: bool = False
    """Try SDPA backends in the order cuDNN, flash, memory-efficient, math (Hopper's best first)."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its convolution algorithms once per shape and keep the fastest."""
    compile: bool = False
    """torch.compile the UNet and the VAE decoder (minutes of warm-up per shape)."""
    cuda_graphs: bool = False
    """Replay the UNet call from a captured CUDA graph (only where compile is off)."""
    pad_sizes: bool = False
    """Pad micro-batches up to a bucket size (`bucket_size`), so shapes stay few; padding rows
    are dropped from the output."""

    @classmethod
    def pieces(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def for_device(cls, device: str) -> "FastPath":
        """The defaults: every safe piece on CUDA. Elsewhere only the device loop, which costs
        nothing: channels_last measured slower on the CPU (docs/benchmarks.md), padding is
        pure waste without compiled shapes, and the other pieces are CUDA switches."""
        if device.split(":")[0] == "cuda":
            return cls(device_loop=True, channels_last=True, contiguous_attention=True,
                       sdpa_order=True, cudnn_benchmark=True, pad_sizes=True)
        return cls(device_loop=True)

    @classmethod
    def parse(cls, spec: str, device: str) -> "FastPath":
        """`default` / `off` / `all`, then comma-separated `+piece` or `-piece` edits.

        Raises ValueError naming the word it cannot read and the valid ones."""
        words = [w.strip() for w in (spec or "default").split(",") if w.strip()] or ["default"]
        bases = {"default": cls.for_device(device), "off": cls(),
                 "all": cls(**{p: True for p in cls.pieces()})}
        first, edits = (words[0], words[1:]) if words[0] in bases else ("default", words)
        fast = bases[first]
        for word in edits:
            name = word[1:]
            if word[:1] not in "+-" or name not in cls.pieces():
                raise ValueError(
                    f"fast path {spec!r}: cannot read {word!r}; start with one of "
                    f"{', '.join(bases)}, then +piece or -piece with a piece from "
                    f"{', '.join(cls.pieces())}")
            fast = replace(fast, **{name: word[0] == "+"})
        return fast

    def spec(self) -> str:
        """The setting string that gives this value back through `parse` on any device."""
        return ",".join(["off", *(f"+{p}" for p in self.pieces() if getattr(self, p))])


def bucket_size(n: int) -> int:
    """The smallest bucket (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...) that holds `n` rows.

    Powers of two and 3/4 of them: padding wastes under a third of a batch, while a compiled
    or graphed UNet meets two shapes per doubling instead of one per tail size."""
    if n < 1:
        raise ValueError(f"a batch holds at least one image, got {n}")
    power = 1 << (n - 1).bit_length()
    three_quarters = power * 3 // 4
    return three_quarters if power >= 4 and three_quarters >= n else power


# Memory one image costs while it is generated in half precision at 512x512, with its CFG
# pair: the VAE decoder's full-resolution 128-channel activations dominate (a few of them
# live at once, 64 MB each), the UNet's two rows add ~0.2 GB. An estimate with headroom; the
# GPU probe reports the measured peak per batch size to check it against.
HALF_BYTES_PER_IMAGE_512 = 700 * 2**20
_FIXED_RESERVE = 2 * 2**30
CPU_BATCH_SIZE = 8
"""Images denoised together on a CPU: a larger batch is no faster there (the cores are busy at
8) and holds gigabytes more activations."""


def auto_batch_size(free_bytes: int, width: int = 512, height: int = 512, dtype: str = "fp16",
                    cap: int = MAX_BATCH) -> int:
    """A batch size that fits in `free_bytes` of device memory (after the weights are loaded).

    Keeps 2 GiB and a fifth of the rest for the allocator's fragmentation and cuDNN workspaces;
    beyond `cap` images a batch no longer raises a GPU's throughput, it only delays results."""
    per_image = HALF_BYTES_PER_IMAGE_512 * (width * height) / (512 * 512) * (2 if dtype == "fp32" else 1)
    usable = max(0, free_bytes - _FIXED_RESERVE) * 0.8
    return max(1, min(cap, int(usable // per_image)))


COMPILED_SIZES = 4
"""Image sizes one worker is planned to meet while compiled (a job has one size; a worker
serves a few jobs' sizes between restarts)."""


def compiled_shapes(max_batch: int = 2 * MAX_BATCH, sizes: int = COMPILED_SIZES) -> int:
    """Graphs a compiled network meets at most: one per bucket up to `max_batch` (a pinned
    `SDQ_BATCH_SIZE` up to twice the automatic cap included), each also at twice its rows
    (the UNet's batch holds the CFG pair when a batch is guided), per image size."""
    buckets = {bucket_size(n) for n in range(1, max_batch + 1)}
    return len(buckets | {2 * b for b in buckets}) * sizes
