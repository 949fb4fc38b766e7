"""The result cache: what identifies a stored image that an item may reuse."""
from __future__ import annotations

from dataclasses import dataclass

REUSE_CHUNK = 500
"""Items looked up in the result cache at once: one read, one lookup and one write each."""


@dataclass(frozen=True)
class Identity:
    """The model as the cache key sees it."""

    sha256: str
    device: str
    dtype: str


@dataclass(frozen=True)
class Source:
    """A stored image an item may reuse: the item that made it, and what its row records."""

    item_id: int
    image_key: str
    image_sha256: str | None
    watermark: str | None
