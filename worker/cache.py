"""The result cache: an item whose cache key (`params.cache_key`) a done item has, with its
object still stored, is finished at once as reusing that object (`reused_from`), with no model
call. It runs before the model is loaded, so a message whose images are all stored already
costs no model load; jobs submitted with `--no-reuse` look nothing up.

The key covers the init image of an image-to-image item (file hash, source name and strength),
so such an item reuses only an image made from the same init at the same strength, never a
text-to-image one. The key covers the safety check too (the checker's hash and the job's `on_flag`), so a reused
item carries a verdict made by its own job's checker, copied with the image. A lookup never
holds a transaction across a network call: it reads, hashes checkers and asks storage whether
the objects are there outside any, and the write re-checks, under lock, that the row it copies
is still there (`transitions.record_reused`), so a purge in between costs a generation, never
an image."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.batch import Batch
from sdq.core.init_image import InitImage
from sdq.core.params import GenerationParams, cache_key
from sdq.core.states import FINISHED
from sdq.db.models import Item, Job, Model, Status
from sdq.db.transitions import SAFETY_COLUMNS, Reuse, record_reused
from sdq.images.storage import Storage
from sdq.sdmodel.devices import default_dtype
from sdq.sdmodel.modelfiles import CheckpointError, ModelNotFound, model_sha256, resolve_model_ref
from sdq.sdmodel.pipeline import default_device
from sdq.sdmodel.produce import Denoiser
from sdq.worker.claims import KeyOf, Work

REUSE_CHUNK = 500
"""Items looked up in the result cache at once: one read, one lookup and one write each."""


@dataclass(frozen=True)
class Identity:
    """The model as the cache key sees it, known before it is loaded."""

    sha256: str
    device: str
    dtype: str
    vae_dtype: str

    @classmethod
    def of(cls, pipe: Denoiser) -> Identity:
        return cls(pipe.sha256, pipe.device, pipe.dtype, pipe.vae_dtype)


def identify(pipe: Denoiser | None, model_ref: str, *, device: str | None, dtype: str | None,
             vae_dtype: str | None = None, hash_cache: Any) -> Identity | None:
    """What the cache key needs of the model, without loading it: its sha256 (hashes are
    cached), and the device and dtypes it is (or will be) loaded with, as `load_pipeline`
    chooses them. None when the model cannot be found (loading it then fails the items with
    the reason)."""
    if pipe is not None:
        return Identity.of(pipe)
    try:
        sha256 = model_sha256(resolve_model_ref(model_ref), hash_cache)
    except (CheckpointError, ModelNotFound, ValueError, OSError):
        return None
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    return Identity(sha256, device, dtype, vae_dtype or dtype)


@dataclass(frozen=True)
class Check:
    """The safety check a job asks for, as the cache key sees it: the checker's sha256 (None:
    no check) and what becomes of a flagged image."""

    checker_sha256: str | None = None
    on_flag: str = "keep"


UNCHECKED = Check()
JobCheck = tuple[str | None, str]
"""A job's safety checker as it names it (None: no check) and its `on_flag`."""


def checker_hashes(refs: Iterable[str], hash_cache: Any) -> dict[str, str]:
    """The sha256 of each safety checker named (a folder or a hub id), as its loading records
    it; one that cannot be found is left out (its items fail when their checker loads). Read
    from the files, or the hash cache: outside any transaction."""
    from sdq.sdmodel.safety import find_safety_checker

    hashes = {}
    for ref in set(refs):
        with contextlib.suppress(CheckpointError, ModelNotFound, ValueError, OSError):
            hashes[ref] = model_sha256(find_safety_checker(ref), hash_cache)
    return hashes


class ResultCache:
    """Looks items up by cache key and finishes those whose image is stored already."""

    def __init__(self, reads: sessionmaker[Session], sessions: sessionmaker[Session],
                 storage: Storage, *, watermark: str | None, worker_name: str,
                 hash_cache: Any = None) -> None:
        self.reads, self.sessions, self.storage = reads, sessions, storage
        self.watermark, self.worker_name, self.hash_cache = watermark, worker_name, hash_cache
        self._checker_sha256: dict[str, str] = {}
        """Checkers hashed so far, by reference: hashed once per runner, as the runner loads
        each once (a checker replaced on disk meanwhile is not the one scoring its images).
        One not found is not kept, so it is looked for again."""

    def key(self, params: GenerationParams, model: Identity, check: Check = UNCHECKED, *,
            loras: Any = (), embeddings: Any = (), init: InitImage | None = None) -> str:
        """The item's cache key: its parameters, LoRA and embedding records (by file hash),
        its init image and strength, this model, watermark, device and dtypes, and its job's
        check."""
        return cache_key(params, model_sha256=model.sha256, watermark=self.watermark,
                         device=model.device, dtype=model.dtype, vae_dtype=model.vae_dtype,
                         safety_checker_sha256=check.checker_sha256, on_flag=check.on_flag,
                         loras=loras or (), embeddings=embeddings or (), init=init)

    def checks(self, jobs: Iterable[JobCheck]) -> dict[JobCheck, Check | None]:
        """Each job's (checker reference, on_flag) as a `Check`; None for a checker that cannot
        be found (no key: nothing is reused for it, and its items fail when it loads)."""
        pairs = set(jobs)
        hashes = self._checker_sha256
        hashes.update(checker_hashes((ref for ref, _ in pairs if ref and ref not in hashes),
                                     self.hash_cache))
        return {(ref, on_flag): UNCHECKED if not ref else
                Check(hashes[ref], on_flag) if ref in hashes else None for ref, on_flag in pairs}

    def key_of(self, ids: Sequence[int], model: Identity) -> KeyOf:
        """The cache key of each of these items as a claim records it, from what the claim reads
        in its transaction (parameters, LoRAs, embeddings, init image, the job's checker and
        on_flag); the
        checkers are hashed here, before it (None: a checker that cannot be found, whose items
        then fail)."""
        with self.reads() as session:
            jobs = session.execute(select(Job.safety_checker, Job.on_flag).distinct()
                                   .join(Item, Item.job_id == Job.id).where(Item.id.in_(ids))).all()
        checks = self.checks((ref, on_flag) for ref, on_flag in jobs)

        def key(work: Work) -> str | None:
            check = checks.get((work.safety_checker, work.on_flag))
            return None if check is None else self.key(work.params, model, check,
                                                       loras=work.loras, embeddings=work.embeddings,
                                                       init=work.init)
        return key

    def reuse(self, batches: Sequence[Batch], model: Identity) -> set[int]:
        """Finish, as reusing the stored image, every item of the batches whose image is
        stored already (a done item with its cache key, whose object is still there); their
        ids. A chunk of items at a time, so that a job that is all cached costs a few queries
        per thousand items."""
        ids = [item_id for batch in batches for item_id in batch.item_ids]
        reused: set[int] = set()
        for start in range(0, len(ids), REUSE_CHUNK):
            reused |= self._reuse_chunk(ids[start:start + REUSE_CHUNK], model)
        return reused

    def _reuse_chunk(self, ids: Sequence[int], model: Identity) -> set[int]:
        with self.reads() as session:
            items = session.execute(
                select(Item, Job.safety_checker, Job.on_flag)
                .join(Job, Item.job_id == Job.id).join(Model, Item.model_id == Model.id)
                .where(Item.id.in_(ids), Item.status.not_in(sorted(FINISHED)), Job.reuse,
                       Model.sha256 == model.sha256)).all()
            params: dict[int, tuple[GenerationParams, JobCheck, Any, Any, InitImage | None]] = {}
            for item, checker, on_flag in items:
                with contextlib.suppress(ValueError):  # failed when a worker takes it
                    params[item.id] = (item.params, (checker, on_flag), item.loras or (),
                                       item.embeddings or (), InitImage.of(item))
        checks = self.checks(job for _, job, _, _, _ in params.values())
        keys: dict[int, str] = {}
        wanted: dict[str, str | None] = {}
        for item_id, (request, job, loras, embeddings, init) in params.items():
            if (check := checks[job]) is not None:
                keys[item_id] = self.key(request, model, check, loras=loras, embeddings=embeddings,
                                         init=init)
                wanted[keys[item_id]] = check.checker_sha256
        if not keys:
            return set()
        with self.reads() as session:
            found = session.execute(
                select(Item.cache_key, Item.id, Item.reused_from, Item.image_key,
                       Item.image_sha256, Item.watermark,
                       *(getattr(Item, column) for column in SAFETY_COLUMNS))
                .where(Item.cache_key.in_(set(keys.values())), Item.status == Status.DONE,
                       Item.image_key.is_not(None)).order_by(Item.id)).all()
        sources = self._stored_sources(found, wanted)
        hits = {item_id: (key, sources[key]) for item_id, key in keys.items() if key in sources}
        if not hits:
            return set()
        with self.sessions.begin() as session:
            return record_reused(session, hits, worker_host=self.worker_name, device=model.device)

    def _stored_sources(self, found: Sequence[Any], wanted: dict[str, str | None]) -> dict[str, Reuse]:
        """For each key, the first done row whose object is still stored and whose verdict
        was made by the checker the key asks for (keys made before the check entered them
        name checked and unchecked images alike). Objects are checked outside any
        transaction: a HEAD request can take a while."""
        sources: dict[str, Reuse] = {}
        present: dict[str, bool] = {}
        for row in found:
            key, item_id, reused_from, stored, sha256, watermark, *verdict = row
            safety = dict(zip(SAFETY_COLUMNS, verdict))
            if key in sources or safety["safety_checker_sha256"] != wanted[key]:
                continue
            if stored not in present:
                present[stored] = self.storage.exists(stored)
            if present[stored]:
                sources[key] = Reuse(reused_from or item_id, item_id, stored, sha256, watermark,
                                     safety)
        return sources
