"""The `sdq` command group. Commands are imported only when they run (or show their own help),
so `sdq --help` and the read-side commands start without loading what they do not use."""
from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Mapping
from typing import Any

import click

from sdq.cli.errors import CommandFailed, exit_code_of

COMMANDS: dict[str, tuple[str, str]] = {
    "cancel": ("sdq.cli.jobs_admin:cancel",
               "Cancel the pending and queued items of JOB_ID; batches already running finish."),
    "config": ("sdq.cli.config:config",
               "Show the effective settings (SDQ_* variables over the config file) and the mode."),
    "db": ("sdq.cli.db:db", "Create, upgrade and inspect the database schema."),
    "doctor": ("sdq.cli.config:doctor",
               "Check that the database, broker, storage and default model can be reached, and "
               "say what to fix when one cannot."),
    "export": ("sdq.cli.export:export",
               "Export the finished images of JOB, or those matching --query (or both: the job's "
               "matching ones), with their prompts and provenance, as dataset shards."),
    "gallery": ("sdq.cli.sheet:gallery",
                "Write a static HTML gallery (index.html, thumbnails and the full images, "
                "provenance included) that any browser opens without a server, with each image's "
                "prompt, seed and parameters."),
    "generate": ("sdq.cli.generate:generate",
                 "Generate images from PROMPT with a local model and write them as PNGs."),
    "get": ("sdq.cli.search:get",
            "Download images as ITEM.png, each with its record as ITEM.json, into a folder."),
    "jobs": ("sdq.cli.jobs:jobs", "List the newest jobs with their item counts."),
    "models": ("sdq.cli.models:models",
               "Name models once, then refer to them by name (or hash prefix) everywhere."),
    "purge": ("sdq.cli.purge:purge",
              "Delete JOB for good: its items, their records and their stored images."),
    "reconcile": ("sdq.cli.jobs_admin:reconcile",
                  "Re-enqueue work the broker lost, judged from the database."),
    "reproduce": ("sdq.cli.reproduce:reproduce",
                  "Regenerate ITEM from its recorded prompt, seed, sampler, steps, guidance, size "
                  "and model (by sha256), and compare the pixels with the stored image."),
    "resume": ("sdq.cli.watch:resume",
               "Finish JOB after its embedded run was interrupted (Ctrl-C, a crash), redoing "
               "nothing."),
    "retry": ("sdq.cli.jobs_admin:retry",
              "Re-enqueue the failed items of JOB_ID, each with a fresh set of attempts."),
    "schedule": ("sdq.cli.schedule:schedule",
                 "Submit a prompt file every day on a cron, as one job per day named "
                 "NAME-YYYY-MM-DD."),
    "scheduler": ("sdq.cli.schedule:scheduler",
                  "Run the schedules: Celery beat, reading the schedules from the database."),
    "search": ("sdq.cli.search:search", "Find items by prompt TEXT and filters, newest first."),
    "sheet": ("sdq.cli.sheet:sheet",
              "Write a contact sheet: the finished images of JOB (or matching --query) in a grid, "
              "each captioned with its id, seed, sampler, steps, guidance and prompt."),
    "show": ("sdq.cli.search:show",
             "Show everything recorded about one item: prompt, parameters, model, queue history "
             "and, once it is done, the software and device that made the image (read from the "
             "image)."),
    "status": ("sdq.cli.jobs:status",
               "Show a job's progress: items per status, images/s, time left, and why items "
               "failed."),
    "submit": ("sdq.cli.submit:submit",
               "Submit the prompts of FILE (CSV, JSON Lines or plain text), or one "
               "--prompt, as one job."),
    "verify": ("sdq.cli.verify:verify",
               "Check an image's provenance chunks, pixels and watermark, and its database "
               "record."),
    "watch": ("sdq.cli.watch:watch",
              "Show a live progress bar of JOB until none of its items is left to run."),
    "worker": ("sdq.cli.worker:worker",
               "Serve the queue of one model: generate its batches until stopped."),
    "workers": ("sdq.cli.worker:workers",
                "List live worker processes: host, GPU, model, current batch, last heartbeat, "
                "images done."),
}
"""Each command: where it lives ("module:attribute") and its one-line help for `sdq --help`
(a test keeps these equal to the commands' own docstrings)."""


class SdqGroup(click.Group):
    """The `sdq` group: loads a command's module when that command is asked for (`lazy`, like
    `COMMANDS`; commands added the usual way work too), and turns every error into one line
    and an exit status (see `sdq.cli.errors`). With `--debug`, an error no command expected
    shows its traceback instead."""

    def __init__(self, *args: Any, lazy: Mapping[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})
        self.params.append(click.Option(["--debug"], is_flag=True,
                                        help="Show the traceback of unexpected errors."))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.lazy, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy[cmd_name][0].partition(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, with the lazy commands' help from their entry: none imported."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = [(name, textwrap.shorten(self.lazy[name][1], limit, placeholder="...")
                 if name in self.lazy else self.commands[name].get_short_help_str(limit))
                for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Click's `main`, with the output flushed before the interpreter exits, so that a pipe
        that breaks on the last buffered line ends as one that breaks mid-command does (see
        `invoke`), not with the interpreter's status 120 and its message."""
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            _reader_gone()
            sys.exit(0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            _reader_gone()
            raise click.exceptions.Exit(0) from None
        except Exception as exc:
            if ctx.params.get("debug") and exit_code_of(exc) is None:
                raise
            raise CommandFailed.of(exc) from None


def _reader_gone() -> None:
    """The reader of standard output has gone (`sdq show 1 | head -1`): end quietly with status
    0, as Unix tools do. What is left to print has no reader, so it goes to /dev/null, where
    the interpreter's own flush at exit cannot fail on the same pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.group(cls=SdqGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sdq", prog_name="sdq")
def cli(debug: bool) -> None:
    """sdq: batch Stable Diffusion text-to-image generation with a record of every image.

    \b
    Submit a prompt file (runs here without a broker; `sdq resume JOB` after a crash):
      sdq submit examples/prompts.csv --model sd-v1-5.safetensors
    Generate one image locally:
      sdq generate "a photograph of an astronaut riding a horse" --model sd-v1-5.safetensors -o out.png
    """
