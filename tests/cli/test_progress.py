"""Progress lines: readable on a terminal and, when piped, printed whole every few seconds or
tenth of the work (cron and CI logs)."""
from __future__ import annotations

import io
import re
from pathlib import Path

from sdq.cli.progress import ProgressLine, duration, rate_text

from .conftest import Home


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rates_under_one_per_second_read_as_seconds_per_image() -> None:
    assert rate_text(2.4) == "2.40 images/s"
    assert rate_text(0.004) == "250.0 s/image"   # was "0.00 images/s"
    assert rate_text(0.5) == "2.0 s/image"
    assert rate_text(None) == "no images finished yet"
    assert [duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]


def test_piped_progress_prints_whole_lines_every_tenth_and_every_few_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressLine("generating", 40, stream=out, clock=clock)
    clock.now = 3.0
    bar.step(8, 5, 25)     # 1 image's worth of 40: not yet a tenth, not yet 10 s
    clock.now = 12.0
    bar.step(8, 10, 25)    # 10 s since the last line
    clock.now = 20.0
    bar.advance(8)         # a fifth: a new tenth
    clock.now = 21.0
    bar.advance(1)         # same tenth, 1 s later: nothing
    lines = out.getvalue().splitlines()
    assert lines == [
        "generating: 0/40 images (0%), 0s elapsed",
        "generating: 0/40 images (8%), step 10/25 of a batch of 8, 12s elapsed, about 2m18s left, "
        "3.8 s/image",
        "generating: 8/40 images (20%), 20s elapsed, about 1m20s left, 2.5 s/image",
    ]
    clock.now = 100.0
    bar.advance(31)
    assert out.getvalue().splitlines()[-1] == \
        "generating: 40/40 images (100%), 1m40s elapsed, 2.5 s/image"


def test_a_piped_embedded_submit_logs_progress_lines(home: Home, tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("a boat\na fox\na cat\na owl\n")
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
                      "--height", "64", "--steps", "4", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("generating: ")]
    assert lines[0] == "generating: 0/4 images (0%), 0s elapsed"
    assert any(re.search(r", step \d/4 of a batch of 1, ", line) for line in lines)  # between images
    assert re.fullmatch(r"generating: 4/4 images \(100%\), [\dhms]+ elapsed, "
                        r"(\d+\.\d\d images/s|\d+\.\d s/image)", lines[-1]), lines[-1]
    assert "\r" not in result.stderr
