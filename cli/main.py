"""The `sdq` command group; each command lives in the module named for its group."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sdq", prog_name="sdq")
def cli() -> None:
    """sdq: batch Stable Diffusion text-to-image generation with a record of every image.

    \b
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
from sdq.cli.search import get, search, show  # noqa: E402
from sdq.cli.sheet import gallery, sheet  # noqa: E402
from sdq.cli.verify import verify  # noqa: E402
from sdq.cli.worker import worker, workers  # noqa: E402

COMMANDS = (
    generate, jobs, status, search, show, get, verify, reproduce, export, sheet, gallery,
    retry, cancel, reconcile, purge, worker, workers, models, config, doctor, db,
)
for _command in COMMANDS:
    cli.add_command(_command)
