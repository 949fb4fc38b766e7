"""The `sdq scheduler` process: Celery beat with sdq's schedules, read from the database.

Apart from `jobs.schedule` (what a schedule is, when it runs) so that the commands that add
and list schedules never load Celery's beat machinery.
"""
from __future__ import annotations

import logging
from typing import Any

from celery.beat import Scheduler
from sqlalchemy.exc import SQLAlchemyError

from sdq.core.settings import Settings
from sdq.jobs.schedule import Clock, Run, run_due, seconds_to_next_run, utc_clock
from sdq.worker.factory import runner_from_settings

log = logging.getLogger(__name__)


class DatabaseScheduler(Scheduler):
    """Celery beat's scheduler with the schedules in sdq's database instead of a shelve file.

    Each tick re-reads the enabled schedules (so `sdq schedule add` needs no restart), starts
    the runs that are due through `run_schedule`, which records and enqueues them (or runs
    them here with no broker), and sleeps until the next run or `max_interval`, whichever is
    sooner. `clock` gives the time: tests drive it instead of waiting.
    """

    max_interval = 60

    def __init__(self, app: Any, *, settings: Settings, clock: Clock = utc_clock,
                 **kwargs: Any) -> None:
        self.settings = settings
        self.clock = clock
        self.last_runs: list[Run] = []
        super().__init__(app, **kwargs)

    def setup_schedule(self) -> None:
        """Nothing to load up front: every tick reads the database."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            self.last_runs = run_due(self.settings, self.clock(), runner_from_settings)
            wait = seconds_to_next_run(self.settings, self.clock())
        except SQLAlchemyError as exc:
            # The database restarting is no reason to stop: look again at the next tick.
            log.error("scheduler: the database is unavailable: %s", exc)
            self.last_runs, wait = [], None
        return max(1.0, min(float(self.max_interval), wait if wait is not None else float("inf")))
