"""A job's options: checked when built, stored by schedules as JSON and loaded back, the
options of schedules stored before the JobSpec included."""
from __future__ import annotations

import json

import pytest

from sdq.core.errors import InvalidInput
from sdq.core.jobspec import DEFAULT_BATCH_SIZE, JobSpec, default_batch_size
from sdq.core.params import ParamError

# What `sdq schedule add` stored in a schedule's options before the safety checker, the seed
# policies and templates existed (only what was given, in the order it wrote them).
FIRST_SCHEDULES = {"n": 2, "seed": 7, "sampler": "euler_a", "steps": 20, "model": "/m/v1.ckpt",
                   "batch_size": 4, "priority": 3, "tags": ["nightly"]}
# ... and after them, as it stores them now.
LATER_SCHEDULES = {"negative_prompt": "blurry", "cfg": 6.0, "width": 768, "height": 512,
                   "safety_checker": "off", "on_flag": "black", "seed_policy": "add",
                   "expansion": {"mode": "random", "draws": 2, "seed": 11, "grid": {},
                                 "wildcards": {}}}
# ... and with the prompt syntax, clip skip, LoRAs and embeddings.
ADAPTER_SCHEDULES = {"prompt_syntax": "plain", "clip_skip": 2, "loras": ["detail:0.8", "style:1"],
                     "lora_dirs": ["/loras", "/more"], "embeddings_dir": "/emb"}


@pytest.mark.parametrize("stored", [FIRST_SCHEDULES, LATER_SCHEDULES, ADAPTER_SCHEDULES, {}])
def test_stored_schedule_options_load_and_round_trip(stored: dict) -> None:
    spec = JobSpec.from_json(json.loads(json.dumps(stored)))
    assert spec.to_json() == stored
    assert JobSpec.from_json(spec.to_json()) == spec


def test_a_loaded_spec_is_typed_and_fills_rows_with_its_defaults() -> None:
    spec = JobSpec.from_json(FIRST_SCHEDULES)
    assert (spec.model, spec.batch_size, spec.priority, spec.tags, spec.seed) == (
        "/m/v1.ckpt", 4, 3, ("nightly",), 7)
    assert (spec.on_flag, spec.safety_checker, spec.seed_policy, spec.reuse) == (
        None, None, None, True)
    rows = spec.row_defaults()
    assert (rows.n, rows.seed, rows.params["sampler"], rows.params["steps"],
            rows.params["cfg"]) == (2, 7, "euler_a", 20, 7.5)


def test_what_was_not_given_is_not_stored() -> None:
    assert JobSpec(defaults={"seed": None, "steps": None}).to_json() == {}
    assert JobSpec(name="x", reuse=False, tags=("a",)).to_json() == {
        "tags": ["a"], "name": "x", "reuse": False}


def test_values_are_recorded_as_sdq_spells_them() -> None:
    assert JobSpec(defaults={"sampler": "Euler a", "cfg": "7"}).defaults == {
        "sampler": "euler_a", "cfg": 7.0}
    spec = JobSpec(loras=("detail", "style:0.50"), defaults={"prompt_syntax": "A1111"})
    assert (spec.loras, spec.defaults) == (("detail:1", "style:0.5"), {"prompt_syntax": "a1111"})


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"priority": 10}, InvalidInput, "priority must be 0-9, got 10"),
    ({"on_flag": "blur"}, InvalidInput,
     "unknown on-flag action 'blur'; choose from keep, black, drop"),
    ({"seed_policy": "daily"}, InvalidInput,
     "unknown seed policy 'daily'; choose from same, fresh, add"),
    ({"defaults": {"sampler": "euler", "eta": 0.5}}, ParamError, "eta: applies to ddim only"),
    ({"defaults": {"n": 0}}, ParamError, "n: must be between 1 and"),
    ({"defaults": {"prompt": "x"}}, InvalidInput, "unknown default(s): prompt"),
    ({"batch_size": 0}, ParamError, "batch_size: must be between 1 and"),
    ({"tags": ("a\x00b",)}, ParamError, "tag: contains a NUL character"),
    ({"loras": ("detail:strong",)}, ParamError, "lora: weight 'strong' in 'detail:strong' is not a number"),
    ({"loras": (":0.5",)}, ParamError, "lora: expected NAME[:WEIGHT], got ':0.5'"),
    ({"defaults": {"clip_skip": 13}}, ParamError, "clip_skip: must be between 1 and 12"),
])
def test_bad_options_are_refused_with_the_reason(fields: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        JobSpec(**fields)
    assert str(info.value).startswith(message)


def test_an_unknown_stored_option_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown job option"):
        JobSpec.from_json({"stepz": 20})


def test_the_batch_size_is_the_first_given() -> None:
    assert default_batch_size(None, 0, 8, 4) == 8
    assert default_batch_size(None, None) == DEFAULT_BATCH_SIZE
