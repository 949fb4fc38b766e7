"""PNG provenance: the A1111 `parameters` chunk, the sdq JSON chunk, the environment."""
from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager

from sdq.core.init_image import InitImage
from sdq.images import watermark as wm
from sdq.images.provenance import (
    MetadataError,
    Provenance,
    WatermarkStatus,
    encode_png,
    environment_fingerprint,
    format_parameters,
    parse_parameters,
    pixel_digest,
    read_png_metadata,
)

from .samples import MODEL_SHA256, photo, provenance


def test_parameters_text_in_the_a1111_layout() -> None:
    assert format_parameters(provenance()) == (
        "a photograph of an astronaut riding a horse\n"
        "Negative prompt: blurry\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Version: sdq 0.1.0"
    )


def test_no_negative_prompt_line_when_empty_and_eta_when_set() -> None:
    text = format_parameters(provenance(negative_prompt="", eta=0.5))
    assert text.splitlines()[0] == "a photograph of an astronaut riding a horse"
    assert text.splitlines()[1].startswith("Steps: 50, Sampler: DDIM, ")
    assert ", RNG: CPU, Eta DDIM: 0.5, Version: sdq 0.1.0" in text


@pytest.mark.parametrize("sampler, spelled", [
    ("ddim", "Sampler: DDIM, CFG"), ("plms", "Sampler: PLMS, CFG"),
    ("euler", "Sampler: Euler, CFG"), ("euler_a", "Sampler: Euler a, CFG"),
    ("dpmpp_2m", "Sampler: DPM++ 2M, CFG"),
    ("dpmpp_2m_karras", "Sampler: DPM++ 2M, Schedule type: Karras, CFG"),
])
def test_sampler_names_as_a1111_spells_them(sampler: str, spelled: str) -> None:
    text = format_parameters(provenance(sampler=sampler))
    assert spelled in text
    assert parse_parameters(text).sampler == sampler


def test_values_with_commas_colons_and_newlines_round_trip() -> None:
    p = provenance(prompt="portrait, oil: on canvas\n(detailed:1.2)", negative_prompt="a, b: c",
                   model_name='my "model", v2: final\nedition', cfg=7.0, seed=4294967295)
    text = format_parameters(p)
    assert 'Model: "my \\"model\\", v2: final\\nedition"' in text
    parsed = parse_parameters(text)
    assert (parsed.prompt, parsed.negative_prompt) == (p.params.prompt, p.params.negative_prompt)
    assert parsed.settings["Model"] == p.model_name
    assert (parsed.seed, parsed.steps, parsed.size) == (4294967295, 50, (512, 512))
    assert parsed.settings["CFG scale"] == "7"


@pytest.mark.parametrize("cfg, eta, written", [
    (7.0, 1.0, "CFG scale: 7, Seed: 42, Size: 512x512"), (7.5, 0.25, "CFG scale: 7.5, Seed"),
    (12, 0.0, "CFG scale: 12, Seed"), (6.1, 0.1, "CFG scale: 6.1, Seed"),
])
def test_numbers_as_a1111_writes_them(cfg: float, eta: float, written: str) -> None:
    text = format_parameters(provenance(cfg=cfg, eta=eta))
    assert written in text
    assert (f", Eta DDIM: {eta:g}, " in text) == bool(eta)
    parsed = parse_parameters(text)
    assert (parsed.cfg, parsed.rng) == (cfg, "CPU")


def test_a1111_text_read_by_the_parser_people_use() -> None:
    """sd-parsers, as image browsers use it, reads sdq's PNG as an AUTOMATIC1111 image."""
    p = provenance(256, 256, sampler="dpmpp_2m_karras", cfg=7.0, prompt="a castle, at dusk: misty")
    info = ParserManager().parse(Image.open(io.BytesIO(
        encode_png(photo(256, 256), p, watermark=None).data)))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert (sampler.name, sampler.parameters) == (
        "DPM++ 2M", {"cfg_scale": "7", "seed": "42", "steps": "50", "scheduler": "Karras"})
    assert [prompt.value for prompt in sampler.prompts] == ["a castle, at dusk: misty"]
    assert (sampler.model.name, sampler.model.hash) == ("v1-5-pruned-emaonly", "6ce0161689")
    assert (info.metadata["RNG"], info.metadata["Size"]) == ("CPU", "256x256")


def test_text_without_rng_means_a1111_default() -> None:
    assert parse_parameters("cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1").rng == "GPU"


def test_model_hashes_new_and_legacy() -> None:
    new = parse_parameters(format_parameters(provenance()))
    assert new.model_hash == "6ce0161689"
    assert new.model_hash_matches(MODEL_SHA256) is True
    assert new.model_hash_matches("0" * 64) is False
    legacy = parse_parameters(
        "a photo\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 7460A6FA")
    assert legacy.model_hash == "7460a6fa" and legacy.sampler == "euler_a"
    assert legacy.model_hash_matches(MODEL_SHA256) is None  # 64 KiB hash: no sha256 decides it


def test_parsing_follows_a1111_rules() -> None:
    older = parse_parameters("cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    assert older.sampler == "dpmpp_2m_karras"
    automatic = parse_parameters("cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, "
                                 "CFG scale: 7")
    assert automatic.sampler == "dpmpp_2m"
    # Fewer than three settings: the last line is still prompt.
    assert parse_parameters("cat\nstyle: noir, mood: dark").prompt == "cat\nstyle: noir, mood: dark"
    assert parse_parameters("cat\nSteps: x, Seed: y, Size: big").seed is None


def test_png_round_trip_with_watermark() -> None:
    p = provenance(prompt="\u732b, \u685c: spring")
    encoded = encode_png(photo(512, 512), p, watermark="StableDiffusionV1")
    assert encoded.sha256 == hashlib.sha256(encoded.data).hexdigest()
    assert encoded.watermark == "StableDiffusionV1"
    meta = read_png_metadata(encoded.data)
    assert meta.provenance == p and meta.errors == ()
    assert meta.parameters is not None and meta.parameters.prompt == p.params.prompt
    assert meta.watermark == "StableDiffusionV1"
    assert meta.watermark_status is WatermarkStatus.EMBEDDED
    stored = Image.open(io.BytesIO(encoded.data))
    assert meta.pixels_sha256 == pixel_digest(stored)
    assert wm.detect_watermark(stored, "StableDiffusionV1") < 0.15


def test_the_png_level_trades_size_for_time_never_pixels_or_chunks() -> None:
    """Level 0 stores the pixels raw, 9 squeezes hardest; every level decodes to the same
    (watermarked) pixels and carries the same provenance."""
    p = provenance()
    encoded = {level: encode_png(photo(512, 512), p, watermark="StableDiffusionV1", level=level)
               for level in (0, 1, 9)}
    assert len(encoded[0].data) > len(encoded[1].data) > len(encoded[9].data)
    assert len(encoded[0].data) > 512 * 512 * 3
    pixels = {level: Image.open(io.BytesIO(e.data)).tobytes() for level, e in encoded.items()}
    assert pixels[0] == pixels[1] == pixels[9]
    for e in encoded.values():
        meta = read_png_metadata(e.data)
        assert meta.provenance == p and meta.errors == () and meta.watermark == "StableDiffusionV1"
        assert meta.pixels_sha256 == pixel_digest(Image.open(io.BytesIO(e.data)))


@pytest.mark.parametrize("size, mark, status", [
    ((128, 128), "StableDiffusionV1", WatermarkStatus.TOO_SMALL),
    ((512, 512), None, WatermarkStatus.DISABLED),
])
def test_unmarked_images_keep_their_pixels_and_say_why(
        size: tuple[int, int], mark: str | None, status: WatermarkStatus) -> None:
    image = photo(*size)
    encoded = encode_png(image, provenance(*size), watermark=mark)
    assert encoded.watermark is None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded.data))), np.asarray(image))
    meta = read_png_metadata(encoded.data)
    assert (meta.watermark, meta.watermark_status) == (None, status)


def test_read_from_a_path_and_refuse_non_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(photo(256, 256), provenance(256, 256), watermark=None).data)
    assert read_png_metadata(path).provenance == provenance(256, 256)
    jpeg = io.BytesIO()
    photo(64, 64).save(jpeg, format="JPEG")
    with pytest.raises(MetadataError, match="not a PNG"):
        read_png_metadata(jpeg.getvalue())
    with pytest.raises(MetadataError, match=r"^not a PNG file \(nor any other image\)$"):
        read_png_metadata(b"garbage")
    damaged = encode_png(photo(64, 64), provenance(64, 64), watermark=None).data[:40]
    with pytest.raises(MetadataError, match=r"^a damaged PNG: ") as refused:
        read_png_metadata(damaged)
    assert "BytesIO" not in str(refused.value)


def test_a_foreign_png_has_no_sdq_record() -> None:
    buffer = io.BytesIO()
    photo(64, 64).save(buffer, format="PNG")
    meta = read_png_metadata(buffer.getvalue())
    assert meta.provenance is None and meta.parameters is None and meta.errors == ()


def test_the_image_must_match_the_provenance() -> None:
    with pytest.raises(ValueError, match="image is 256x256, provenance says 512x512"):
        encode_png(photo(256, 256), provenance(), watermark=None)


def test_provenance_validates_what_it_records() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        provenance(sampler="k_lms")
    with pytest.raises(ValueError, match="model_sha256"):
        provenance(model_sha256="6ce0161689")
    with pytest.raises(ValueError, match="timezone-aware"):
        provenance(created=provenance().created.replace(tzinfo=None))


def test_environment_fingerprint() -> None:
    env = environment_fingerprint("cpu", "torch.float32")
    assert (env.device, env.gpu, env.dtype, env.attention, env.rng_device) == (
        "cpu", None, "float32", "sdpa", "cpu")
    assert env.torch == torch.__version__
    assert env.sdq and env.transformers
    assert replace(provenance(), environment=env).to_json()["environment"]["torch"] == env.torch


LORA = {"name": "detail", "weight": 0.8, "sha256": "a" * 64, "a1111": "0123456789ab"}
EMBEDDING = {"name": "easynegative", "sha256": "c74b4e810b03" + "0" * 52}


def test_clip_skip_loras_and_embeddings_read_back_by_sd_parsers() -> None:
    """As A1111 writes them: `Clip skip`, `Lora hashes` by A1111's short hash, `TI hashes`,
    the `<lora:...>` tag left in the prompt as written, no `Emphasis` (Original)."""
    prompt = "a (red:1.5) fox in the ((snow)), [blurry] <lora:detail:0.8>"
    p = provenance(256, 256, prompt=prompt, negative_prompt="easynegative", clip_skip=2,
                   loras=[LORA], embeddings=[EMBEDDING])
    text = format_parameters(p)
    assert ('Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Lora hashes: "detail: '
            '0123456789ab", TI hashes: "easynegative: c74b4e810b03", Version: sdq 0.1.0') in text
    assert "Emphasis" not in text
    info = ParserManager().parse(Image.open(io.BytesIO(
        encode_png(photo(256, 256), p, watermark=None).data)))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert [prompt.value for prompt in sampler.prompts] == [prompt]
    assert [prompt.value for prompt in sampler.negative_prompts] == ["easynegative"]
    assert info.metadata["Clip skip"] == "2"
    # sd-parsers splits each item at every ":" and drops those with two, as A1111's own
    # `Lora hashes` values have; A1111's pattern (parse_parameters) reads them back.
    settings = parse_parameters(text).settings
    assert (settings["Clip skip"], settings["Lora hashes"], settings["TI hashes"]) == (
        "2", "detail: 0123456789ab", "easynegative: c74b4e810b03")


def test_clip_skip_1_and_no_adapters_write_nothing() -> None:
    text = format_parameters(provenance())
    assert "Clip skip" not in text and "hashes" not in text


def test_plain_prompts_are_written_so_a1111_reads_them_literally() -> None:
    """A1111 would read `(red:1.5)` as emphasis, which a `plain` image never had: brackets
    and backslashes are escaped, and A1111's rules turn the text back into what sdq read."""
    from sdq.sdmodel.prompts import parse_emphasis

    prompt = r"a (red:1.5) fox [x] \ y"
    text = format_parameters(provenance(prompt=prompt, negative_prompt="(blur)",
                                        prompt_syntax="plain"))
    parsed = parse_parameters(text)
    assert parsed.prompt == r"a \(red:1.5\) fox \[x\] \\ y"
    assert parsed.negative_prompt == r"\(blur\)"
    assert [(part.text, part.weight) for part in parse_emphasis(parsed.prompt)] == [(prompt, 1.0)]
    assert format_parameters(provenance(prompt=prompt)).startswith(prompt + "\n")


def test_the_sdq_chunk_keeps_adapters_and_older_chunks_read_as_plain() -> None:
    p = provenance(prompt="a (red:1.5) fox", clip_skip=2, loras=[LORA], embeddings=[EMBEDDING])
    again = Provenance.from_json(p.to_json())
    assert again == p and again.params.prompt_syntax == "a1111"
    older = {k: v for k, v in p.to_json().items()
             if k not in ("prompt_syntax", "clip_skip", "loras", "embeddings")}
    old = Provenance.from_json(older)
    assert (old.params.prompt_syntax, old.params.clip_skip, old.loras) == ("plain", 1, ())


def test_img2img_records_its_init_image_as_a1111_and_in_the_sdq_chunk() -> None:
    """`Denoising strength` where A1111 writes it (after the model, before clip skip), read by
    sd-parsers; the sdq chunk keeps the init file's sha256 and name, and says null without."""
    init = InitImage("ab" * 32, "harbour.jpg", 0.6)
    p = provenance(256, 256, clip_skip=2, init=init)
    text = format_parameters(p)
    assert "Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Clip skip: 2, RNG: CPU" in text
    assert format_parameters(provenance(init=InitImage("ab" * 32, "a.png", 1))).count(
        "Denoising strength: 1.0,") == 1
    info = ParserManager().parse(Image.open(io.BytesIO(
        encode_png(photo(256, 256), p, watermark=None).data)))
    assert info is not None and info.metadata["Denoising strength"] == "0.6"
    assert p.to_json()["init"] == {"sha256": "ab" * 32, "source": "harbour.jpg", "strength": 0.6}
    assert Provenance.from_json(p.to_json()) == p
    assert provenance().to_json()["init"] is None and "Denoising" not in format_parameters(provenance())
