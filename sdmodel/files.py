"""Writing a file whole or not at all, for every layer of sdq (hash cache, images, CLI output).

Here because sdmodel depends on no other part of sdq, so all of them can use it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
"""Names of files being written; folder listings skip them."""


@contextlib.contextmanager
def atomic_writer(target: Path) -> Iterator[BinaryIO]:
    """A file to write that replaces `target` only once closed, flushed and fsynced, so
    a crash never leaves a truncated file under the real name; on any error the temp file
    is removed and the error raised."""
    # Not tempfile: its 0600 mode would survive the rename; os.open honours the umask.
    temp = target.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{target.name}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_writer(path) as out:
        out.write(data)
