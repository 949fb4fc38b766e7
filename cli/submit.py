"""`sdq submit`: a prompt file in, a job out; run here (embedded) or enqueued for workers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from sdq.cli.common import (
    Terminated,
    configured_storage,
    database_session,
    exit_status,
    follow,
    load_settings,
    outcome,
    output_options,
    recorded_bar,
    render_table,
    terminate_as_interrupt,
)
from sdq.cli.errors import BAD_INPUT, CommandFailed, Reported
from sdq.cli.options import (
    NAME,
    TAG,
    YES,
    adapter_options,
    adapter_settings,
    as_option_errors,
    check_on_flag,
    expansion_of,
    generation_options,
    safety_options,
    template_options,
)
from sdq.core.init_image import DEFAULT_STRENGTH
from sdq.core.jobspec import DEFAULT_BATCH_SIZE, PRIORITIES, Defaults, JobSpec, default_batch_size
from sdq.core.params import MAX_IMAGES_PER_ROW
from sdq.jobs.adapters import AdapterFinder
from sdq.jobs.inits import InitDirError, InitReader, InitSource, item_images, read_init_dir
from sdq.jobs.promptfile import (
    PromptFile,
    PromptFileError,
    model_resolver,
    parse_prompt_file,
    recorded_name,
)
from sdq.jobs.templates import Expansion

SAMPLE = 5
"""Expanded prompts `--dry-run` shows."""

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sdq.db.models import Job
    from sdq.jobs.submit import ModelIdentity


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                required=False)
@click.option("--prompt", "-p", "prompt", metavar="TEMPLATE",
              help="One prompt (or template) instead of a FILE.")
@click.option("--model", "-m", "model_ref", metavar="REF",
              help="Model of rows without a `model`: checkpoint, diffusers folder or Hugging "
                   "Face repo id [default: $SDQ_MODEL, else SD v1.5 from the HF cache].")
@generation_options("Base seed: image i of the job without a seed of its own gets seed+i "
                    "[default: random, recorded with the job].", scope=" For rows without one.")
@click.option("-n", "--num-images", type=click.IntRange(1, MAX_IMAGES_PER_ROW),
              default=1, show_default=True, help="Images per row without an `n`.")
@click.option("--init-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image-to-image over a folder: every row once per image file in DIR "
                   "(sorted by name; other files are skipped and counted).")
@click.option("--strength", type=float, metavar="F",
              help="Denoising strength of rows with an init image and none of their own, in "
                   f"(0, 1] [default: {DEFAULT_STRENGTH}].")
@click.option("--batch-size", type=click.IntRange(1),
              help=f"Images per batch [default: $SDQ_BATCH_SIZE, else {DEFAULT_BATCH_SIZE}].")
@click.option("--name", type=NAME, help="Job name [default: the file name].")
@click.option("--priority", type=click.IntRange(PRIORITIES.start, PRIORITIES.stop - 1), default=0,
              show_default=True, help="0-9: idle workers take the highest-priority job's batches first.")
@click.option("--tag", "tags", multiple=True, type=TAG, help="A tag for the job; repeatable.")
@adapter_options
@safety_options()
@template_options
@click.option("--no-reuse", is_flag=True,
              help="Generate every image, even those stored already with the same parameters, "
                   "model and device (the result cache).")
@click.option("--dry-run", is_flag=True,
              help="Check the file and print the plan; record and run nothing.")
@YES
@click.option("--wait", is_flag=True,
              help="With a broker: follow the job's progress until it is done.")
@output_options("json")
def submit(file: Path | None, prompt: str | None, model_ref: str | None, negative_prompt: str,
           seed: int | None, sampler: str, steps: int, cfg: float, eta: float, width: int,
           height: int, prompt_syntax: str, clip_skip: int, num_images: int,
           init_dir: Path | None, strength: float | None, batch_size: int | None,
           name: str | None, priority: int, tags: tuple[str, ...],
           loras: tuple[str, ...], lora_dirs: tuple[Path, ...], embeddings_dir: Path | None,
           safety_checker: str | None, on_flag: str,
           grid: tuple[str, ...], wildcards: Path | None, expand: str, draws: int,
           expand_seed: int | None, no_reuse: bool, dry_run: bool, yes: bool, wait: bool,
           output: str | None) -> None:
    """Submit the prompts of FILE (CSV, JSON Lines or plain text), or one --prompt, as one job.

    The whole file is checked first; every problem is listed as FILE:LINE: field: reason,
    with exit status 2, and nothing is recorded. The options fill what rows leave out.
    Prompts are templates: {red|green|blue} variants, {2::red|blue} weights, __name__
    wildcard files, nested; --grid makes each prompt with several parameter values. Every
    LoRA named (<lora:NAME:WEIGHT> in a prompt, --lora) must be a file in --lora-dir, and is
    recorded with its sha256, as is each embedding a prompt names. Rows with an init_image
    (a path relative to FILE, s3://BUCKET/KEY in the configured storage, or item:ID), or
    every row once per image of --init-dir, are image-to-image: each distinct init image is
    checked, stored once under its sha256 and recorded with the items. More
    than SDQ_CONFIRM_ITEMS images (default 10,000) need --yes; more than SDQ_MAX_JOB_ITEMS
    (default 1,000,000) are refused, --yes or not. An image stored already with
    the same parameters, model and device is reused, not generated again (--no-reuse
    generates it). With no broker (SDQ_BROKER_URL unset) the job runs here with a progress
    bar; with one it is enqueued for `sdq worker`s and the job id printed (`--wait` follows
    it). Exit status 1 if any image failed.

    \b
    Examples:
      sdq submit prompts.csv --model v1-5-pruned-emaonly.safetensors --steps 25 -n 4
      sdq submit prompts.txt --seed 42 --dry-run
      sdq submit -p "a {red|green} __animal__ at dusk" --wildcards wc/ --grid cfg=5,7.5
      sdq submit nightly.jsonl --tag nightly --json --wait
      sdq submit civitai.csv --lora-dir ~/loras --embeddings-dir ~/embeddings --clip-skip 2
      sdq submit -p "a watercolour painting" --init-dir photos/ --grid strength=0.3,0.6
    """
    from sdq.jobs.submit import (
        check_size,
        identify_model,
        job_safety_checker,
        new_job,
        plan,
        stored_count,
    )

    if (file is None) == (prompt is None):
        raise click.UsageError("give a FILE or --prompt TEMPLATE (one of them)")
    as_json = output == "json"
    given = click.get_current_context().get_parameter_source
    # A side left to its default is not given: an img2img row then takes its init image's.
    width_given = None if given("width") is ParameterSource.DEFAULT else width
    height_given = None if given("height") is ParameterSource.DEFAULT else height
    with as_option_errors():
        spec = JobSpec(
            name=name, model=model_ref, batch_size=batch_size, priority=priority, tags=tags,
            safety_checker=safety_checker, on_flag=on_flag, reuse=not no_reuse, loras=loras,
            lora_dirs=tuple(str(p.resolve()) for p in lora_dirs),
            embeddings_dir=str(embeddings_dir.resolve()) if embeddings_dir else None,
            defaults={"negative_prompt": negative_prompt, "seed": seed, "n": num_images,
                      "steps": steps, "cfg": cfg, "eta": eta, "sampler": sampler,
                      "width": width_given, "height": height_given,
                      "prompt_syntax": prompt_syntax, "clip_skip": clip_skip,
                      "strength": strength})
    settings = adapter_settings(load_settings(need_broker=False), lora_dirs, embeddings_dir)
    starts = _init_dir(init_dir, as_json) if init_dir is not None else []
    expansion = expansion_of(grid, wildcards or settings.wildcards, expand, draws,
                             expand_seed).drawn()
    source = recorded_name(file) if file is not None else "--prompt"
    # Reads only, beside slow work (init images, adapter and model files hashed): no SQLite
    # write lock held over it.
    with database_session(settings, reads_only=True) as session:
        inits = InitReader(file.parent if file is not None else Path.cwd(),
                           storage=lambda: configured_storage(settings),
                           item_image=item_images(session))
        parsed = _parse(file, prompt, spec.row_defaults(), expansion, session, settings.max_job_items,
                        AdapterFinder(settings.lora_dir, settings.embeddings_dir, spec.loras),
                        inits, starts)
    for warning in parsed.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if not dry_run:
        check_size(len(parsed.items), settings.confirm_items, confirmed=yes)
    ref = spec.model or settings.model
    model = None
    if spec.model is not None or parsed.needs_default_model:
        with database_session(settings, reads_only=True) as session:
            try:
                model = identify_model(ref, settings.home / "hashes.json", session)
            except (ValueError, LookupError, OSError) as exc:
                raise CommandFailed.of(exc, "--model", code=BAD_INPUT) from None
    try:
        checker = job_safety_checker(spec.safety_checker, settings.safety_checker)
    except ValueError as exc:
        raise CommandFailed.of(exc, "--safety-checker", code=BAD_INPUT) from None
    check_on_flag(spec.on_flag, checker)
    size = default_batch_size(spec.batch_size, settings.batch_size)
    if dry_run:
        with database_session(settings) as session:
            groups = plan(session, parsed.items, model, size)
            stored = stored_count(session, parsed.items, model, settings) if spec.reuse else 0
        _print_plan(source, parsed, size, groups, stored, [n for n, _ in expansion.grid], as_json)
        return
    name = spec.name or (recorded_name(file.name) if file is not None else str(prompt)[:200])
    job = new_job(spec, parsed, name=name, safety_checker=checker,
                  defaults={**spec.row_defaults().to_json(), "base_seed": parsed.base_seed,
                            "model": model.recorded_ref(ref) if model else None,
                            "batch_size": size, "expansion": expansion.to_json(),
                            **_adapter_defaults(spec, settings)})
    result, status = _submit(settings, parsed, model, job, size, as_json)
    if wait and result["queues"]:
        record, text, status = outcome(result["job_id"], follow(settings, result["job_id"],
                                                                queues=result["queues"]))
        result["counts"] = record["counts"]
        if not as_json:
            click.echo(text)
    if as_json:
        click.echo(json.dumps(result))
    exit_status(result["job_id"], status)


def _adapter_defaults(spec: JobSpec, settings: Any) -> dict[str, Any]:
    """What a job records of where its LoRAs and embeddings came from (none: nothing)."""
    values = {"loras": list(spec.loras), "lora_dirs": [str(p) for p in settings.lora_dir],
              "embeddings_dir": str(settings.embeddings_dir) if settings.embeddings_dir else None}
    return {k: v for k, v in values.items() if v}


def _init_dir(folder: Path, as_json: bool) -> list[InitSource]:
    """The images of --init-dir, read and checked, or each problem on stderr and exit 2."""
    try:
        found = read_init_dir(folder, recorded_name(folder))
    except InitDirError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        click.echo(f"{recorded_name(folder)}: {len(exc.problems)} problem(s); nothing was "
                   "submitted", err=True)
        raise Reported(exc) from None
    if found.skipped and not as_json:
        click.echo(f"{recorded_name(folder)}: {len(found.images)} image(s); "
                   f"{found.skipped} other file(s) skipped", err=True)
    return found.images


def _parse(file: Path | None, prompt: str | None, defaults: Defaults, expansion: Expansion,
           session: Session, max_items: int, adapters: AdapterFinder, inits: InitReader,
           starts: list[InitSource]) -> PromptFile:
    """The accepted file (or --prompt, as a one-row file), or every problem on stderr and
    exit status 2."""
    source = recorded_name(file) if file is not None else "--prompt"
    try:
        if file is not None:
            data, fmt = file.read_bytes(), None
        else:
            data, fmt = json.dumps({"prompt": prompt}).encode(), "jsonl"
        return parse_prompt_file(data, source, defaults, format=fmt, resolve_model=model_resolver(session),
                                 expansion=expansion, max_items=max_items, adapters=adapters,
                                 inits=inits, starts=starts)
    except PromptFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{source}: {len(exc.problems)} problem(s); nothing was submitted", err=True)
        raise Reported(exc) from None
    except OSError as exc:
        raise CommandFailed(f"cannot read {file}: {exc.strerror or exc}", BAD_INPUT) from None


def _submit(settings: Any, parsed: PromptFile, model: ModelIdentity | None, job: Job, size: int,
            as_json: bool) -> tuple[dict[str, Any], int]:
    """Record and run (embedded, with a progress bar) or enqueue; the outcome and exit status."""
    from sdq.jobs.submit import submit as submit_items
    from sdq.worker.factory import runner_from_settings

    submitted: list[int] = []
    with recorded_bar("generating") as start, terminate_as_interrupt():
        def on_submitted(job_id: int, items: int, batches: int) -> None:
            submitted.append(job_id)
            if settings.embedded:
                click.echo(f"Job {job_id}: {items} image(s) in {batches} batch(es), "
                           "running here", err=True)
                on_recorded.append(start(items, 0))

        on_recorded: list[Any] = []
        try:
            result = submit_items(settings, parsed.items, model=model, job=job,
                                  batch_size=size, on_submitted=on_submitted,
                                  on_recorded=lambda n: on_recorded[0](n), on_step=start.step,
                                  make_runner=runner_from_settings, inits=parsed.inits)
        except KeyboardInterrupt as exc:
            if not submitted:
                raise
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            raise click.ClickException(f"{what}; `sdq resume {submitted[0]}` finishes "
                                       "the job without redoing what is done") from None
    record: dict[str, Any] = {"job_id": result.job_id, "items": result.items,
                              "batches": result.batches, "queues": list(result.queues),
                              "base_seed": parsed.base_seed}
    if result.report is None:
        if not as_json:
            click.echo(f"Job {result.job_id}: {result.items} image(s) in {result.batches} "
                       f"batch(es) enqueued on {', '.join(result.queues)}")
        return record, 0
    report = result.report
    record |= {"done": report.done, "failed": report.failed, "reused": report.reused}
    if not as_json:
        text = f"Job {result.job_id}: {report.done}/{result.items} done"
        if report.reused:
            text += f" ({report.reused} reused from stored images, no model call)"
        if report.failed:
            text += f", {report.failed} failed (`sdq status {result.job_id}` says why)"
        click.echo(text)
    return record, 1 if report.failed else 0


def _print_plan(source: str, parsed: PromptFile, size: int, plan: list[dict[str, Any]],
                stored: int, grid: list[str], as_json: bool) -> None:
    estimates = [group["estimated_s"] for group in plan]
    total = None if None in estimates else sum(estimates)
    sample = [item["prompt"] + (f"  init={item['init_source']}" if item.get("init_source") else "")
              + "".join(f"  {name}={item[name]}" for name in grid)
              for item in parsed.items[:SAMPLE]]
    if as_json:
        click.echo(json.dumps({"file": source, "format": parsed.format, "rows": parsed.rows,
                               "items": len(parsed.items), "batch_size": size,
                               "batches": sum(g["batches"] for g in plan),
                               "base_seed": parsed.base_seed, "groups": plan,
                               "estimated_s": total, "already_generated": stored,
                               "init_images": [{"sha256": i.sha256, "source": i.source,
                                                "width": i.width, "height": i.height}
                                               for i in parsed.inits],
                               "sample": sample}))
        return
    click.echo(f"{source}: {parsed.rows} row(s), {len(parsed.items):,} image(s), "
               f"{sum(g['batches'] for g in plan)} batch(es) of up to {size}, "
               f"base seed {parsed.base_seed}")
    if parsed.inits:
        click.echo(f"{len(parsed.inits):,} distinct init image(s), stored by sha256 when "
                   "submitted")
    if len(parsed.items) > parsed.rows or parsed.inits:
        click.echo(f"first {len(sample)} of {len(parsed.items):,} expanded prompt(s):")
        for text in sample:
            click.echo(f"  {text}")
    click.echo(f"{stored:,} of {len(parsed.items):,} already generated (reused, not generated "
               "again; an estimate for this machine's device)")
    strengths = ["strength"] if any(group["strength"] is not None for group in plan) else []
    click.echo(render_table(plan, ["model", "sampler", "steps", "size", *strengths, "images",
                                   "batches"]))
    if total is None:
        click.echo("estimated time: unknown (no finished images of the same model, sampler and "
                   "size to measure from)")
    else:
        click.echo(f"estimated time: about {total:.0f}s (from the seconds per step of finished "
                   "images of the same model, sampler and size)")
    click.echo("nothing recorded (--dry-run)")
