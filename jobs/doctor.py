"""`sdq doctor`'s checks: can the settings work? Each service the settings name (database,
broker, image store, default model) is tried the way sdq uses it, and a finding says whether it
works and, if not, what to fix. Clients are imported inside each check, so the others do not
pay for them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdq.core.settings import Settings, mask_url


@dataclass(frozen=True)
class Finding:
    """One check of `sdq doctor`: what was checked, whether it works, and what to do if not."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _check_database(settings: Settings) -> Finding:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from sdq.db.session import current_revision, engine_from_url, head_revision

    url = make_url(settings.database_url)
    shown = mask_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and \
            not Path(url.database).expanduser().exists():
        return Finding("database", True, f"{shown} (created on first use)")
    try:
        engine = engine_from_url(url)
        try:
            current, head = current_revision(engine), head_revision()
        finally:
            engine.dispose()
    except (SQLAlchemyError, ValueError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Finding("database", False, f"{shown}: {detail}",
                       "check SDQ_DATABASE_URL and that the server is up")
    if current == head:
        return Finding("database", True, f"{shown} at schema {head}")
    if url.get_backend_name() == "sqlite":
        return Finding("database", True, f"{shown} at schema {current}, upgraded on first use")
    return Finding("database", False, f"{shown} at schema {current or 'none'}, sdq needs {head}",
                   "run `sdq db upgrade`")


def _check_broker(settings: Settings) -> Finding:
    if settings.broker_url is None:
        return Finding("broker", True, "none: embedded mode, `sdq submit` runs jobs in-process")
    from kombu import Connection

    shown = mask_url(settings.broker_url)
    try:
        with Connection(settings.broker_url, connect_timeout=3,
                        transport_options={"socket_timeout": 3}) as connection:
            connection.ensure_connection(max_retries=0, timeout=3)
    except Exception as exc:  # kombu raises the transport's own errors, of any type
        return Finding("broker", False, f"{shown}: {str(exc).splitlines()[0]}",
                       "start the broker (Redis) or fix SDQ_BROKER_URL")
    return Finding("broker", True, f"{shown} reachable")


def _check_storage(settings: Settings) -> Finding:
    from sdq.images.storage import StorageError, open_storage

    try:
        open_storage(settings.storage_url, max_attempts=1).check()
    except StorageError as exc:
        return Finding("storage", False, str(exc),
                       "fix SDQ_STORAGE_URL (s3://bucket/prefix or a folder) or the AWS settings")
    return Finding("storage", True, f"{settings.storage_url} writable")


def _check_model(settings: Settings) -> Finding:
    from sdq.sdmodel.modelfiles import ModelNotFound, resolve_model_ref

    try:
        path = resolve_model_ref(settings.model)
    except ModelNotFound as exc:
        return Finding("model", False, str(exc).split(". ")[0],
                       "set SDQ_MODEL to a local .safetensors file or diffusers folder, or "
                       "download the repo into the Hugging Face cache while online")
    where = "" if Path(settings.model).expanduser() == path else f" at {path}"
    return Finding("model", True, f"{settings.model}{where}")


CHECKS: tuple[Callable[[Settings], Finding], ...] = (
    _check_database, _check_broker, _check_storage, _check_model)


def diagnose(settings: Settings) -> list[Finding]:
    """Every check of `sdq doctor`, in order; each says what works and what to fix."""
    return [check(settings) for check in CHECKS]
