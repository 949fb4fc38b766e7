"""`<lora:NAME:WEIGHT>` tags as A1111 reads them: found by its extra-network pattern, weight
1 when none is written, every tag taken out of the text the text encoder sees."""
from __future__ import annotations

import pytest

from sdq.core.loratags import lora_tags, parse_lora_option, strip_tags
from sdq.core.params import ParamError


def test_tags_give_name_and_weight_in_order() -> None:
    prompt = "a (red:1.5) fox <lora:detail:0.8>, <lora:style> in <hypernet:x:1> snow <lora:d2:-1:te=0>"
    assert lora_tags(prompt) == [("detail", 0.8), ("style", 1.0), ("d2", -1.0)]
    assert strip_tags(prompt) == "a (red:1.5) fox ,  in  snow "


@pytest.mark.parametrize(("text", "tags", "stripped"), [
    ("<lora:>", [], "<lora:>"),  # no arguments: no tag
    ("<lora x:1>", [], "<lora x:1>"),
    ("lora:x:1", [], "lora:x:1"),
    ("<LORA:x:1>", [], ""),  # another kind of extra network (A1111 knows none by that name)
    ("<lora: x>", [(" x", 1.0)], ""),  # the name as written: no file is called " x"
])
def test_edges_of_the_pattern(text: str, tags: list, stripped: str) -> None:
    assert (lora_tags(text), strip_tags(text)) == (tags, stripped)


def test_a_weight_that_is_no_number_is_refused() -> None:
    with pytest.raises(ParamError, match="lora: weight 'much' in '<lora:x:much>' is not a number"):
        lora_tags("a <lora:x:much>")
    with pytest.raises(ParamError, match="weight 'nan'"):
        lora_tags("a <lora:x:nan>")


def test_the_option_reads_name_and_weight() -> None:
    assert parse_lora_option("detail") == ("detail", 1.0)
    assert parse_lora_option("detail:0.25") == ("detail", 0.25)
    with pytest.raises(ParamError):
        parse_lora_option("")
