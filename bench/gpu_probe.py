"""One-shot GPU probe: everything a session with a GPU machine should measure, in one call.

Run from a plain checkout (no install; the wheels of bench/device-wheels.txt, for what the
machine lacks, go in `.whl/` or `wheels/`, see docs/benchmarks.md). It imports nothing from
tests/: the machine has neither pytest's plugins of ours nor redis (tests/bench/
test_device_venv.py runs it on exactly the machine's packages). Random full-size SD v1.5 weights
are made on the device, no file. After every measurement the JSON at --out is rewritten, and a
watchdog stops the run at --budget seconds, so a cut-off run still reports what it measured.
One file over the usual 400 lines: it is the one script a GPU session runs. Phases, most
important first:

  sdpa          one UNet call and one decode under each SDPA backend order (a failing order
                is a row, not a lost run), and whether the pipeline's guard dropped its order
  environment   versions, the device, which optional packages are there
  ceilings      a bf16 GEMM in TFLOP/s and a device-to-device copy in GB/s
  sdq           images/s at each batch size, fp16 then bf16, default fast path; peak memory
  diffusers     StableDiffusionPipeline on the same weights and settings (if its wheel is there)
  system        the embedded runner (SQLite + local storage + watermark) vs generation alone
  safety        the safety checker (ViT-L/14 tower) per 512x512 image: preprocessing, model
  store         the store path alone (encode, watermark, write, record) at 1/2/4/8 threads
  fast_path     each fast-path piece switched against the default, at one batch size
  compile       torch.compile per padding bucket: compile seconds, graphs, images/s; last

    python3 bench/gpu_probe.py --budget 480 --out $OUT/gpu_probe.json   (H200: the budget's 8 min)
    python3 bench/gpu_probe.py --tiny --device cpu --out /tmp/p.json    (CPU, tiny model: a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._checkout import use_checkout  # noqa: E402

PHASES = ("sdpa", "environment", "ceilings", "sdq", "diffusers", "system", "safety", "store", "fast_path",
          "compile")
PROMPTS = ["a photograph of an astronaut riding a horse", "a lighthouse on a cliff at dusk, oil painting",
           "a bowl of ripe fruit on a wooden table", "portrait of an old fisherman, dramatic light"]
GUIDANCE = 7.5
AB_PIECES = ("device_loop", "channels_last", "contiguous_attention", "sdpa_order", "cudnn_benchmark",
             "pad_sizes")


class Report:
    """The JSON document, rewritten whole (through a temporary file) after every change."""

    def __init__(self, path: Path, args: dict[str, Any]) -> None:
        self.path, self.started = path, time.monotonic()
        self.data: dict[str, Any] = {"probe": {"args": args, "finished": False, "cut_off": None},
                                     "phases": {}}
        self.lock = threading.RLock()
        self.current: str | None = None

    def phase(self, name: str) -> dict[str, Any]:
        self.current = name
        entry = self.data["phases"].setdefault(name, {"status": "running"})
        self.write()
        return entry

    def write(self) -> None:
        with self.lock:
            self.data["probe"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
            tmp = self.path.with_suffix(".partial")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)

    def cut_off(self) -> None:
        """The watchdog's end: say where the run stopped, keep what it has, exit at once."""
        with self.lock:
            self.data["probe"]["cut_off"] = self.current
            if self.current:
                self.data["phases"][self.current]["status"] = "cut off"
            self.write()
        print(f"gpu_probe: budget spent during {self.current}; wrote {self.path}", flush=True)
        os._exit(3)


# -- models ---------------------------------------------------------------------------------

def random_pipeline(tiny: bool, device: str, dtype: str, compile_backend: str = "inductor"):
    """sdq's pipeline with random N(0, 0.02) weights made on the device (norms at 1, biases 0)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdq.sdmodel import clip
    from sdq.sdmodel.configs import UNetConfig, VAEConfig
    from sdq.sdmodel.pipeline import DTYPES, Pipeline
    from sdq.sdmodel.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, VIT_L14_TEXT
    from sdq.sdmodel.unet import UNetModel
    from sdq.sdmodel.vae import AutoencoderKL

    unet_cfg, vae_cfg, text_cfg = ((TINY_UNET, TINY_VAE, {**TINY_TEXT, "hidden_act": "quick_gelu"}) if tiny
                                   else (UNetConfig(), VAEConfig(), VIT_L14_TEXT))
    with torch.device("meta"):
        networks = [UNetModel(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(CLIPTextConfig(**text_cfg))]
    generator = torch.Generator(device).manual_seed(0)
    for module in networks:
        module.to_empty(device=device).to(DTYPES[dtype]).eval().requires_grad_(False)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02, generator=generator)
    text = networks[2]
    embeddings = getattr(text, "text_model", text).embeddings
    embeddings.position_ids = torch.arange(text.config.max_position_embeddings, device=device)[None]
    return Pipeline(networks[0], networks[1], text, clip.load_tokenizer(), sha256="0" * 64,
                    name="random-sd-v1.5" + ("-tiny" if tiny else ""), device=device, dtype=dtype,
                    compile_backend=compile_backend)


def requests_for(batch: int):
    from sdq.sdmodel.pipeline import Request

    return [Request(PROMPTS[i % len(PROMPTS)], "", seed=1000 + i, cfg=GUIDANCE) for i in range(batch)]


# -- timing ---------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def measure_generate(generate: Callable[[list, int], Any], batch: int, args: argparse.Namespace) -> dict:
    """Warm up at the same shapes (a few steps: cuDNN, compile and graphs key on shapes, not
    steps), then time one full run; images/s counts text encoding, denoising and decoding."""
    requests = requests_for(batch)
    generate(requests, min(3, args.steps))
    reset_peak(args.device)
    seconds, _ = timed(args.device, lambda: generate(requests, args.steps))
    return {"batch": batch, "seconds": round(seconds, 3), "images_per_s": round(batch / seconds, 3),
            "peak_gib": peak_gib(args.device)}


def sdq_generate(pipe, args: argparse.Namespace) -> Callable[[list, int], Any]:
    return lambda requests, steps: pipe.generate(requests, sampler="ddim", steps=steps,
                                                 width=args.width, height=args.height)


def guarded(rows: list, report: Report, label: dict, fn: Callable[[], dict]) -> None:
    """One measurement row; a failure (out of memory, a missing kernel) is recorded, not fatal."""
    import torch

    try:
        rows.append({**label, **fn()})
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure and goes on
        rows.append({**label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report.write()


# -- phases ---------------------------------------------------------------------------------

SDPA_ORDERS = ("fast path", "pytorch", "cudnn", "flash", "efficient", "math")
"""The fast path's priority list (cuDNN, flash, memory-efficient, math), PyTorch's own order,
then each backend alone."""


def sdpa_context(order: str):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdq.sdmodel.guards import sdpa_priority

    alone = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if order == "fast path":
        return sdpa_priority()
    return nullcontext() if order == "pytorch" else sdpa_kernel([alone[order]])


def one_call(device: str, order: str, call: Callable[[], Any]) -> str:
    """`ok` and the milliseconds of a second call, or the error of the first."""
    try:
        with sdpa_context(order):
            call()
            seconds, _ = timed(device, call)
    except Exception as exc:  # noqa: BLE001 - a failing backend is this row's finding
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return f"ok {seconds * 1e3:.1f} ms"


def phase_sdpa(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    """One UNet call (a CFG pair at the run's size) and one decode under each SDPA order, the
    row written before the calls, so a backend that raises, or kills the process, is a row.
    Then the pipeline's own guard: one generate with the default fast path, and whether its
    order was dropped (`guards.SdpaOrder`)."""
    import torch

    from sdq.sdmodel.pipeline import DTYPES

    pipe = pipes[args.dtypes[0]]()
    layout = torch.channels_last if pipe.fast.channels_last else torch.contiguous_format
    latent = (args.height // 8, args.width // 8)
    x = torch.randn(2, 4, *latent, device=args.device, dtype=DTYPES[pipe.dtype]).to(memory_format=layout)
    context = torch.randn(2, 77, pipe.unet.config.context_dim, device=args.device, dtype=DTYPES[pipe.dtype])
    t = torch.tensor(500.0)
    z = torch.randn(1, 4, *latent, device=args.device, dtype=DTYPES[pipe.vae_dtype]).to(memory_format=layout)
    rows = entry.setdefault("rows", [])
    with torch.inference_mode():
        for order in SDPA_ORDERS:
            row = {"order": order, "unet": "running"}
            rows.append(row)
            report.write()
            row["unet"] = one_call(args.device, order, lambda: pipe.unet(x, t, context))
            row["decode"] = one_call(args.device, order, lambda: pipe.vae.decode(z))
            report.write()
    pipe.generate(requests_for(1), sampler="ddim", steps=1, width=args.width, height=args.height)
    entry["guard"] = {"fast_path_order": pipe.fast.sdpa_order, "dropped": pipe.sdpa.dropped}


def phase_environment(entry: dict, args: argparse.Namespace, wheels: list[str]) -> None:
    import torch
    import transformers

    entry.update(python=platform.python_version(), torch=torch.__version__,
                 transformers=transformers.__version__, cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                 device=args.device, cpu_threads=torch.get_num_threads(), wheels=wheels)
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        entry.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count)
    for name in ("diffusers", "SQLAlchemy", "alembic", "PyWavelets"):
        try:
            entry[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            entry[name.lower()] = "missing"


def phase_ceilings(entry: dict, args: argparse.Namespace) -> None:
    import torch

    n = 512 if args.tiny else 8192
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds, _ = timed(args.device, lambda: [a @ b for _ in range(10)])
    entry["gemm_tflops"] = round(10 * 2 * n**3 / seconds / 1e12, 1)
    entry["gemm"] = f"{n}x{n}x{n} {dtype}"
    src = torch.empty(2**28 if not args.tiny else 2**22, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = timed(args.device, lambda: [dst.copy_(src) for _ in range(10)])
    entry["copy_gbs_read_plus_write"] = round(10 * 2 * src.numel() / seconds / 1e9, 1)


def phase_sdq(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    rows = entry.setdefault("rows", [])
    for dtype in args.dtypes:
        pipe = pipes[dtype]()
        for batch in args.batch_sizes:
            guarded(rows, report, {"dtype": dtype, "fast": pipe.fast.spec()},
                    lambda: measure_generate(sdq_generate(pipe, args), batch, args))


def to_diffusers_pipeline(pipe, tiny: bool):
    """diffusers' StableDiffusionPipeline holding the same weights, converted by diffusers' own
    single-file converter from the LDM layout sdq's networks mirror."""
    import diffusers
    import torch

    from sdq.sdmodel.configs import UNetConfig, VAEConfig
    from sdq.sdmodel.diffusers_reference import reference_scheduler, to_diffusers
    from sdq.sdmodel.tiny import TINY_UNET, TINY_VAE, ldm_checkpoint

    checkpoint = ldm_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder)
    configs = (TINY_UNET, TINY_VAE) if tiny else (UNetConfig(), VAEConfig())
    unet, vae, text = to_diffusers(checkpoint, *configs, pipe.text_encoder.config)
    del checkpoint
    ref = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=pipe.tokenizer, unet=unet,
        scheduler=reference_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).to(pipe.device, pipe.unet.out[2].weight.dtype)
    ref.set_progress_bar_config(disable=True)
    return ref, torch


def phase_diffusers(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        entry.update(status="skipped", reason=f"diffusers missing ({exc.name}): carry bench/device-wheels.txt")
        return
    dtype = args.dtypes[0]
    ref, torch = to_diffusers_pipeline(pipes[dtype](), args.tiny)
    rows = entry.setdefault("rows", [])

    def generate(requests, steps):
        return ref(prompt=[r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
                   generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
                   num_inference_steps=steps, guidance_scale=GUIDANCE, width=args.width,
                   height=args.height).images

    for batch in args.batch_sizes:
        guarded(rows, report, {"dtype": dtype}, lambda: measure_generate(generate, batch, args))


def _missing_for_runner() -> str | None:
    missing = []
    for name in ("sqlalchemy", "alembic", "pywt"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return ", ".join(missing) or None


def _runner_parts(folder: Path, threads: int | None):
    """A fresh SQLite database and image folder, and the runner's keyword arguments from
    Settings, through the environment as a worker reads them (store settings included when
    this checkout has them: SDQ_STORE_THREADS, SDQ_PNG_LEVEL)."""
    from sdq.core.settings import Settings
    from sdq.db.session import open_database
    from sdq.images.storage import open_storage

    env = {"SDQ_HOME": str(folder), "SDQ_CONFIG": str(folder / "none.toml")}
    if threads is not None:
        env["SDQ_STORE_THREADS"] = str(threads)
    settings = Settings.load(env)
    extra = {k: getattr(settings, k) for k in ("store_threads", "png_level") if hasattr(settings, k)}
    engine = open_database(settings.database_url)
    return engine, dict(storage=open_storage(settings.storage_url), watermark=settings.watermark, **extra)


def _queue_items(engine, pipe, count: int, args: argparse.Namespace, batch: int):
    """`count` items of one job, in batches of `batch`, recorded as `sdq submit` would."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from sdq.db.models import Item, Job, Model
    from sdq.db.queries import submit_job
    from sdq.core.batch import Batch

    specs = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "sampler": "ddim",
              "steps": args.steps, "cfg": GUIDANCE, "width": args.width, "height": args.height}
             for i in range(count)]
    with Session(engine, expire_on_commit=False) as session:
        model = session.query(Model).filter_by(sha256=pipe.sha256).one_or_none()
        if model is None:
            session.add(model := Model(sha256=pipe.sha256, name=pipe.name, architecture="sd-v1"))
            session.flush()
        job = submit_job(session, Job(), [{**s, "model_id": model.id} for s in specs])
        session.commit()
        ids = list(session.scalars(select(Item.id).where(Item.job_id == job.id).order_by(Item.row_index)))
    return [Batch(f"probe-{job.id}-{n}", tuple(ids[n:n + batch])) for n in range(0, len(ids), batch)]


def run_system(pipe, args: argparse.Namespace, batch: int, batches: int, threads: int | None = None) -> dict:
    from sdq.worker.runner import Runner

    with tempfile.TemporaryDirectory(prefix="sdq-probe-") as folder:
        engine, kwargs = _runner_parts(Path(folder), threads)
        work = _queue_items(engine, pipe, batch * batches, args, batch)
        runner = Runner(engine=engine, model_ref="", pipeline=pipe, **kwargs)
        seconds, report = timed(args.device, lambda: runner.run(work))
        engine.dispose()
    return {"batch": batch, "images": report.done, "failed": report.failed, "seconds": round(seconds, 3),
            "images_per_s": round(report.done / seconds, 3), "runner_settings": sorted(kwargs)}


def phase_system(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    if missing := _missing_for_runner():
        entry.update(status="skipped", reason=f"missing: {missing}; carry bench/device-wheels.txt")
        return
    pipe, batch = pipes[args.dtypes[0]](), args.system_batch
    rows = entry.setdefault("rows", [])
    guarded(rows, report, {"what": "generation alone"},
            lambda: measure_generate(sdq_generate(pipe, args), batch, args))
    guarded(rows, report, {"what": "whole system (embedded runner)"},
            lambda: run_system(pipe, args, batch, args.system_batches))


class PremadeImages:
    """A pipeline that hands out images made once, so the runner times its store path alone."""

    def __init__(self, pipe, images) -> None:
        self.sha256, self.name, self.device, self.dtype = pipe.sha256, pipe.name, pipe.device, pipe.dtype
        self.vae_dtype = pipe.vae_dtype
        self.default_batch_size = pipe.default_batch_size
        self.images = images

    def generate(self, requests, **settings):
        return [self.images[i % len(self.images)] for i in range(len(requests))]


def phase_store(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    if missing := _missing_for_runner():
        entry.update(status="skipped", reason=f"missing: {missing}; carry bench/device-wheels.txt")
        return
    pipe = pipes[args.dtypes[0]]()
    images = pipe.generate(requests_for(4), sampler="ddim", steps=args.steps, width=args.width,
                           height=args.height)
    premade = PremadeImages(pipe, images)
    rows = entry.setdefault("rows", [])
    entry["note"] = "random-weight images; thread settings reach the runner only once it has SDQ_STORE_THREADS"
    for threads in args.store_threads:
        guarded(rows, report, {"threads": threads},
                lambda: run_system(premade, args, args.system_batch, args.store_batches, threads))


def phase_safety(entry: dict, args: argparse.Namespace, report: Report) -> None:
    """The checker as the runner uses it, loaded from a diffusers folder of random weights onto
    the device in each dtype: milliseconds per image (512x512; --tiny: 64x64) for preprocessing
    (PIL, on the CPU) and for the model, at several batch sizes, best of 3."""
    import torch

    from sdq.sdmodel.pipeline import DTYPES
    from sdq.sdmodel.safety import load_safety_checker, preprocess
    from sdq.sdmodel.tiny import TINY_CHECKERS, VIT_L14, VIT_L14_PROJECTION, photo, save_safety_checker

    vision, projection = TINY_CHECKERS["vit-l14-scaled"] if args.tiny else (VIT_L14, VIT_L14_PROJECTION)
    rows = entry.setdefault("rows", [])
    entry["architecture"] = "tiny" if args.tiny else "ViT-L/14 (CompVis/stable-diffusion-safety-checker)"
    with tempfile.TemporaryDirectory() as tmp:
        save_safety_checker(Path(tmp) / "safety_checker", vision, projection, dtype=torch.float16, meta=True)
        for dtype in args.dtypes:
            checker = load_safety_checker(tmp, device=args.device, dtype=DTYPES[dtype])
            for batch in args.safety_batches:
                def run(batch: int = batch, checker: Any = checker) -> dict:
                    images = [photo(args.width, args.height, seed=i) for i in range(batch)]
                    pixels = preprocess(images, vision["image_size"])
                    checker.score(pixels)
                    prep = min(timed("cpu", lambda: preprocess(images, vision["image_size"]))[0]
                               for _ in range(3))
                    model = min(timed(args.device, lambda: checker.score(pixels))[0] for _ in range(3))
                    return {"preprocess_ms_per_image": round(prep * 1e3 / batch, 2),
                            "model_ms_per_image": round(model * 1e3 / batch, 2),
                            "images_per_s": round(batch / (prep + model), 2)}

                guarded(rows, report, {"dtype": dtype, "batch": batch}, run)
            del checker


def phase_fast_path(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    """Each piece flipped from the default, at one batch size; cuda_graphs switched on."""
    from sdq.sdmodel.fastpath import FastPath

    pipe = pipes[args.dtypes[0]]()
    default = FastPath.for_device(args.device)
    batch = args.ab_batch
    entry.update(batch=batch, dtype=args.dtypes[0], default=default.spec())
    rows = entry.setdefault("rows", [])
    variants = [("default", default), ("off", FastPath())]
    variants += [(f"{'-' if getattr(default, p) else '+'}{p}", replace(default, **{p: not getattr(default, p)}))
                 for p in AB_PIECES]
    if args.device.startswith("cuda"):
        variants += [("+cuda_graphs", replace(default, cuda_graphs=True)),
                     ("default batch 1", default),
                     ("+cuda_graphs batch 1", replace(default, cuda_graphs=True))]
    for label, fast in variants:
        size = 1 if label.endswith("batch 1") else batch

        def run(fast=fast, size=size) -> dict:
            pipe.set_fast_path(fast)
            return measure_generate(sdq_generate(pipe, args), size, args)

        guarded(rows, report, {"variant": label, "fast": fast.spec()}, run)
    pipe.set_fast_path(default)


def compile_buckets(args: argparse.Namespace) -> list[int]:
    """The padding buckets up to the largest batch, in the order worth measuring when time
    runs out: the largest (what a busy worker runs), the fast_path A/B's, batch 1, the rest."""
    from sdq.sdmodel.fastpath import bucket_size

    every = sorted({bucket_size(n) for n in range(1, max(args.batch_sizes) + 1)}, reverse=True)
    first = [every[0], bucket_size(args.ab_batch), 1]
    return list(dict.fromkeys(first + every))


def dynamo_counts() -> tuple[int, int]:
    """Graphs Dynamo has compiled and graph breaks it has met, so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def phase_compile(entry: dict, pipes: dict, args: argparse.Namespace, report: Report) -> None:
    """torch.compile with the default fast path, one padding bucket at a time: `compile_s` is
    the first (1-step) generate at the bucket, which compiles the UNet for its CFG pair and the
    decoder for it; `graphs` the graphs that made (2 is right, more means graph breaks or
    failing guards; 0 that the shape compiled before); then images/s once compiled."""
    if args.tiny and not args.compile_tiny:
        entry.update(status="skipped", reason="tiny run: compiling takes minutes on a CPU (--compile-tiny)")
        return
    from sdq.sdmodel.fastpath import FastPath

    pipe = pipes[args.dtypes[0]]()
    compiled = replace(FastPath.for_device(args.device), compile=True)
    entry.update(fast=compiled.spec(), backend=args.compile_backend)
    pipe.set_fast_path(compiled)
    rows = entry.setdefault("rows", [])
    for bucket in compile_buckets(args):
        def run(bucket=bucket) -> dict:
            graphs, breaks = dynamo_counts()
            seconds, _ = timed(args.device, lambda: pipe.generate(
                requests_for(bucket), sampler="ddim", steps=1, width=args.width, height=args.height))
            after = dynamo_counts()
            return {"compile_s": round(seconds, 1), "graphs": after[0] - graphs, "graph_breaks": after[1] - breaks,
                    **measure_generate(sdq_generate(pipe, args), bucket, args)}

        guarded(rows, report, {"bucket": bucket}, run)
    pipe.set_fast_path(FastPath.for_device(args.device))


# -- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model, small sizes (CI)")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", ".")) / "gpu_probe.json")
    parser.add_argument("--budget", type=float, default=540.0, help="hard cap in seconds (default 9 min)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--compile-tiny", action="store_true", help="run the compile phase in --tiny too")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (`eager`: Dynamo alone, the CPU test's)")
    parser.add_argument("--size", type=int, help="image side (default 512; --tiny 64)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; --tiny 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="default 1 8 16 32; --tiny 1 2; compile: every bucket up to the largest")
    parser.add_argument("--ab-batch", type=int, help="batch of the fast_path A/B (default 16; --tiny 2)")
    args = parser.parse_args(argv)
    small = args.tiny
    args.width = args.height = args.size or (64 if small else 512)
    args.steps = args.steps or (3 if small else 50)
    args.dtypes = ["fp32"] if args.device == "cpu" else ["fp16", "bf16"]
    args.batch_sizes = args.batch_sizes or ([1, 2] if small else [1, 8, 16, 32])
    args.ab_batch = args.ab_batch or (2 if small else 16)
    args.system_batch, args.system_batches = (2, 2) if small else (32, 3)
    args.store_threads, args.store_batches = ([1, 2], 2) if small else ([1, 2, 4, 8], 2)
    args.safety_batches = [1, 2] if small else [1, 8, 32]
    return args


def main(argv: list[str] | None = None) -> int:
    wheels = use_checkout()
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, {k: str(v) for k, v in vars(args).items()})
    watchdog = threading.Timer(args.budget, report.cut_off)
    watchdog.daemon = True
    watchdog.start()
    print(f"gpu_probe: writing {args.out} after every measurement (budget {args.budget:.0f} s)", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache: dict[str, Any] = {}

    def pipe_for(dtype: str) -> Callable[[], Any]:
        def get():
            if dtype not in cache:
                cache.clear()  # one model on the device at a time
                cache[dtype] = random_pipeline(args.tiny, args.device, dtype, args.compile_backend)
            return cache[dtype]
        return get

    pipes = {dtype: pipe_for(dtype) for dtype in args.dtypes}
    steps: dict[str, Callable[[dict], None]] = {
        "sdpa": lambda e: phase_sdpa(e, pipes, args, report),
        "environment": lambda e: phase_environment(e, args, wheels),
        "ceilings": lambda e: phase_ceilings(e, args),
        "sdq": lambda e: phase_sdq(e, pipes, args, report),
        "diffusers": lambda e: phase_diffusers(e, pipes, args, report),
        "system": lambda e: phase_system(e, pipes, args, report),
        "safety": lambda e: phase_safety(e, args, report),
        "store": lambda e: phase_store(e, pipes, args, report),
        "fast_path": lambda e: phase_fast_path(e, pipes, args, report),
        "compile": lambda e: phase_compile(e, pipes, args, report),
    }
    for name in PHASES:
        if name not in args.phases:
            continue
        entry = report.phase(name)
        start = time.monotonic()
        try:
            steps[name](entry)
            if entry["status"] == "running":
                entry["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - a broken phase must not hide the others
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-2000:])
        entry["seconds"] = round(time.monotonic() - start, 1)
        report.write()
        print(f"gpu_probe: {name} {entry['status']} in {entry['seconds']} s", flush=True)
    report.data["probe"]["finished"] = True
    report.write()
    watchdog.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
