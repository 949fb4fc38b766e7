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


from sdq.cli.verify import verify  # noqa: E402

cli.add_command(verify)

from sdq.cli.db import db  # noqa: E402

cli.add_command(db)

from sdq.cli.generate import generate  # noqa: E402

cli.add_command(generate)
