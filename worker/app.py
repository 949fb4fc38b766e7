"""The worker process's Celery app; the task lives in `tasks`, the work in `runner`.

`celery -A sdq.worker.app worker` finds `app` here, built from the settings of the process
(`SDQ_BROKER_URL`, `SDQ_VISIBILITY_TIMEOUT`) the first time it is asked for, never at import.
Its configuration, and the names publishers share with it, are `jobs.broker`'s.
"""
from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any, MutableMapping

from sdq.core.settings import Settings, mask_url, quote_userinfo
from sdq.jobs.broker import create_app

if TYPE_CHECKING:
    from celery import Celery

def celery_cli_settings(environ: MutableMapping[str, str]) -> Settings:
    """The settings of a `celery -A sdq.worker.app ...` process.

    Celery's `-b URL` arrives as CELERY_BROKER_URL, which Celery prefers to the app's broker,
    while sdq's tasks and heartbeats read SDQ_BROKER_URL: two URLs would split a worker between
    two brokers. A URL given to celery alone becomes SDQ_BROKER_URL for this process and its
    pool processes; two different URLs are refused in one line."""
    settings = Settings.load(environ)
    given = environ.get("CELERY_BROKER_URL")
    if not given or quote_userinfo(given) == settings.broker_url:
        return settings
    if settings.broker_url is not None:
        raise SystemExit(
            f"sdq: the broker given to celery (-b or CELERY_BROKER_URL: {mask_url(given)}) is "
            f"not SDQ_BROKER_URL ({mask_url(settings.broker_url)}); give one of them, or the "
            f"same URL to both")
    environ["SDQ_BROKER_URL"] = given
    return Settings.load(environ)


@cache
def _process_app() -> Celery:
    return create_app(celery_cli_settings(os.environ))


def __getattr__(name: str) -> Any:
    """`app`: the process's app, built on first use (module attributes are looked up here
    only when not found, so every other name costs nothing)."""
    if name == "app":
        return _process_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
