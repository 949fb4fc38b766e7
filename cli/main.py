"""The `sdq` command group; each command lives in the module named for its group."""
from __future__ import annotations

from typing import Any

import click


class SdqGroup(click.Group):
    """A group with `--debug`: without it, an exception no command expected is one readable
    line (`Error: ...`, exit status 1); with it, the traceback. Commands turn the failures
    they expect into `click.ClickException` themselves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--debug"], is_flag=True,
                                        help="Show the traceback of unexpected errors."))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            lines = str(exc).strip().splitlines()
            raise click.ClickException(
                f"{lines[0] if lines else type(exc).__name__} (unexpected "
                f"{type(exc).__name__}; `sdq --debug ...` shows the traceback)") from None


@click.group(cls=SdqGroup,
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


# Commands, one module per group; imported after the group so each module stays a leaf.
from sdq.cli.config import config, doctor  # noqa: E402
from sdq.cli.db import db  # noqa: E402
from sdq.cli.export import export  # noqa: E402
from sdq.cli.generate import generate  # noqa: E402
from sdq.cli.jobs import jobs, status  # noqa: E402
from sdq.cli.jobs_admin import cancel, reconcile, retry  # noqa: E402
from sdq.cli.models import models  # noqa: E402
from sdq.cli.purge import purge  # noqa: E402
from sdq.cli.reproduce import reproduce  # noqa: E402
from sdq.cli.schedule import schedule, scheduler  # noqa: E402
from sdq.cli.search import get, search, show  # noqa: E402
from sdq.cli.sheet import gallery, sheet  # noqa: E402
from sdq.cli.submit import submit  # noqa: E402
from sdq.cli.verify import verify  # noqa: E402
from sdq.cli.watch import resume, watch  # noqa: E402
from sdq.cli.worker import worker, workers  # noqa: E402

COMMANDS = (
    submit, watch, resume,
    generate, jobs, status, search, show, get, verify, reproduce, export, sheet, gallery,
    retry, cancel, reconcile, purge, worker, workers, models, config, doctor, db,
    schedule, scheduler,
)
for _command in COMMANDS:
    cli.add_command(_command)
