"""Prompt files: the three formats, defaults, seed rules, and every bad input refused whole
with its line-numbered reason."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from sdq.db.models import SEED_LIMIT
from sdq.sdmodel.clip import load_tokenizer
from sdq.jobs.promptfile import (
    Defaults,
    PromptFileError,
    parse_prompt_file,
    read_prompt_file,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def parse(text: str | bytes, name: str = "p.csv", defaults: Defaults = Defaults(seed=100),
          **options):
    data = text.encode() if isinstance(text, str) else text
    options.setdefault("tokenizer", load_tokenizer())
    return parse_prompt_file(data, name, defaults, **options)


def errors(text: str | bytes, name: str = "p.csv", **options) -> list[str]:
    with pytest.raises(PromptFileError) as info:
        parse(text, name, **options)
    assert str(info.value) == "\n".join(map(str, info.value.problems))
    return [str(p) for p in info.value.problems]


def test_csv_rows_fill_defaults_and_follow_the_seed_rules(tokenizer) -> None:
    result = parse('prompt,seed,n,tags,sampler,cfg\n'
                   'a cat,5,2,"x, y, x",EULER_A,\n'
                   'a dog,,3,,,4.5\n')
    assert result.format == "csv" and result.rows == 2 and result.base_seed == 100
    assert [i["seed"] for i in result.items] == [5, 6, 102, 103, 104]
    assert [i["row_index"] for i in result.items] == [0, 1, 2, 3, 4]
    cat, dog = result.items[0], result.items[2]
    assert cat == {"prompt": "a cat", "negative_prompt": "", "sampler": "euler_a", "steps": 50,
                   "cfg": 7.5, "eta": 0.0, "width": 512, "height": 512, "tags": ["x", "y"],
                   "row_index": 0, "seed": 5, "prompt_syntax": "a1111", "clip_skip": 1}
    assert dog["tags"] is None and dog["cfg"] == 4.5 and dog["sampler"] == "ddim"
    assert len(result.sha256) == 64 and result.warnings == []


def test_jsonl_and_text_formats_give_the_same_items() -> None:
    options = Defaults(seed=7, steps=20, sampler="euler", width=256, height=384,
                       negative_prompt="blurry")
    jsonl = parse('{"prompt": "a fox", "tags": ["a", "b"], "cfg": 3}\n\n'
                  '{"prompt": "an owl", "seed": null, "steps": "30"}\n', "p.jsonl", options)
    text = parse("# comment\na fox\n\n  an owl  \n", "p.txt", options)
    assert jsonl.format == "jsonl" and text.format == "text"
    assert [(i["prompt"], i["seed"], i["negative_prompt"], i["width"]) for i in text.items] == \
        [("a fox", 7, "blurry", 256), ("an owl", 8, "blurry", 256)]
    assert jsonl.items[0]["tags"] == ["a", "b"] and jsonl.items[0]["cfg"] == 3.0
    assert jsonl.items[1]["steps"] == 30 and jsonl.items[1]["seed"] == 8


def test_other_tools_names_are_taken_and_sdqs_recorded() -> None:
    csv = parse("prompt,sampler,guidance_scale,num_inference_steps\nx,Euler a,5,20\n"
                "y,DPM++ 2M Karras,,\n")
    assert [(i["sampler"], i["cfg"], i["steps"]) for i in csv.items] == [
        ("euler_a", 5.0, 20), ("dpmpp_2m_karras", 7.5, 50)]
    jsonl = parse('{"prompt": "x", "sampler": "euler_ancestral", "cfg_scale": 4}\n', "p.jsonl")
    assert (jsonl.items[0]["sampler"], jsonl.items[0]["cfg"]) == ("euler_a", 4.0)


def test_nan_and_fields_that_do_not_go_together_are_refused_with_their_line() -> None:
    assert errors('{"prompt": "x", "cfg": NaN}\n{"prompt": "y", "eta": Infinity}\n', "p.jsonl") == [
        "p.jsonl:1: cfg: expected a number, got nan", "p.jsonl:2: eta: expected a number, got inf"]
    assert errors("prompt,sampler,eta\nx,ddim,0.5\ny,euler,0.5\n") == [
        "p.csv:3: eta: applies to ddim only, got eta=0.5 for 'euler'"]
    assert errors("prompt,cfg,guidance_scale\nx,1,2\n") == [
        "p.csv:1: header: duplicate column 'guidance_scale' (another name for 'cfg')"]
    assert errors('{"prompt": "x", "cfg": 1, "cfg_scale": 2}\n', "p.jsonl") == [
        "p.jsonl:1: cfg_scale: duplicate field (another name for 'cfg')"]


def test_format_is_sniffed_when_the_suffix_says_nothing() -> None:
    assert errors("# only a comment\n", "p.txt") == ["p.txt:1: file: no prompts"]
    assert parse('{"prompt": "x"}\n', "prompts").format == "jsonl"
    assert parse("x\n", "prompts").format == "text"
    assert parse("prompt\nx\n", "prompts", format="csv").format == "csv"
    with pytest.raises(ValueError, match="unknown prompt file format"):
        parse("x", "p", format="yaml")


def test_a_random_base_seed_is_recorded_and_keeps_every_seed_in_range() -> None:
    result = parse("prompt,n\nx,4\n", defaults=Defaults(), rng=random.Random(3))
    seeds = [i["seed"] for i in result.items]
    assert seeds == list(range(result.base_seed, result.base_seed + 4))
    assert all(0 <= s < SEED_LIMIT for s in seeds)


def test_a_bom_and_crlf_line_ends_are_accepted_and_quoted_newlines_keep_their_line() -> None:
    result = parse('\ufeffprompt,seed\r\n"two\r\nlines",1\r\nthird,2\r\n'.encode())
    assert [i["prompt"] for i in result.items] == ["two\r\nlines", "third"]
    assert errors('prompt,width\n"a\nb",9\nc,10\n') == [
        "p.csv:2: width: must be a multiple of 8, got 9",
        "p.csv:4: width: must be a multiple of 8, got 10",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed,n\n1,2\n", ["p.csv:1: header: no 'prompt' column"]),
        ("prompt,seed,seed\nx,1,2\n", ["p.csv:1: header: duplicate column 'seed'"]),
        ("prompt,sead\nx,1\n", ["p.csv:1: header: unknown column 'sead'; did you mean 'seed'?"]),
        ("", ["p.csv:1: header: no header row (expected e.g. prompt,seed)"]),
        ("\n\n", ["p.csv:1: header: no header row (expected e.g. prompt,seed)"]),
        ("prompt\n", ["p.csv:1: file: no prompts"]),
        ("prompt,seed\n,1\n  ,2\n", ["p.csv:2: prompt: missing", "p.csv:3: prompt: missing"]),
        ("prompt\nx,y\n", ["p.csv:2: row: 2 cells, but the header names 1 columns"]),
        ('prompt\n"open\n', ["p.csv:2: csv: unexpected end of data"]),
        ("prompt,seed\nx,1.5\n", ["p.csv:2: seed: expected a whole number, got '1.5'"]),
        ("prompt,seed\nx,-1\n", [f"p.csv:2: seed: must be between 0 and {SEED_LIMIT - 1}, got -1"]),
        (f"prompt,seed\nx,{SEED_LIMIT}\n",
         [f"p.csv:2: seed: must be between 0 and {SEED_LIMIT - 1}, got {SEED_LIMIT}"]),
        (f"prompt,seed,n\nx,{SEED_LIMIT - 2},3\n",
         [f"p.csv:2: seed: seed {SEED_LIMIT - 2} with n=3 runs past {SEED_LIMIT - 1}"]),
        ("prompt,n\nx,0\n", ["p.csv:2: n: must be between 1 and 10000, got 0"]),
        ("prompt,n\nx,1000000\n", ["p.csv:2: n: must be between 1 and 10000, got 1000000"]),
        ("prompt,steps\nx,ten\n", ["p.csv:2: steps: expected a whole number, got 'ten'"]),
        ("prompt,steps\nx,1000\n", ["p.csv:2: steps: must be between 1 and 999, got 1000"]),
        ("prompt,cfg\nx,high\n", ["p.csv:2: cfg: expected a number, got 'high'"]),
        ("prompt,cfg\nx,nan\n", ["p.csv:2: cfg: expected a number, got 'nan'"]),
        ("prompt,cfg\nx,-1\n", ["p.csv:2: cfg: must be between 0 and 100, got -1"]),
        ("prompt,sampler\nx,eulr\n", ["p.csv:2: sampler: unknown sampler 'eulr'; did you mean "
                                      "'euler'? (known: ddim, plms, euler, euler_a, dpmpp_2m, "
                                      "dpmpp_2m_karras)"]),
        ("prompt,sampler\nx,heun\n", ["p.csv:2: sampler: unknown sampler 'heun' (known: ddim, "
                                       "plms, euler, euler_a, dpmpp_2m, dpmpp_2m_karras)"]),
        ("prompt,width,height\nx,500,512\n", ["p.csv:2: width: must be a multiple of 8, got 500"]),
        ("prompt,height\nx,4096\n", ["p.csv:2: height: must be between 8 and 2048, got 4096"]),
        ("prompt,width\nx,0\n", ["p.csv:2: width: must be between 8 and 2048, got 0"]),
        ("prompt,model\nx,sd15\n", ["p.csv:2: model: unknown model 'sd15'; register it with "
                                    "`sdq models add REF --name sd15`"]),
    ],
)
def test_bad_csv_input_is_refused_with_its_line_and_reason(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"prompt": "x"\n', ["p.jsonl:1: json: Expecting ',' delimiter at column 15"]),
        ("[1, 2]\n", ["p.jsonl:1: json: expected an object, got list"]),
        ('{"seed": 1}\n', ["p.jsonl:1: prompt: missing"]),
        ('{"prompt": 5}\n', ["p.jsonl:1: prompt: expected text, got int"]),
        ('{"prompt": "x", "prompt": "y"}\n', ["p.jsonl:1: prompt: duplicate field"]),
        ('{"prompt": "x", "sede": 1}\n', ["p.jsonl:1: sede: unknown field; did you mean 'seed'?"]),
        ('{"prompt": "x", "seed": true}\n', ["p.jsonl:1: seed: expected a whole number, got True"]),
        ('{"prompt": "x", "seed": 2.5}\n', ["p.jsonl:1: seed: expected a whole number, got 2.5"]),
        ('{"prompt": "x", "cfg": "7,5"}\n', ["p.jsonl:1: cfg: expected a number, got '7,5'"]),
        ('{"prompt": "x", "tags": [1]}\n',
         ["p.jsonl:1: tags: expected comma-separated text or a list of strings"]),
        ('{"prompt": "a\\u0000b"}\n',
         ["p.jsonl:1: prompt: contains a NUL character (U+0000) at character 2"]),
        ('{"prompt": "x", "negative_prompt": "\\ud800"}\n',
         ["p.jsonl:1: negative_prompt: contains a lone surrogate (U+D800) at character 1"]),
        ('{"prompt": "x", "tags": ["ok", "a\\udfffb"]}\n',
         ["p.jsonl:1: tags: contains a lone surrogate (U+DFFF) at character 2"]),
        ('{"prompt": "x", "model": "m\\u0000"}\n',
         ["p.jsonl:1: model: contains a NUL character (U+0000) at character 2"]),
        ('{"prompt": "x", "cfg": 1e308}\n', ["p.jsonl:1: cfg: must be between 0 and 100, got 1e+308"]),
        ('{"prompt": "x", "eta": Infinity}\n', ["p.jsonl:1: eta: expected a number, got inf"]),
        ('{"prompt": "' + "x" * 10_001 + '"}\n',
         ["p.jsonl:1: prompt: longer than 10,000 characters (10,001)"]),
    ],
)
def test_bad_jsonl_input_is_refused_with_its_line_and_reason(text: str, expected: list[str]) -> None:
    assert errors(text, "p.jsonl") == expected


def test_every_problem_of_the_file_is_listed_in_line_order() -> None:
    text = ("prompt,seed,steps,sampler,width\n"
            "ok,1,20,ddim,512\n"
            ",x,0,nope,513\n"
            "also ok,2,20,euler,512\n"
            "bad,3,20,euler,12\n")
    assert errors(text) == [
        "p.csv:3: seed: expected a whole number, got 'x'",
        "p.csv:3: steps: must be between 1 and 999, got 0",
        "p.csv:3: sampler: unknown sampler 'nope' (known: ddim, plms, euler, euler_a, dpmpp_2m, "
        "dpmpp_2m_karras)",
        "p.csv:3: width: must be a multiple of 8, got 513",
        "p.csv:3: prompt: missing",
        "p.csv:5: width: must be a multiple of 8, got 12",
    ]


def test_undecodable_lines_are_named_and_the_rest_is_still_checked() -> None:
    data = b"prompt,width\ncaf\xe9,512\nx,12\n\xff\n"
    assert errors(data) == [
        "p.csv:2: encoding: not UTF-8: byte 0xe9 at column 4",
        "p.csv:3: width: must be a multiple of 8, got 12",
        "p.csv:4: encoding: not UTF-8: byte 0xff at column 1",
    ]


def test_a_fixed_base_seed_that_runs_past_the_range_is_an_error() -> None:
    text = "prompt,seed,n\na,,2\nb,0,5\nc,,1\n"
    assert errors(text, defaults=Defaults(seed=SEED_LIMIT - 7)) == [
        f"p.csv:4: seed: --seed {SEED_LIMIT - 7} + image index 7 runs past {SEED_LIMIT - 1}; "
        "use a smaller --seed",
    ]
    assert parse(text, defaults=Defaults(seed=SEED_LIMIT - 8)).items[-1]["seed"] == SEED_LIMIT - 1


def test_row_models_resolve_through_the_registry_once_per_name() -> None:
    asked: list[str] = []

    def resolve(name: str) -> int | None:
        asked.append(name)
        if name == "a1b2c3":
            raise LookupError("'a1b2c3' names more than one model; use more of its hash")
        return {"sd15": 3}.get(name)

    result = parse("prompt,model\na,sd15\nb,\nc,sd15\n", resolve_model=resolve)
    assert [i.get("model_id") for i in result.items] == [3, None, 3] and asked == ["sd15"]
    assert errors("prompt,model\na,sd21\nb,a1b2c3\n", resolve_model=resolve) == [
        "p.csv:2: model: unknown model 'sd21'; register it with `sdq models add REF --name sd21`",
        "p.csv:3: model: 'a1b2c3' names more than one model; use more of its hash"]


def test_plain_prompts_past_the_clip_window_are_warnings_naming_the_dropped_words() -> None:
    long = " ".join(["castle"] * 74 + ["under", "the", "moon"])
    result = parse(f"prompt,negative_prompt,prompt_syntax\n{long},short,plain\nfine,{long},plain\n"
                   f"{long},{long},a1111\n")
    assert [str(w) for w in result.warnings] == [
        "p.csv:2: prompt: longer than 75 CLIP tokens; dropped: 'the moon'",
        "p.csv:3: negative_prompt: longer than 75 CLIP tokens; dropped: 'the moon'",
    ]
    assert len(result.items) == 3


def test_items_are_accepted_by_submit_job(tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    from sdq.db.models import Item, Job
    from sdq.db.queries import submit_job
    from sdq.db.session import open_database

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "n": 2, "tags": "t"}\n{"prompt": "b", "seed": 9}\n')
    result = read_prompt_file(path, Defaults(seed=1), tokenizer=load_tokenizer())
    engine = open_database(f"sqlite:///{tmp_path / 'sdq.db'}")
    with Session(engine) as session:
        job = submit_job(session, Job(source_name=result.source), result.items)
        session.commit()
        rows = session.query(Item).filter_by(job_id=job.id).order_by(Item.row_index).all()
        assert [(r.prompt, r.seed, r.tags) for r in rows] == [("a", 1, ["t"]), ("a", 2, ["t"]),
                                                              ("b", 9, None)]
    engine.dispose()


def test_nul_in_csv_and_text_files_is_refused_with_its_line() -> None:
    assert errors("prompt\nok\na\0b\n") == [
        "p.csv:3: prompt: contains a NUL character (U+0000) at character 2"]
    assert errors("ok\nfine\n\0\n", "p.txt") == [
        "p.txt:3: prompt: contains a NUL character (U+0000) at character 1"]
