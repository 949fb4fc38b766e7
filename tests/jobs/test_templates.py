"""Prompt templates: variants, weights, wildcard files, nesting, grids, and their expansion in
prompt files."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from sdq.core.errors import InvalidInput
from sdq.jobs.promptfile import Defaults, PromptFileError, parse_prompt_file
from sdq.jobs.templates import (
    Expansion,
    Wildcards,
    count,
    parse,
    parse_grid,
)


@pytest.fixture
def wildcards(tmp_path: Path) -> Wildcards:
    (tmp_path / "animals").mkdir()
    (tmp_path / "color.txt").write_text("red\n# a comment\n\n{light|dark} blue\n")
    (tmp_path / "animals" / "birds.txt").write_text("owl\nheron\n")
    (tmp_path / "loop.txt").write_text("again __loop__\n")
    return Wildcards(tmp_path)


def prompts(template: str, expansion: Expansion | None = None, negative: str = "") -> list[str]:
    return [p for p, _, _ in (expansion or Expansion()).prompts(template, negative, random.Random(0))]


def test_combinations_in_a_stable_order_the_leftmost_slowest(wildcards: Wildcards) -> None:
    expansion = Expansion(wildcards=wildcards)
    assert prompts("a {red|green} {cat|dog|owl}") == [
        "a red cat", "a red dog", "a red owl", "a green cat", "a green dog", "a green owl"]
    assert prompts("a __color__ __animals/birds__", expansion) == [
        "a red owl", "a red heron", "a light blue owl", "a light blue heron",
        "a dark blue owl", "a dark blue heron"]
    assert count(parse("{a|b {c|d|e}} __color__ {x|y}"), wildcards) == 4 * 3 * 2
    assert prompts("{a|b {c|d}}") == ["a", "b c", "b d"]  # nested: counted per branch
    assert prompts(r"\{literal\} snake\_case\_\_x\_\_ and C:\path") == [
        "{literal} snake_case__x__ and C:\\path"]


def test_values_are_recorded_by_label(wildcards: Wildcards) -> None:
    [(text, negative, values)] = Expansion(wildcards=wildcards).prompts(
        "a {big|small} __color__ {cat|dog}", "{blurry}", random.Random(0))[3:4]
    assert (text, negative) == ("a big light blue dog", "blurry")
    assert values == {"v1": "big", "color": "light blue", "color.v1": "light", "v2": "dog",
                      "negative.v1": "blurry"}


def test_random_expansion_is_weighted_and_reproducible(wildcards: Wildcards) -> None:
    expansion = Expansion(mode="random", draws=2000, seed=7, wildcards=wildcards)
    first = expansion.prompts("a {3::cat|dog}", "", random.Random(7))
    assert first == expansion.prompts("a {3::cat|dog}", "", random.Random(7))
    drawn = Counter(text for text, _, _ in first)
    assert set(drawn) == {"a cat", "a dog"} and 2.5 < drawn["a cat"] / drawn["a dog"] < 3.5
    assert len(expansion.prompts("a __color__", "", random.Random(1))) == 2000


def test_template_errors_name_the_column() -> None:
    for template, message in (("a {red|blue", "column 3: '{' is never closed"),
                              ("a red}", "column 6: '}' without its '{'"),
                              ("a {0::x|0::y}", "every variant weighs 0"),
                              ("a __nope__", "unknown wildcard __nope__: no wildcard folder")):
        with pytest.raises(InvalidInput, match=message):
            prompts(template)


def test_wildcard_problems(wildcards: Wildcards) -> None:
    expansion = Expansion(wildcards=wildcards)
    with pytest.raises(InvalidInput, match=r"unknown wildcard __colr__: no .*colr.txt; did you mean 'color'"):
        prompts("a __colr__", expansion)
    with pytest.raises(InvalidInput, match=r"column 7: wildcard __loop__ names itself "
                                            r"\(__loop__ -> __loop__\)"):
        prompts("again __loop__", expansion)
    fresh = Expansion(wildcards=Wildcards(wildcards.folder))
    assert fresh.to_json()["wildcards"] == {}  # nothing read yet
    prompts("__color__", fresh)
    kept = Expansion.from_json(fresh.to_json())  # what a schedule stores: the lines read
    assert prompts("__color__", kept) == ["red", "light blue", "dark blue"]


def test_grids_are_checked_as_the_options_are() -> None:
    assert parse_grid(["cfg=5,7.5,10", "sampler=euler,Euler a", "seed=1,2"]) == (
        ("cfg", (5.0, 7.5, 10.0)), ("sampler", ("euler", "euler_a")), ("seed", (1, 2)))
    assert Expansion(grid=parse_grid(["steps=10,20", "cfg=5,7"])).cells() == [
        {"steps": 10, "cfg": 5.0}, {"steps": 10, "cfg": 7.0},
        {"steps": 20, "cfg": 5.0}, {"steps": 20, "cfg": 7.0}]
    for spec, message in (("cfg=5,x", "expected a number, got 'x'"),
                          ("steps=0", "must be between 1 and 999"),
                          ("sampler=eulr", "unknown sampler 'eulr'"),
                          ("cgf=5", "unknown field 'cgf'; did you mean 'cfg'"),
                          ("cfg", "expected FIELD=V1,V2")):
        with pytest.raises(InvalidInput, match=message):
            parse_grid([spec])


def test_a_prompt_file_expands_with_seeds_shared_across_the_grid(wildcards: Wildcards) -> None:
    data = b"prompt,n\na {red|blue} fox,2\na __animals/birds__,1\nplain,1\n"
    expansion = Expansion(grid=parse_grid(["cfg=5,7"]), wildcards=wildcards)
    parsed = parse_prompt_file(data, "p.csv", Defaults(seed=100), expansion=expansion)
    got = [(i["row_index"], i["prompt"], i["seed"], i["cfg"]) for i in parsed.items]
    assert got == [
        (0, "a red fox", 100, 5.0), (1, "a red fox", 100, 7.0),
        (2, "a red fox", 101, 5.0), (3, "a red fox", 101, 7.0),
        (4, "a blue fox", 102, 5.0), (5, "a blue fox", 102, 7.0),
        (6, "a blue fox", 103, 5.0), (7, "a blue fox", 103, 7.0),
        (8, "a owl", 104, 5.0), (9, "a owl", 104, 7.0),
        (10, "a heron", 105, 5.0), (11, "a heron", 105, 7.0),
        (12, "plain", 106, 5.0), (13, "plain", 106, 7.0)]
    assert parsed.items[4]["template"] == "a {red|blue} fox"
    assert parsed.items[5]["template_values"] == {"v1": "blue", "cfg": 7.0}
    assert parsed.items[12]["template"] is None
    assert parsed.items[12]["template_values"] == {"cfg": 5.0}
    plain = parse_prompt_file(b"prompt\nplain\n", "p.csv", Defaults(seed=1))
    assert "template" not in plain.items[0]  # nothing recorded for a plain prompt


def test_the_add_policy_moves_every_seed_on() -> None:
    data = b'{"prompt": "a {cat|dog}", "n": 2}\n{"prompt": "own", "seed": 50, "n": 3}\n'
    seeds = [[i["seed"] for i in parse_prompt_file(data, "p.jsonl", Defaults(seed=10),
                                                   repeat=night).items] for night in range(2)]
    assert seeds == [[10, 11, 12, 13, 50, 51, 52], [17, 18, 19, 20, 53, 54, 55]]


def test_prompt_file_template_errors_are_file_line(wildcards: Wildcards) -> None:
    data = b"prompt,negative_prompt\nfine,\na {red|blue,\nok,__nope__\n"
    with pytest.raises(PromptFileError) as error:
        parse_prompt_file(data, "p.csv", Defaults(seed=1), expansion=Expansion(wildcards=wildcards))
    assert [str(p) for p in error.value.problems] == [
        "p.csv:3: prompt: column 3: '{' is never closed",
        f"p.csv:4: negative_prompt: column 1: unknown wildcard __nope__: no "
        f"{wildcards.folder}/nope.txt"]


def wildcard_chain(folder: Path, files: int, lines: int) -> None:
    """`w0.txt` ... : each of `lines` lines names the next file; the last file's lines are words."""
    folder.mkdir(exist_ok=True)
    for k in range(files):
        after = f" __w{k + 1}__" if k + 1 < files else ""
        (folder / f"w{k}.txt").write_text("".join(f"w{k}-{i}{after}\n" for i in range(lines)))


def test_a_chain_of_wildcards_is_counted_without_expanding_it(tmp_path: Path) -> None:
    """Seven files of 60 lines, each line naming the next: 60^7 prompts, counted in 7 x 60
    steps and refused before one is made; drawn at random, it costs a line per file."""
    wildcard_chain(tmp_path / "wc", 7, 60)
    expansion = Expansion(wildcards=Wildcards(tmp_path / "wc"))
    with pytest.raises(InvalidInput, match="^expands to 2,799,360,000,000 prompts, more than 1,000,000$"):
        prompts("a __w0__", expansion)
    assert count(parse("__w5__ {x|y}"), expansion.wildcards) == 60 * 60 * 2
    drawn = Expansion(mode="random", draws=3, seed=1, wildcards=Wildcards(tmp_path / "wc"))
    assert [p.count("-") for p in prompts("a __w0__", drawn)] == [7, 7, 7]
    wildcard_chain(tmp_path / "deep", 12, 1)
    with pytest.raises(InvalidInput, match="__w10__: nested more than 10 deep"):
        prompts("__w0__", Expansion(wildcards=Wildcards(tmp_path / "deep")))


def test_nesting_past_the_limit_is_a_template_error() -> None:
    assert prompts("{" * 20 + "x" + "}" * 20) == ["x"]
    with pytest.raises(InvalidInput, match=r"^column 21: '\{' nested more than 20 deep$"):
        prompts("{" * 600 + "x" + "}" * 600)


def test_an_expansion_past_the_prompt_cap_is_a_file_line_problem(tmp_path: Path) -> None:
    (tmp_path / "long.txt").write_text("x" * 6000 + "\n")
    data = b"prompt,negative_prompt\nok,\n__long__ __long__,\nfine,__long__\n"
    with pytest.raises(PromptFileError) as error:
        parse_prompt_file(data, "p.csv", Defaults(seed=1),
                          expansion=Expansion(wildcards=Wildcards(tmp_path)))
    assert [str(p) for p in error.value.problems] == [
        "p.csv:3: prompt: expanded prompt 1: longer than 10,000 characters (12,001)"]
