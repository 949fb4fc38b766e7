"""`jobs.reproduce` on image-to-image targets, without a model: each member's start read from
storage (each init file once), a missing one refused before any model loads, and a replay
without the starts refused instead of silently making text-to-image images."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from sdq.core.init_image import InitImage
from sdq.core.params import GenerationParams
from sdq.images.storage import LocalStorage, init_key
from sdq.images.stored_init import UnusableInit
from sdq.jobs.reproduce import Target, replay
from tests.fakes import FakePipeline


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get(key)


def stored(storage: LocalStorage, colour: str) -> str:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    sha256 = hashlib.sha256(out.getvalue()).hexdigest()
    storage.put(init_key(sha256), out.getvalue())
    return sha256


def target(inits: list[InitImage | None]) -> Target:
    members = [GenerationParams(prompt="x", seed=n, width=64, height=64) for n in range(len(inits))]
    return Target(7, members, 1, "b-1", len(members), "f" * 64, "/m/tiny", "1/7.png", "cpu",
                  [[] for _ in inits], inits)


def test_each_members_start_is_read_from_storage_once_per_file(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    red, blue = stored(storage, "red"), stored(storage, "blue")
    wanted = target([InitImage(red, "r.png", 0.6), None, InitImage(blue, "b.png", 0.6),
                     InitImage(red, "r.png", 0.6)])
    starts = wanted.starts(storage)
    assert storage.gets == [init_key(red), init_key(blue)]
    assert starts[1] is None
    assert [s.image.getpixel((0, 0)) for s in (starts[0], starts[2], starts[3])] == [
        (255, 0, 0), (0, 0, 255), (255, 0, 0)]
    assert {s.strength for s in (starts[0], starts[2], starts[3])} == {0.6}

    gone = hashlib.sha256(b"gone").hexdigest()
    with pytest.raises(UnusableInit, match=rf"^init image {gone[:10]}: not in storage"):
        target([InitImage(gone, "g.png", 0.6)]).starts(storage)


def test_a_replay_without_the_starts_is_refused(tmp_path: Path) -> None:
    wanted = target([InitImage("a" * 64, "a.png", 0.5), InitImage("a" * 64, "a.png", 0.5)])
    with pytest.raises(ValueError, match="image-to-image members: pass their starts"):
        replay(FakePipeline(), wanted, b"")  # type: ignore[arg-type]
