"""The one definition of a generation request: checks, limits, sampler spellings, batch shape."""
from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys

from dataclasses import fields

import pytest

from sdq.core.params import (
    DEFAULTS,
    FIELDS,
    MAX_SIDE,
    SAMPLERS,
    SEED_LIMIT,
    SHAPE_FIELDS,
    BatchShape,
    GenerationParams,
    ParamError,
    Request,
    cache_key,
    draw_seed,
    resolve_sampler,
    sampler_from_a1111,
    short_hash,
)


def test_importing_params_does_not_import_torch() -> None:
    code = ("import sys, sdq.core.params, sdq.sdmodel.files; "
            "print(sorted(m for m in ('torch', 'transformers', 'celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_defaults_are_those_of_the_reference_txt2img() -> None:
    p = GenerationParams("a cat")
    assert (p.negative_prompt, p.seed, p.sampler, p.steps, p.cfg, p.eta, p.width, p.height) == (
        "", 0, "ddim", 50, 7.5, 0.0, 512, 512)


@pytest.mark.parametrize(("spelled", "canonical"), [
    ("Euler a", "euler_a"), ("euler_ancestral", "euler_a"), ("EULER_A", "euler_a"),
    ("k_euler_a", "euler_a"), ("Euler", "euler"), ("DDIM", "ddim"), ("PLMS", "plms"),
    ("pndm", "plms"), ("DPM++ 2M", "dpmpp_2m"), ("dpmsolver++", "dpmpp_2m"),
    ("DPM++ 2M Karras", "dpmpp_2m_karras"), (" dpmpp-2m-karras ", "dpmpp_2m_karras"),
])
def test_sampler_spellings_of_other_tools_record_sdqs_name(spelled: str, canonical: str) -> None:
    assert resolve_sampler(spelled) == canonical
    assert GenerationParams("x", sampler=spelled).sampler == canonical


def test_every_canonical_name_resolves_to_itself_and_round_trips_through_a1111() -> None:
    for name, sampler in SAMPLERS.items():
        assert resolve_sampler(name) == name
        assert sampler_from_a1111(sampler.a1111, sampler.a1111_schedule) == name
    assert sampler_from_a1111("DPM++ 2M", "Automatic") == "dpmpp_2m"
    assert sampler_from_a1111("Heun", None) is None


def test_an_unknown_sampler_names_a_close_match() -> None:
    with pytest.raises(ParamError) as info:
        resolve_sampler("eulr_a")
    assert info.value.field == "sampler"
    assert info.value.reason.startswith("unknown sampler 'eulr_a'; did you mean 'euler_a'?")


@pytest.mark.parametrize(("changes", "field", "reason"), [
    ({"cfg": math.nan}, "cfg", "expected a number, got nan"),
    ({"cfg": math.inf}, "cfg", "expected a number, got inf"),
    ({"eta": math.nan}, "eta", "expected a number, got nan"),
    ({"cfg": 101}, "cfg", "must be between 0 and 100, got 101"),
    ({"seed": SEED_LIMIT}, "seed", f"must be between 0 and {SEED_LIMIT - 1}, got {SEED_LIMIT}"),
    ({"seed": True}, "seed", "expected a whole number, got True"),
    ({"steps": 0}, "steps", "must be between 1 and 999, got 0"),
    ({"width": 500}, "width", "must be a multiple of 8, got 500"),
    ({"height": MAX_SIDE + 8}, "height", f"must be between 8 and {MAX_SIDE}, got {MAX_SIDE + 8}"),
    ({"sampler": "euler", "eta": 0.5}, "eta", "applies to ddim only, got eta=0.5 for 'euler'"),
])
def test_bad_values_name_their_field_and_reason(changes: dict, field: str, reason: str) -> None:
    with pytest.raises(ParamError) as info:
        GenerationParams("x", **changes)
    assert (info.value.field, info.value.reason) == (field, reason)
    assert str(info.value) == f"{field}: {reason}"


def test_a_request_and_a_batch_shape_split_the_parameters() -> None:
    p = GenerationParams("a cat", "dog", 7, 5.0, sampler="Euler a", steps=20, width=64, height=96)
    assert p.request == Request("a cat", "dog", 7, 5.0)
    assert p.shape == BatchShape(sampler="euler_a", steps=20, width=64, height=96, eta=0.0)
    assert p.shape.settings() == {"sampler": "euler_a", "steps": 20, "width": 64, "height": 96,
                                  "eta": 0.0}
    # Prompts, seeds and guidance may differ within a batch; sampler, steps, size, eta may not.
    assert GenerationParams("other", seed=1, cfg=1.0, sampler="euler_a", steps=20, width=64,
                            height=96).shape == p.shape
    assert GenerationParams.of({**p.to_dict(), "row_index": 3}) == p


def test_short_hash_is_the_a1111_model_hash_length() -> None:
    assert short_hash("6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa") == "6ce0161689"


def test_each_field_is_defined_once_in_one_half() -> None:
    request, shape = {f.name for f in fields(Request)}, {f.name for f in fields(BatchShape)}
    assert not request & shape
    assert set(FIELDS) == request | shape == {f.name for f in fields(GenerationParams)}
    assert SHAPE_FIELDS == ("sampler", "steps", "width", "height", "eta")
    params = GenerationParams("x")
    assert isinstance(params, Request) and isinstance(params, BatchShape)


def test_records_keep_their_column_order_and_defaults() -> None:
    assert FIELDS == ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta",
                      "width", "height", "prompt_syntax", "clip_skip")
    assert list(GenerationParams("x").to_dict()) == list(FIELDS)
    assert list(DEFAULTS) == list(FIELDS[1:])


def test_positional_arguments_are_the_requests_and_the_shape_is_given_by_keyword() -> None:
    assert GenerationParams("a", "b", 3, 4.0) == GenerationParams(
        prompt="a", negative_prompt="b", seed=3, cfg=4.0)
    with pytest.raises(TypeError):
        GenerationParams("a", "b", 3, 4.0, "euler")  # type: ignore[misc]
    with pytest.raises(TypeError):
        BatchShape("euler")  # type: ignore[misc]


def test_of_several_bad_values_the_first_in_record_order_is_named() -> None:
    with pytest.raises(ParamError) as info:
        GenerationParams("x", width=500, seed=-1, cfg=101)
    assert info.value.field == "seed"


def test_drawn_seeds_stay_below_their_limit() -> None:
    assert all(0 <= draw_seed(3) < 3 for _ in range(50))
    assert len({draw_seed() for _ in range(5)}) > 1


WHERE = {"model_sha256": "ab" * 32, "watermark": None, "device": "cpu", "dtype": "fp32"}


def test_the_cache_key_covers_syntax_clip_skip_and_adapter_files() -> None:
    params = GenerationParams("a (red:1.5) fox", seed=1)
    key = cache_key(params, **WHERE)
    lora = [("detail", 0.8, "1" * 64)]
    others = [cache_key(GenerationParams(**{**params.to_dict(), "prompt_syntax": "plain"}), **WHERE),
              cache_key(GenerationParams(**{**params.to_dict(), "clip_skip": 2}), **WHERE),
              cache_key(params, **WHERE, loras=lora),
              cache_key(params, **WHERE, loras=[("detail", 0.8, "2" * 64)]),  # same name, new file
              cache_key(params, **WHERE, loras=[("detail", 0.9, "1" * 64)]),
              cache_key(params, **WHERE, embeddings=[("easyneg", "3" * 64)])]
    assert len({key, *others}) == 1 + len(others)
    two = [("a", 1.0, "4" * 64), ("b", 0.5, "5" * 64)]
    assert cache_key(params, **WHERE, loras=two) == cache_key(params, **WHERE, loras=two[::-1])
    as_recorded = [{"name": "detail", "weight": 0.8, "sha256": "1" * 64}]
    assert cache_key(params, **WHERE, loras=as_recorded) == others[2]


def test_keys_made_before_syntax_and_clip_skip_existed_still_match() -> None:
    """A plain, clip-skip-1 request without adapters hashes as every key recorded before."""
    params = GenerationParams("a fox", seed=1, prompt_syntax="plain")
    old_record = {**{k: v for k, v in params.to_dict().items()
                     if k not in ("prompt_syntax", "clip_skip")},
                  "model_sha256": "ab" * 32, "watermark": "", "device": "cpu", "dtype": "fp32"}
    old_key = hashlib.sha256(json.dumps(old_record, sort_keys=True).encode()).hexdigest()
    assert cache_key(params, **WHERE) == old_key
    # An autoencoder in the model's dtype, and no check (where on_flag does nothing), as before.
    assert cache_key(params, **WHERE, vae_dtype="fp32", on_flag="black") == old_key


# What each input of a request may be, two or three values each, so that random pairs are often
# equal in some fields and not others.
CHOICES: dict[str, tuple[object, ...]] = {
    "prompt": ("a fox", "a cat"), "negative_prompt": ("", "blur"), "seed": (1, 2),
    "sampler": ("ddim", "euler"), "steps": (20, 30), "cfg": (7.5, 5.0), "eta": (0.0,),
    "width": (512, 256), "height": (512, 256), "prompt_syntax": ("a1111", "plain"),
    "clip_skip": (1, 2), "model_sha256": ("ab" * 32, "cd" * 32), "watermark": (None, "mark"),
    "device": ("cpu", "cuda:0", "cuda:1"), "dtype": ("fp32", "fp16"),
    "vae_dtype": (None, "fp32", "fp16"), "safety_checker_sha256": (None, "5" * 64, "6" * 64),
    "on_flag": ("keep", "black", "drop"),
    "loras": ((), (("detail", 0.8, "1" * 64),), (("detail", 0.8, "1" * 64), ("style", 0.5, "2" * 64))),
    "embeddings": ((), (("easyneg", "3" * 64),)),
}
PARAMS = set(FIELDS)


def what_it_makes(request: dict) -> tuple:
    """The stored image and record a request makes, stated without the key: the device's kind
    (not its index), the autoencoder's dtype (the model's when none is given), `on_flag` only
    under a checker (without one nothing is checked), LoRAs in any order."""
    made = dict(request)
    made["device"] = request["device"].split(":")[0]
    made["vae_dtype"] = request["vae_dtype"] or request["dtype"]
    if request["safety_checker_sha256"] is None:
        made["on_flag"] = None
    made["loras"] = tuple(sorted(request["loras"]))
    return tuple(sorted(made.items()))


def key_of(request: dict) -> str:
    params = GenerationParams(**{k: v for k, v in request.items() if k in PARAMS})
    return cache_key(params, **{k: v for k, v in request.items() if k not in PARAMS})


def test_two_requests_share_a_key_iff_they_make_the_same_image_and_record() -> None:
    """Random pairs (seeded): the second is the first with a few inputs drawn again, so the
    pairs cover every field changed alone, together, or respelt to the same meaning."""
    rng = random.Random(25)
    outcomes = {True: 0, False: 0}
    for _ in range(3000):
        first = {name: rng.choice(values) for name, values in CHOICES.items()}
        second = dict(first)
        for name in rng.sample(sorted(CHOICES), rng.randint(0, 3)):
            second[name] = rng.choice(CHOICES[name])
        if rng.random() < 0.3:
            second["loras"] = tuple(reversed(second["loras"]))
        same = what_it_makes(first) == what_it_makes(second)
        assert (key_of(first) == key_of(second)) == same, (first, second)
        outcomes[same] += 1
    assert min(outcomes.values()) > 500  # both sides of "iff" are exercised
