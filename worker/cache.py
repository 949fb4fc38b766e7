"""The result cache: an item whose cache key (`params.cache_key`) a done item has, with its
object still stored, is finished at once as reusing that object (`reused_from`), with no model
call. It runs before the model is loaded, so a message whose images are all stored already
costs no model load; jobs submitted with `--no-reuse` look nothing up."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.batch import Batch
from sdq.core.params import GenerationParams, ParamError, cache_key
from sdq.core.states import FINISHED
from sdq.db.models import Item, Job, Model, Status
from sdq.db.transitions import Reuse, record_reused
from sdq.images.storage import Storage
from sdq.sdmodel.checkpoint import CheckpointError, ModelNotFound, model_sha256, resolve_model_ref
from sdq.sdmodel.pipeline import default_device, default_dtype
from sdq.sdmodel.produce import Denoiser

REUSE_CHUNK = 500
"""Items looked up in the result cache at once: one read, one lookup and one write each."""


@dataclass(frozen=True)
class Identity:
    """The model as the cache key sees it, known before it is loaded."""

    sha256: str
    device: str
    dtype: str


def identify(pipe: Denoiser | None, model_ref: str, *, device: str | None, dtype: str | None,
             hash_cache: Any) -> Identity | None:
    """What the cache key needs of the model, without loading it: its sha256 (hashes are
    cached), and the device and dtype it is (or will be) loaded on, as `load_pipeline` chooses
    them. None when the model cannot be found (loading it then fails the items with the
    reason)."""
    if pipe is not None:
        return Identity(pipe.sha256, pipe.device, pipe.dtype)
    try:
        sha256 = model_sha256(resolve_model_ref(model_ref), hash_cache)
    except (CheckpointError, ModelNotFound, ValueError, OSError):
        return None
    device = device or default_device()
    return Identity(sha256, device, dtype or default_dtype(device))


class ResultCache:
    """Looks items up by cache key and finishes those whose image is stored already."""

    def __init__(self, reads: sessionmaker[Session], sessions: sessionmaker[Session],
                 storage: Storage, *, watermark: str | None, worker_name: str) -> None:
        self.reads, self.sessions, self.storage = reads, sessions, storage
        self.watermark, self.worker_name = watermark, worker_name

    def key(self, params: GenerationParams, model: Identity | Denoiser, *, loras: Any = (),
            embeddings: Any = ()) -> str:
        """The item's cache key: its parameters, LoRA and embedding records (by file hash),
        this model, watermark, device and dtype."""
        return cache_key(params, model_sha256=model.sha256, watermark=self.watermark,
                         device=model.device, dtype=model.dtype, loras=loras or (),
                         embeddings=embeddings or ())

    def reuse(self, batches: Sequence[Batch], model: Identity | Denoiser) -> set[int]:
        """Finish, as reusing the stored image, every item of the batches whose image is
        stored already (a done item with its cache key, whose object is still there); their
        ids. A chunk of items at a time, so that a job that is all cached costs a few queries
        per thousand items."""
        ids = [item_id for batch in batches for item_id in batch.item_ids]
        reused: set[int] = set()
        for start in range(0, len(ids), REUSE_CHUNK):
            reused |= self._reuse_chunk(ids[start:start + REUSE_CHUNK], model)
        return reused

    def _reuse_chunk(self, ids: Sequence[int], model: Identity | Denoiser) -> set[int]:
        with self.reads() as session:
            items = session.execute(
                select(Item).join(Job, Item.job_id == Job.id).join(Model, Item.model_id == Model.id)
                .where(Item.id.in_(ids), Item.status.not_in(sorted(FINISHED)), Job.reuse,
                       Model.sha256 == model.sha256)).scalars().all()
            keys: dict[int, str] = {}
            for item in items:
                with contextlib.suppress(ParamError):  # failed when a worker takes it
                    keys[item.id] = self.key(item.params, model, loras=item.loras,
                                             embeddings=item.embeddings)
            if not keys:
                return set()
            found = session.execute(
                select(Item.cache_key, Item.id, Item.reused_from, Item.image_key,
                       Item.image_sha256, Item.watermark)
                .where(Item.cache_key.in_(set(keys.values())), Item.status == Status.DONE,
                       Item.image_key.is_not(None)).order_by(Item.id)).all()
        # Objects are checked outside any transaction: a HEAD request can take a while.
        sources: dict[str, Reuse] = {}
        present: dict[str, bool] = {}
        for key, item_id, reused_from, stored, sha256, watermark in found:
            if key not in sources:
                if stored not in present:
                    present[stored] = self.storage.exists(stored)
                if present[stored]:
                    sources[key] = Reuse(reused_from or item_id, stored, sha256, watermark)
        hits = {item_id: (key, sources[key]) for item_id, key in keys.items() if key in sources}
        if not hits:
            return set()
        with self.sessions.begin() as session:
            return record_reused(session, hits, worker_host=self.worker_name, device=model.device)

