"""Prompt search: words, phrases, and every kind of awkward input, alike on both databases."""
from __future__ import annotations

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from sdq.db.fulltext import TextQuery, parse_query
from sdq.db.models import Item, Job
from sdq.db.queries import search_items, submit_job
from sdq.core.errors import InvalidInput

from .helpers import add_job, spec

LONG = " ".join(["painterly"] * 120) + " a quiet zebra grazing"
PROMPTS = [
    "a red dragon over the sea",                    # 0
    "the dragon is red over the sea",               # 1
    'a neon sign that says "hello world"',          # 2
    "100% cotton_candy clouds",                     # 3
    "Café au lait, ÜNÏCÖDÉ style",                  # 4
    "a 🐉 breathing fire",                          # 5
    "sci-fi city at night",                         # 6
    "don't panic",                                  # 7
    "prompt: dragon OR NOT near(*)",                # 8
    LONG,                                           # 9
    "猫 sitting on a mat",                          # 10
    "under_score and 50% off",                      # 11
    "a castle <lora:add_detail:0.8>, masterpiece",  # 12
    "see x/y/z.png or write me@example.com",        # 13
]


@pytest.fixture
def corpus(session: Session) -> Job:
    return add_job(session, PROMPTS)


def rows(session: Session, query: str) -> set[int]:
    return {item.row_index for item in search_items(session, text=query, limit=100).items}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("dragon", {0, 1, 8}),
        ("DRAGON", {0, 1, 8}),
        ("red dragon", {0, 1}),              # every word, in any order
        ('"red dragon"', {0}),               # the phrase, in order
        ('"dragon red"', set()),
        ('sea "red dragon"', {0}),
        ('"hello world"', {2}),
        ('says "hello', {2}),                # an unterminated quote runs to the end
        ("café", {4}),
        ("CAFÉ ünïcödé", {4}),
        ("cafe", set()),                     # accents count, as with PostgreSQL's `simple`
        ("猫", {10}),
        ("sci-fi", {6}),
        ("fi", {6}),
        ("don't", {7}),
        ("cotton_candy", {3}),
        ("100%", {3}),                       # the digits are the word
        ("zebra", {9}),
        ('"quiet zebra grazing"', {9}),
        ("painterly", {9}),
        ("unicorn", set()),
        ("<lora:add_detail:0.8>", {12}),     # PostgreSQL's parser took it for an XML tag
        ("add_detail", {12}),
        ("lora", {12}),
        ("0.8", {12}),
        ("detail:0.8>", {12}),
        ("x/y/z.png", {13}),                 # ... and this for one file token
        ("z.png", {13}),
        ("y", {13}),
        ("me@example.com", {13}),
        ("example", {13}),
        ("1.5", set()),
    ],
)
def test_words_and_phrases(session: Session, corpus: Job, query: str, expected: set[int]) -> None:
    assert rows(session, query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("🐉", {5}),                          # no letters: matched as a substring
        ("%", {3, 11}),                      # LIKE's wildcards are escaped...
        ("_", {3, 11, 12}),
        ("%%", set()),                       # ...so they only match themselves
        ("*", {8}),
        ("🐉 fire", {5}),
        ("🦄", set()),
    ],
)
def test_terms_without_letters_match_as_substrings(
    session: Session, corpus: Job, query: str, expected: set[int]
) -> None:
    assert rows(session, query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("dragon OR unicorn", set()),        # OR is a word here, not an operator
        ("NOT near(*)", {8}),
        ("prompt:dragon", {8}),              # not a column filter
        ("dragon*", {0, 1, 8}),              # not a prefix query
        ("NEAR(dragon sea)", set()),
        ("'; DROP TABLE items; --", set()),
    ],
)
def test_query_syntax_is_never_interpreted(
    session: Session, corpus: Job, query: str, expected: set[int]
) -> None:
    assert rows(session, query) == expected
    assert "items" in inspect(session.connection()).get_table_names()


@pytest.mark.parametrize("query", ['"', '""', '" "'])
def test_a_query_with_nothing_to_search_for_is_refused_not_everything(
        session: Session, corpus: Job, query: str) -> None:
    with pytest.raises(InvalidInput, match="nothing to search for"):
        rows(session, query)


def test_long_queries_and_prompts(session: Session, corpus: Job) -> None:
    assert rows(session, LONG) == {9}
    assert rows(session, f'"{LONG}"') == {9}
    assert rows(session, "x" * 1000) == set()


@pytest.mark.parametrize("query", ['"red dragon"', '"hello world" neon', "dragon"])
def test_a_cursor_far_above_the_newest_item(session: Session, corpus: Job, query: str) -> None:
    """On PostgreSQL this skips a phrase search's newest-ids window and goes to the GIN index;
    the answer must not change."""
    assert rows(session, query) == {
        item.row_index for item in search_items(session, text=query, before=10**12).items
    }


def test_parse_query() -> None:
    assert parse_query('a "b c" 🐉 "d') == TextQuery(("a", "b c", "d"), ("🐉",))
    assert parse_query('  "" ') == TextQuery()
    assert not parse_query("")
    assert parse_query('"red dragon" sea').has_multiword_phrase
    assert not parse_query("red dragon").has_multiword_phrase
    assert parse_query("sci-fi").has_multiword_phrase  # two words that must be adjacent


def test_items_are_found_by_their_init_image(session: Session) -> None:
    maker = add_job(session, ["a red fox"])
    source = session.scalars(select(Item).where(Item.job_id == maker.id)).one()
    source.image_sha256 = "ab" * 32
    first, second = "ab" * 32, "cd" * 32
    job = submit_job(session, Job(), [
        spec("from the fox", init_sha256=first, init_source=f"item:{source.id}", strength=0.5),
        spec("from a photo", init_sha256=second, init_source="photo.png", strength=0.3),
        spec("text to image")])
    session.commit()
    made = {i.prompt: i.id for i in session.scalars(select(Item).where(Item.job_id == job.id))}

    def found(init: str) -> list[str]:
        return sorted(i.prompt for i in search_items(session, init=init).items)

    assert found(f"item:{source.id}") == ["from the fox"] == found("ABAB")
    assert found("cdcd") == ["from a photo"] and found(second) == ["from a photo"]
    assert found(f"item:{made['text to image']}") == []  # no image: nothing started from it
    for bad in ("item:x", "abc", "zzzz"):
        with pytest.raises(InvalidInput):
            search_items(session, init=bad)
