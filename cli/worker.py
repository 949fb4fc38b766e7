"""`sdq worker` (serve one model's queue, one process per GPU) and `sdq workers` (who is live)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

import click

from sdq.cli.common import configured_storage, database_session, load_settings, output_options
from sdq.cli.errors import BAD_INPUT, CommandFailed
from sdq.core.errors import Unavailable
from sdq.core.settings import VAE_DTYPES


def _queue_option(args: tuple[str, ...]) -> str | None:
    """The queue(s) a user passed through to Celery (-Q X, --queues X, --queues=X)."""
    for n, arg in enumerate(args):
        if arg in ("-Q", "--queues") and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith("--queues="):
            return arg.split("=", 1)[1]
        if arg.startswith("-Q") and len(arg) > 2:
            return arg[2:]
    return None


def plan_gpus(gpus: str | None, env: Mapping[str, str]) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker process: one per GPU listed, or with `all` one
    per visible GPU (those CUDA_VISIBLE_DEVICES names, else those `nvidia-smi -L` lists, found
    on env's PATH); None alone: one process on the default device (no GPU seen, or no --gpus).
    Counted without torch: the parent process never generates."""
    if not gpus:
        return [None]
    if gpus.strip() != "all":
        return [g.strip() for g in gpus.split(",") if g.strip()] or [None]
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()] or [None]
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return [None]
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    seen = [line for line in listed if line.startswith("GPU ")]  # not its MIG lines
    return [str(n) for n in range(len(seen))] or [None]


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", "-m", "model_ref", metavar="REF",
              help="Checkpoint, diffusers folder or Hugging Face repo id [default: $SDQ_MODEL].")
@click.option("--gpus", metavar="0,1,...|all",
              help="Start one worker process per listed GPU (CUDA_VISIBLE_DEVICES), or per visible "
                   "GPU with `all` [default: one process on the default device].")
@click.option("--batch-size", type=click.IntRange(1),
              help="Most images denoised at once; larger batches are split [default: $SDQ_BATCH_SIZE, "
                   "else what the device holds].")
@click.option("--vae-dtype", type=click.Choice(VAE_DTYPES),
              help="The autoencoder's dtype [default: $SDQ_VAE_DTYPE, else the model's].")
@click.option("--name", default="sdq", show_default=True,
              help="Node name prefix; each process is NAME[-gpuN]@HOST.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(model_ref: str | None, gpus: str | None, batch_size: int | None, vae_dtype: str | None,
           name: str, celery_args: tuple[str, ...]) -> None:
    """Serve the queue of one model: generate its batches until stopped.

    The model is hashed at start and only its queue (`sdq.<short hash>`) is consumed. The
    database schema, the storage and the broker are checked first. SIGTERM finishes the
    running batch, then stops; a batch cut short by a crash comes back to another worker.
    Arguments after `--` go to `celery worker` unchanged.

    \b
    Example (every GPU of the machine, Celery's log level passed through):
      sdq worker --model /models/v1-5-pruned-emaonly.safetensors --gpus all -- --loglevel INFO
    """
    from kombu.exceptions import OperationalError

    from sdq.jobs.broker import create_app, queue_name
    from sdq.jobs.submit import identify_model
    from sdq.worker.broker_keys import upgrade_broker_keys

    settings = load_settings(need_broker=True)
    # The database must be reachable and at the right schema (or one readable line); it also
    # knows the names of registered models.
    with database_session(settings) as session:
        configured_storage(settings).check()
        try:
            model = identify_model(model_ref or settings.model, settings.home / "hashes.json",
                                   session)
        except (ValueError, LookupError, OSError) as exc:
            raise CommandFailed.of(exc, code=BAD_INPUT) from None
    with create_app(settings).connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1)
        except OperationalError as exc:
            raise Unavailable(
                f"cannot reach the broker at {connection.hostname}:{connection.port}: {exc}") from None
    moved = upgrade_broker_keys(settings.broker_url or "")
    if moved:
        click.echo(f"Moved {moved} waiting message(s) out of an older sdq's queue names", err=True)
    queue = queue_name(model.sha256)
    asked = _queue_option(celery_args)
    if asked is not None and asked != queue:
        raise click.ClickException(
            f"refusing queue {asked!r}: {model.name} hashes to {model.short_hash}, so this "
            f"worker serves {queue!r} only")
    devices = plan_gpus(gpus, os.environ)
    base_env = {**os.environ, "SDQ_MODEL": model.ref}
    if batch_size:
        base_env["SDQ_BATCH_SIZE"] = str(batch_size)
    if vae_dtype:
        base_env["SDQ_VAE_DTYPE"] = vae_dtype
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    for gpu in devices:
        env = dict(base_env)
        node = f"{name}@%h" if gpu is None else f"{name}-gpu{gpu}@%h"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        command = [sys.executable, "-m", "celery", "-A", "sdq.worker.app", "worker",
                   "--concurrency", "1", "--prefetch-multiplier", "1", "-n", node,
                   "--without-gossip", "--without-mingle", *([] if asked else ["-Q", queue]),
                   *celery_args]
        children.append(subprocess.Popen(command, env=env))
    click.echo(f"Serving {queue} ({model.name}) with {len(children)} process(es)", err=True)
    codes = [child.wait() for child in children]
    sys.exit(max(codes, key=abs))


@click.command()
@output_options("json")
def workers(output: str | None) -> None:
    """List live worker processes: host, GPU, model, current batch, last heartbeat, images done.

    \b
    Example:
      sdq workers --json
    """
    from sdq.worker.heartbeat import live_workers

    settings = load_settings(need_broker=True)
    try:
        records = live_workers(settings.broker_url or "")
    except Exception as exc:  # noqa: BLE001 - redis-py's errors share no useful base
        raise Unavailable(f"cannot reach the broker: {exc}") from None
    if output == "json":
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("No live workers.")
        return
    click.echo(f"{'NAME':<28} {'HOST':<20} {'GPU':<8} {'MODEL':<28} {'BATCH':<20} {'BEAT':>6} {'DONE':>7}")
    now = time.time()
    for r in records:
        click.echo(f"{r['name']:<28} {r['host']:<20} {r['gpu']:<8} {r['model']:<28} "
                   f"{r['batch'] or '-':<20} {now - r['heartbeat']:>5.0f}s {r['images_done']:>7}")
