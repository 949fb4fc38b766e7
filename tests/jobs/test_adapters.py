"""Submit-time resolution of LoRAs and embeddings: each name a prompt file's images use found
in the folders given and recorded with its file's hash, a missing one a problem of its line,
and all of it without the model stack."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdq.core.jobspec import Defaults
from sdq.jobs.adapters import AdapterFinder
from sdq.jobs.promptfile import PromptFileError, parse_prompt_file
from sdq.jobs.templates import Expansion, parse_grid
from sdq.sdmodel.lora_files import describe_lora

LORA = b"not read here: only found and hashed"


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two LoRA folders (`detail` in both: the first wins) and an embeddings folder."""
    first, second, embeddings = tmp_path / "l1", tmp_path / "l2", tmp_path / "emb"
    for folder in (first, second, embeddings):
        folder.mkdir()
    (first / "detail.pt").write_bytes(LORA + b"1")
    (second / "detail.pt").write_bytes(LORA + b"2")
    (second / "style.pt").write_bytes(LORA + b"3")
    (embeddings / "EasyNegative.pt").write_bytes(b"vectors")
    return first, second, embeddings


def items(text: str, finder: AdapterFinder, **options) -> list[dict]:
    return list(parse_prompt_file(text.encode(), "p.csv", Defaults(seed=1), adapters=finder,
                                  **options).items)


def test_each_image_records_the_loras_and_embeddings_it_names(folders) -> None:
    first, second, embeddings = folders
    finder = AdapterFinder([first, second], embeddings, ["style:0.5", "detail:0.3"])
    made = items('prompt,negative_prompt,prompt_syntax\n'
                 '"a fox <lora:detail:0.8>","(easynegative:1.2), blurry",a1111\n'
                 '"a fox <lora:detail:0.8>","easynegatives",plain\n', finder)
    detail, style = describe_lora(first / "detail.pt"), describe_lora(second / "style.pt")
    assert made[0]["loras"] == [
        {"name": "detail", "weight": 0.8, "sha256": detail.sha256, "a1111": detail.a1111_hash},
        {"name": "style", "weight": 0.5, "sha256": style.sha256, "a1111": style.a1111_hash}]
    assert [e["name"] for e in made[0]["embeddings"]] == ["EasyNegative"]
    # plain: the tag is text, the option applies; no embedding is looked up
    assert [(r["name"], r["weight"]) for r in made[1]["loras"]] == [("detail", 0.3), ("style", 0.5)]
    assert "embeddings" not in made[1]
    assert made[0]["prompt"] == "a fox <lora:detail:0.8>"  # recorded as written


def test_template_variants_and_grid_syntaxes_each_get_their_own(folders) -> None:
    first, second, embeddings = folders
    finder = AdapterFinder([first, second], embeddings)
    made = items('prompt\n"a {<lora:detail>|<lora:style:2>} fox"\n', finder,
                 expansion=Expansion(grid=parse_grid(["prompt_syntax=a1111,plain"])))
    assert [(i["prompt_syntax"], [(r["name"], r["weight"]) for r in i.get("loras", ())])
            for i in made] == [("a1111", [("detail", 1.0)]), ("plain", []),
                               ("a1111", [("style", 2.0)]), ("plain", [])]


def test_an_unknown_name_is_a_problem_of_its_line_naming_the_folders(folders) -> None:
    first, second, embeddings = folders
    finder = AdapterFinder([first, second], embeddings)
    with pytest.raises(PromptFileError) as info:
        items('prompt\nok\n"a <lora:nosuch:1>"\n"a <lora:x:big>"\n', finder)
    assert [str(p) for p in info.value.problems] == [
        f"p.csv:3: lora: no nosuch.safetensors in {first}, {second}",
        "p.csv:4: lora: weight 'big' in '<lora:x:big>' is not a number"]
    with pytest.raises(PromptFileError, match="p.csv:2: lora: no a.safetensors in no LoRA folder"):
        items('prompt\n"x <lora:a>"\n', AdapterFinder(loras=["a"]))


def test_finding_and_hashing_import_no_model_stack(folders) -> None:
    first, _, _ = folders
    code = ("import sys; from sdq.jobs.adapters import AdapterFinder; "
            f"r = AdapterFinder([{str(first)!r}]).resolve('a <lora:detail:2>', '', 'a1111'); "
            "assert r[0][0]['weight'] == 2.0, r; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'celery') if m in sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tag_is_never_dropped_silently() -> None:
    """With no LoRA folder given anywhere, a prompt's tag is still a problem of its line."""
    with pytest.raises(PromptFileError, match="p.csv:2: lora: no detail.safetensors in no LoRA folder"):
        parse_prompt_file(b'prompt\n"a fox <lora:detail>"\n', "p.csv", Defaults(seed=1))
    [item] = parse_prompt_file(b'prompt,prompt_syntax\n"a fox <lora:detail>",plain\n', "p.csv",
                               Defaults(seed=1)).items
    assert "loras" not in item  # plain: the tag is text
