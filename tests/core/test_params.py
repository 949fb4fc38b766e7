"""The one definition of a generation request: checks, limits, sampler spellings, batch shape."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from sdq.core.params import (
    MAX_SIDE,
    SAMPLERS,
    SEED_LIMIT,
    BatchShape,
    GenerationParams,
    ParamError,
    Request,
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
