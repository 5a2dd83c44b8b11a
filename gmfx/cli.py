"""The ``gmfx`` command line: a thin typer app over the library API.

Every stage command takes the same dataset options (input, participants, tasks, output, storage
options, cluster, resume/overwrite) and calls the stage function of the same name.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from gmfx._errors import GmfxError
from gmfx.storage import Location, default_output, parse_storage_options, redact

app = typer.Typer(
    name="gmfx",
    help=(
        "Turn videos of faces into clean 4D data (vertices x time) stored as chunked Zarr.\n\n"
        "Examples:\n\n"
        "  gmfx example ./demo && gmfx run ./demo\n\n"
        "  gmfx decode /data/study --participant-label 01 --task mini\n\n"
        "  gmfx recon s3://lab/study --storage-option anon=false --scheduler tcp://10.0.0.5:8786 --device cuda"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# -- options shared by every stage ------------------------------------------------------------------
InputArg = Annotated[str, typer.Argument(metavar="INPUT", help="BIDS-like dataset folder or URL (s3://bucket/study).", show_default=False)]
ParticipantOpt = Annotated[
    list[str] | None,
    typer.Option("--participant-label", "-p", metavar="LABEL", help="Participant(s) to process: 01 or sub-01; repeatable."),
]
TaskOpt = Annotated[list[str] | None, typer.Option("--task", "-t", metavar="TASK", help="Task(s) to process; repeatable.")]
OutOpt = Annotated[
    str | None,
    typer.Option("--out", "-o", metavar="URL", help="Output folder or URL [default: <input>/derivatives/gmfx].", envvar="GMFX_OUT"),
]
StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-s",
        metavar="KEY=VALUE",
        help="fsspec option KEY=VALUE for s3:// etc. (dotted keys nest: client_kwargs.endpoint_url=...); "
        "repeatable. Credentials also come from the usual AWS environment variables and config files.",
        envvar="GMFX_STORAGE_OPTION",
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", metavar="ADDRESS", help="Address of a running Dask scheduler [default: a local cluster].", envvar="GMFX_SCHEDULER"),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-w", min=1, metavar="N", help="Worker processes of the local cluster [default: one per core].", envvar="GMFX_WORKERS"),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite/--resume", help="Redo finished work, or resume (the default): only missing regions run.")
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log what gmfx does.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, or auto (cuda when a worker offers the GPU resource).",
        case_sensitive=False,
    ),
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="Reconstruction model (gmfx models lists them).")]


@dataclass
class Selection:
    """What a command runs on: recordings, output root and cluster options."""

    root: Location
    out: Location
    participant_label: list[str] | None
    task: list[str] | None
    scheduler: str | None
    workers: int | None
    overwrite: bool
    progress: bool

    def recordings(self):
        from gmfx.dataset import find_recordings

        return find_recordings(self.root, participant_label=self.participant_label, task=self.task)

    @contextlib.contextmanager
    def client(self, gpus: int = 0):
        from gmfx.cluster import connect

        with connect(self.scheduler, workers=self.workers, gpus=gpus) as client:
            yield client


@contextlib.contextmanager
def _session(
    input: str,
    participant_label,
    task,
    out,
    storage_option,
    scheduler,
    workers,
    overwrite,
    progress,
    verbose,
) -> Iterator[Selection]:
    """Parse the shared options, and turn failures into one clear message and a non-zero exit."""
    options: dict[str, Any] = {}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = parse_storage_options(storage_option)
        root = Location(input, options)
        selection = Selection(
            root=root,
            out=Location(out, options) if out else default_output(root),
            participant_label=participant_label,
            task=task,
            scheduler=scheduler,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
        )
        yield selection
    except GmfxError as error:
        typer.echo(redact(f"error: {error}", options), err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished regions are kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None


# -- commands ----------------------------------------------------------------------------------------
@app.command()
def decode(
    input: InputArg,
    participant_label: ParticipantOpt = None,
    task: TaskOpt = None,
    out: OutOpt = None,
    storage_option: StorageOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    verbose: VerboseOpt = False,
    chunk_frames: Annotated[int | None, typer.Option(min=1, metavar="N", help="Frames per Zarr chunk [default: about 32 MB a chunk].")] = None,
    segment_frames: Annotated[int | None, typer.Option(min=1, metavar="N", help="Frames each task decodes [default: a few chunks].")] = None,
    max_size: Annotated[int | None, typer.Option(min=8, metavar="PIXELS", help="Downscale so the longest side is at most this many pixels.")] = None,
) -> None:
    """Decode every video into a chunked Zarr store of frames with exact per-frame times.

    Examples:

      gmfx decode /data/study

      gmfx decode /data/study -p 01 -p 02 --task mini --max-size 480

      gmfx decode s3://lab/study --out s3://lab/derivatives/gmfx -s client_kwargs.endpoint_url=http://127.0.0.1:9000
    """
    from gmfx.stages.decode import decode as run_decode

    with _session(input, participant_label, task, out, storage_option, scheduler, workers, overwrite, progress, verbose) as sel:
        recordings = sel.recordings()
        with sel.client() as client:
            stores = run_decode(
                recordings,
                sel.out,
                client=client,
                chunk_frames=chunk_frames,
                segment_frames=segment_frames,
                max_size=max_size,
                overwrite=sel.overwrite,
                progress=sel.progress,
            )
        _print_outputs(stores)


def _print_outputs(stores) -> None:
    for store in stores:
        typer.echo(str(store))


@app.command()
def example(
    dest: Annotated[str, typer.Argument(metavar="DEST", help="Folder to write the example dataset to.")] = "gmfx-example",
) -> None:
    """Write the small example dataset that ships with gmfx (one real clip, frame times, events).

    Example:

      gmfx example ./demo && gmfx run ./demo
    """
    from gmfx._example import write_example_dataset

    try:
        path = write_example_dataset(dest)
    except GmfxError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(path))


def main() -> None:
    """Entry point of the ``gmfx`` command."""
    app()


def _alias(command: str):
    """An entry point ``gmfx_<command>`` that behaves as ``gmfx <command>`` (the original tool's names)."""

    def run() -> None:
        typer.main.get_command(app).main(args=[command, *sys.argv[1:]], prog_name="gmfx")

    return run


decode_main = _alias("decode")
