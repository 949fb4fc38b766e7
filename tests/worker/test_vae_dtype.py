"""The autoencoder's dtype end to end (issue 22): `SDQ_VAE_DTYPE` reaches the pipeline the
worker builds and the cache key, and an image whose decode overflowed and was decoded again
in float32 says so in its provenance."""
from __future__ import annotations

from pathlib import Path

from sdq.core.params import GenerationParams
from sdq.core.settings import Settings
from sdq.db.session import open_database
from sdq.images.provenance import read_png_metadata
from sdq.images.storage import open_storage
from sdq.worker.cache import Identity
from sdq.worker.factory import runner_from_settings
from sdq.worker.runner import Runner
from tests.sdmodel.test_guards import vae_pipeline

from .conftest import job_items, queued_job, specs


def test_the_setting_reaches_the_workers_pipeline_and_the_cache_key(
        embedded_env: dict[str, str], tiny_checkpoint: Path) -> None:
    settings = Settings.load({**embedded_env, "SDQ_VAE_DTYPE": "bf16"})
    runner = runner_from_settings(settings, open_database(settings.database_url), str(tiny_checkpoint))
    pipe = runner.pipeline()
    assert (pipe.dtype, pipe.vae_dtype) == ("fp32", "bf16")
    params = GenerationParams("a fox", seed=1)
    same = Identity(pipe.sha256, pipe.device, pipe.dtype, pipe.dtype)
    assert runner.cache.key(params, Identity.of(pipe)) != runner.cache.key(params, same)


def test_an_image_decoded_again_in_fp32_says_so_in_its_provenance(embedded: Settings) -> None:
    """An autoencoder that overflows in fp16 (the guard tests' stand-in) on a real runner:
    the images whose fp16 decode gave Inf are stored decoded in fp32, and their `sdq` chunk
    records it; the others record nothing of the kind."""
    engine = open_database(embedded.database_url)
    storage = open_storage(embedded.storage_url)
    pipe = vae_pipeline("fp16")
    items = specs(3, sampler="ddim")
    expected = pipe.generate([GenerationParams.of(item).request for item in items],
                             **GenerationParams.of(items[0]).shape.settings()).redecoded
    assert expected, "the stand-in overflows for these latents"
    job_id, batches = queued_job(engine, pipe.sha256, items, 8, prefix="vae")
    report = Runner(engine=engine, storage=storage, model_ref="", pipeline=pipe).run(batches)
    assert report.done == 3
    stored = [read_png_metadata(storage.get(i.image_key)).provenance for i in job_items(engine, job_id)]
    assert [p.redecoded for p in stored] == ["fp32" if n in expected else None for n in range(3)]
    assert {p.environment.vae_dtype for p in stored} == {"fp16"}
