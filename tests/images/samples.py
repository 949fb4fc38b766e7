"""Sample images and provenance records shared by the storage, provenance and verify tests."""
from __future__ import annotations

from datetime import datetime, timezone

from sdq.core.params import FIELDS, GenerationParams
from sdq.images.provenance import Environment, Provenance
from sdq.sdmodel.tiny import photo  # noqa: F401 - the sample image the tests take from here

MODEL_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
ENVIRONMENT = Environment(sdq="0.1.0", torch="2.13.0", transformers="5.24.0", device="cuda:0",
                          gpu="NVIDIA H200", dtype="float16", attention="sdpa")


def provenance(width: int = 512, height: int = 512, **changes: object) -> Provenance:
    """A sample record; `changes` may name generation parameters and other fields alike."""
    params: dict[str, object] = dict(
        prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry",
        seed=42, sampler="ddim", steps=50, cfg=7.5, width=width, height=height)
    values: dict[str, object] = dict(
        model_sha256=MODEL_SHA256, model_name="v1-5-pruned-emaonly", environment=ENVIRONMENT,
        job_id=3, item_id=17, row=16, batch_id="b-1", batch_position=2,
        created=datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc))
    for name, value in changes.items():
        (params if name in FIELDS else values)[name] = value
    return Provenance(params=GenerationParams(**params), **values)  # type: ignore[arg-type]
