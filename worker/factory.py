"""The runner as both modes build it, from the settings; light to import (the runner, and with
it torch, is loaded only when one is built)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from sdq.core.settings import Settings
from sdq.images.storage import configured_storage

if TYPE_CHECKING:
    from sdq.worker.runner import Runner


def runner_from_settings(settings: Settings, engine: Engine, model_ref: str,
                         worker_name: str | None = None) -> Runner:
    """A runner configured from settings, as both modes build it."""
    from sdq.worker.claims import LEASE_S
    from sdq.worker.runner import Runner

    return Runner(
        engine=engine, storage=configured_storage(settings),
        model_ref=model_ref, device=settings.device, dtype=settings.dtype,
        vae_dtype=settings.vae_dtype,
        watermark=settings.watermark, hash_cache=settings.home / "hashes.json",
        max_attempts=settings.max_attempts, lease_s=min(LEASE_S, settings.visibility_timeout),
        micro_batch=settings.batch_size, worker_name=worker_name,
        png_level=settings.png_level, store_threads=settings.store_threads,
        fast=settings.fast_path_spec, outage_s=settings.outage_timeout,
        lora_dirs=settings.lora_dir, embeddings_dir=settings.embeddings_dir,
    )
