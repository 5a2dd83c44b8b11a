"""The ``gmfx`` command line: a thin typer app over the library API.

Every stage command takes the same dataset options (input, participants, tasks, output, storage
options, cluster, resume/overwrite) and calls the stage function of the same name.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from gmfx._errors import GmfxError
from gmfx._logs import filtered_child_stderr, python_logs
from gmfx.storage import Location, default_output, parse_key_values, parse_storage_options, redact

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
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print everything: Dask logs, native model logs from the workers, library deprecation warnings.")]
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

ModelOptionOpt = Annotated[
    list[str] | None,
    typer.Option(metavar="KEY=VALUE", help="Option for the model, e.g. min_detection_confidence=0.3; repeatable."),
]
BatchOpt = Annotated[int | None, typer.Option(min=1, metavar="N", help="Frames per model call [default: the model's].")]
MaxFacesOpt = Annotated[int, typer.Option(min=1, metavar="N", help="Faces to track per frame.")]
SamplingOpt = Annotated[
    float | None,
    typer.Option(min=0.0, metavar="HZ", help="Interpolate: rate of the even grid [default: 1 / median frame interval]."),
]
HighpassOpt = Annotated[float, typer.Option(min=0.0, metavar="HZ", help="Filter: high-pass cut-off; 0 switches it off.")]
LowpassOpt = Annotated[float, typer.Option(min=0.0, metavar="HZ", help="Filter: low-pass cut-off; 0 switches it off.")]
ReferenceOpt = Annotated[
    str,
    typer.Option(
        metavar="REF",
        help="Align: template (the model's canonical mesh), first, mean, mat (invert the model's pose), "
        "or the path of a gmfx store whose mean v is the shape to align to (e.g. one participant's).",
    ),
]
StartOpt = Annotated[float, typer.Option(metavar="SECONDS", help="Epoch: window start relative to the anchor.")]
EndOpt = Annotated[float, typer.Option(metavar="SECONDS", help="Epoch: window end relative to the anchor.")]
AnchorOpt = Annotated[str, typer.Option(metavar="ANCHOR", help="Epoch: onset, offset, or warp (each event's duration to one length).")]
BaselineOpt = Annotated[str | None, typer.Option(metavar="MODE", help="Epoch: baseline correction, mean or ratio [default: none].")]
OrderOpt = Annotated[int, typer.Option(min=1, metavar="N", help="Filter: Butterworth order.")]
MaxGapOpt = Annotated[
    float, typer.Option(min=0.0, metavar="SECONDS", help="Interpolate: gaps (no face) longer than this stay NaN.")
]
OnShortOpt = Annotated[
    str,
    typer.Option(
        metavar="MODE",
        help="Filter: a stretch with a face too short for the filter: nan (leave it NaN, with a warning) or error.",
    ),
]


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
    verbose: bool = False

    def recordings(self):
        from gmfx.dataset import find_recordings

        return find_recordings(self.root, participant_label=self.participant_label, task=self.task)

    @contextlib.contextmanager
    def client(self, gpus: int = 0):
        from gmfx.cluster import connect

        with filtered_child_stderr(self.verbose) as started, connect(self.scheduler, workers=self.workers, gpus=gpus) as client:
            started()
            yield client


#: the one line an interrupted command prints (finished regions are kept, so the same command resumes)
INTERRUPTED = "interrupted: rerun the same command to resume"


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
    with python_logs(verbose):
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
                verbose=verbose,
            )
            yield selection
        except GmfxError as error:
            typer.echo(redact(f"error: {_in_flags(str(error))}", options), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None


#: library parameters whose command-line option has another name
_FLAG_NAMES = {"options": "model-option", "model_options": "model-option", "storage_options": "storage-option"}


def _in_flags(message: str) -> str:
    """A library error in the command line's words: ``run_recon(max_faces=...)`` becomes ``--max-faces``, ``run_recon(device="cpu")`` ``--device cpu``,
    where the command line has that option (parameters it does not expose keep their library name)."""
    flags = {opt for command in typer.main.get_command(app).commands.values() for p in command.params for opt in p.opts}

    def flag(match: re.Match) -> str:
        name = "--" + _FLAG_NAMES.get(match[2], match[2]).replace("_", "-")
        value = "" if match[3] == "..." else " " + match[3].strip("'\"")
        return name + value if name in flags else match[0]

    return re.sub(r"\b(\w+)\((\w+)=(\.\.\.|\"[^\"]*\"|'[^']*'|[\w.:-]+)\)", flag, message)


#: the options every dataset command takes, in the order --help shows them
_SHARED_OPTIONS: list[tuple[str, Any, Any]] = [
    ("input", InputArg, inspect.Parameter.empty),
    ("participant_label", ParticipantOpt, None),
    ("task", TaskOpt, None),
    ("out", OutOpt, None),
    ("storage_option", StorageOpt, None),
    ("scheduler", SchedulerOpt, None),
    ("workers", WorkersOpt, None),
    ("overwrite", OverwriteOpt, False),
    ("progress", ProgressOpt, True),
    ("verbose", VerboseOpt, False),
]


def dataset_command(function: Callable[..., None]) -> Callable[..., None]:
    """Register ``function(selection, **own_options)`` as a command taking the shared dataset options too.

    The command's signature is the shared options followed by the function's own; the shared ones are
    parsed into a :class:`Selection` inside :func:`_session`, which turns failures into a message and
    a non-zero exit.
    """
    hints = typing.get_type_hints(function, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in list(inspect.signature(function).parameters.values())[1:]]
    shared = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
        for name, annotation, default in _SHARED_OPTIONS
    ]

    @functools.wraps(function)
    def command(**options: Any) -> None:
        with _session(**{name: options.pop(name) for name, _, _ in _SHARED_OPTIONS}) as selection:
            function(selection, **options)

    command.__signature__ = inspect.Signature(shared + own)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in shared + own}
    del command.__wrapped__  # typer must read the signature above, not the function's
    return app.command(name=function.__name__.rstrip("_"))(command)


# -- commands ----------------------------------------------------------------------------------------
@dataset_command
def decode(
    sel: Selection,
    chunk_frames: Annotated[int | None, typer.Option(min=1, metavar="N", help="Frames per Zarr chunk, what one read decompresses [default: at most 1.5 MB raw, 4 frames at 640x360].")] = None,
    segment_frames: Annotated[int | None, typer.Option(min=1, metavar="N", help="Frames each task decodes, one shard [default: at most 256 MiB raw, 776 frames at 640x360].")] = None,
    max_size: Annotated[int | None, typer.Option(min=8, metavar="PIXELS", help="Downscale so the longest side is at most this many pixels.")] = None,
    frames_layout: Annotated[str, typer.Option(metavar="auto|rgb", help="auto: store the decoder's YUV planes when they convert to RGB exactly; rgb: store RGB frames.")] = "auto",
) -> None:
    """Decode every video into a chunked Zarr store of frames with exact per-frame times.

    Examples:

      gmfx decode /data/study

      gmfx decode /data/study -p 01 -p 02 --task mini --max-size 480

      gmfx decode s3://lab/study --out s3://lab/derivatives/gmfx -s client_kwargs.endpoint_url=http://127.0.0.1:9000
    """
    from gmfx.stages.decode import run_decode

    recordings = sel.recordings()
    with sel.client() as client:
        stores = run_decode(
            recordings,
            sel.out,
            client=client,
            chunk_frames=chunk_frames,
            segment_frames=segment_frames,
            max_size=max_size,
            frames_layout=frames_layout,
            overwrite=sel.overwrite,
            progress=sel.progress,
        )
    _print_outputs(stores)


def _print_outputs(stores) -> None:
    for store in stores:
        typer.echo(str(store))


def _local_gpus(selection: Selection, device: str) -> int:
    """GPUs to give a local cluster: none on --device cpu or with a --scheduler."""
    if selection.scheduler or device.lower() == "cpu":
        return 0
    from gmfx.cluster import local_gpu_count

    return local_gpu_count()


def _model_for_mode(model: str, mode: str) -> str:
    """``--mode detail`` picks the model's ``<model>_detail`` variant."""
    from gmfx._errors import ParameterError
    from gmfx.models import available_backends

    if mode == "coarse":
        return model
    variants = [name.removesuffix("_detail") for name in available_backends() if name.endswith("_detail")]
    if mode != "detail" or model not in variants:
        raise ParameterError(
            f"--mode {mode} is not available for the model {model!r}",
            where="--mode",
            fix=f"use --mode coarse, or --mode detail with one of: {', '.join(variants) or '(none installed)'}",
        )
    return f"{model}_detail"


@dataset_command
def recon(
    sel: Selection,
    model: ModelOpt = "mediapipe",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_faces: MaxFacesOpt = 1,
    segment_frames: Annotated[
        int, typer.Option(min=1, metavar="N", help="Frames each task reconstructs (rounded to whole frames chunks).")
    ] = 256,
    model_option: ModelOptionOpt = None,
    model_dir: Annotated[str | None, typer.Option("--model-dir", metavar="URL", help="FLAME family: folder or URL of the model files [default: $GMFX_MODEL_DIR].")] = None,
    detector: Annotated[str | None, typer.Option(metavar="NAME", help="FLAME family: face boxes from mediapipe (default) or fan (face-alignment).")] = None,
    precision: Annotated[str | None, typer.Option(metavar="DTYPE", help="FLAME family: encoder precision float32 (default), float16 or bfloat16.")] = None,
    save_vertices: Annotated[bool, typer.Option("--save-vertices", help="FLAME family: store vertices too (by default they are derived from the codes on read).")] = False,
    render: Annotated[
        bool, typer.Option("--render", help="Also write the original tool's videos: the mesh in world space and over the frames.")
    ] = False,
    mode: Annotated[str, typer.Option(metavar="MODE", help="coarse, or detail: also DECA's 128-d detail code per frame (the model's _detail variant, e.g. emica).")] = "coarse",
) -> None:
    """Reconstruct a 3D face mesh per frame and face (decoding the videos first when needed).

    Examples:

      gmfx recon /data/study -p 01 --render

      gmfx_recon /data/study --participant-label sub-01 --device cuda

      gmfx recon s3://lab/study --scheduler tcp://10.0.0.5:8786 --device cuda --max-faces 2
    """
    from gmfx.stages.recon import run_recon

    options = parse_key_values(model_option, where="--model-option")
    model = _model_for_mode(model, mode)
    if model_dir:  # the client reads the topology, the workers (started below) the weights, from there
        os.environ["GMFX_MODEL_DIR"] = options["model_dir"] = model_dir
    options.update({k: v for k, v in (("detector", detector), ("precision", precision)) if v is not None})
    recordings = sel.recordings()
    with sel.client(gpus=_local_gpus(sel, device)) as client:
        stores = run_recon(
            recordings,
            sel.out,
            client=client,
            model=model,
            device=device.lower(),
            batch_size=batch_size,
            max_faces=max_faces,
            segment_frames=segment_frames,
            model_options=options,
            overwrite=sel.overwrite,
            progress=sel.progress,
            save_vertices=save_vertices,
        )
        if render:
            stores = [*stores, *_recon_videos(sel, recordings, client)]
    _print_outputs(stores)


@dataset_command
def run(
    sel: Selection,
    max_size: Annotated[int | None, typer.Option(min=8, metavar="PIXELS", help="Decode: downscale so the longest side is at most this.")] = None,
    model: ModelOpt = "mediapipe",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_faces: MaxFacesOpt = 1,
    model_option: ModelOptionOpt = None,
    reference: ReferenceOpt = "template",
    sampling_freq: SamplingOpt = None,
    highpass: HighpassOpt = 0.005,
    lowpass: LowpassOpt = 4.0,
    epoch_start: StartOpt = -0.5,
    epoch_end: EndOpt = 2.0,
    order: OrderOpt = 5,
    max_gap: MaxGapOpt = 0.5,
    on_short: OnShortOpt = "nan",
) -> None:
    """Run the whole pipeline: decode, recon, preproc (align, interpolate, filter) and epochs.

    Each recording runs its stages on its own, four recordings at once, so one recording's recon runs
    on the cluster while another decodes; finished work is kept and a rerun resumes. Epochs are cut for
    recordings that have an _events.tsv.

    Examples:

      gmfx example ./demo && gmfx run ./demo

      gmfx run /data/study -p 01 -p 02 --workers 4

      gmfx run s3://lab/study --out s3://lab/derivatives/gmfx --scheduler tcp://10.0.0.5:8786 --device cuda
    """
    from gmfx.pipeline import run_pipeline

    recordings = sel.recordings()
    preproc_options = _preproc_options(sampling_freq, highpass, lowpass, reference, order=order, max_gap=max_gap, on_short=on_short)
    with sel.client(gpus=_local_gpus(sel, device)) as client:
        summaries, timings = run_pipeline(
            recordings,
            sel.out,
            client=client,
            decode_options={"max_size": max_size},
            recon_options={"model": model, "device": device.lower(), "batch_size": batch_size, "max_faces": max_faces,
                           "model_options": parse_key_values(model_option, where="--model-option")},
            preproc_options=preproc_options,
            epoch_options={"start": epoch_start, "end": epoch_end},
            overwrite=sel.overwrite,
            progress=sel.progress,
        )
    _print_summary(summaries, timings, sel.out)
    from gmfx.render import qc_report

    failed = {summary.recording for summary in summaries if summary.failed_stage in ("decode", "recon")}
    reported = [recording for recording in recordings if recording.name not in failed]
    if reported:
        typer.echo(f"quality control: {qc_report(reported, sel.out)}")
    _exit_on_failures(summaries)


def _preproc_options(
    sampling_freq: float | None, highpass: float, lowpass: float, reference: str = "template", *,
    order: int = 5, max_gap: float = 0.5, on_short: str = "nan",
) -> dict:  # fmt: skip
    from gmfx._errors import ParameterError

    if sampling_freq is not None and not sampling_freq > 0:  # 0 used to mean "the default" silently
        raise ParameterError(
            f"--sampling-freq {sampling_freq:g} is not a rate", where="--sampling-freq",
            fix="give a rate in Hz (e.g. 30), or leave --sampling-freq out for 1 / median frame interval",
        )  # fmt: skip
    if on_short not in ("nan", "error"):
        raise ParameterError(f"--on-short {on_short!r} is not a choice", where="--on-short", fix="use nan or error")
    filter_options = {"highpass": highpass or None, "lowpass": lowpass or None, "order": order, "on_short": on_short}
    return {
        "align": {"reference": reference},
        "interpolate": {"sampling_freq": sampling_freq, "max_gap": max_gap},
        "filter": filter_options if (highpass or lowpass) else False,
    }


def _exit_on_failures(summaries) -> None:
    """List the recordings that failed (recording, stage, message) and exit 1 when there are any."""
    failures = [summary for summary in summaries if summary.failed_stage]
    for summary in failures:
        typer.echo(f"error: {summary.recording} failed in {summary.failed_stage}: {summary.error}", err=True)
    if failures:
        typer.echo(f"{len(failures)} of {len(summaries)} recordings failed; the others are complete", err=True)
        raise typer.Exit(1)


@dataset_command
def preproc(
    sel: Selection,
    reference: ReferenceOpt = "template",
    sampling_freq: SamplingOpt = None,
    highpass: HighpassOpt = 0.005,
    lowpass: LowpassOpt = 4.0,
    order: OrderOpt = 5,
    max_gap: MaxGapOpt = 0.5,
    on_short: OnShortOpt = "nan",
) -> None:
    """Align, interpolate and filter the reconstructions, as one lazy graph per recording.

    Examples:

      gmfx preproc /data/study -p 01

      gmfx preproc /data/study --sampling-freq 30 --highpass 0.01 --lowpass 6

      gmfx preproc /data/study --highpass 0 --lowpass 0      # align and interpolate only
    """
    from gmfx.stages.preproc import run_preproc

    recordings = sel.recordings()
    options = _preproc_options(sampling_freq, highpass, lowpass, reference, order=order, max_gap=max_gap, on_short=on_short)
    with sel.client() as client:
        stores = run_preproc(
            recordings, sel.out, client=client, overwrite=sel.overwrite, progress=sel.progress, **options,
        )  # fmt: skip
    _print_outputs(stores)


def _step(sel: Selection, step: str, options: dict) -> None:
    from gmfx.pipeline import run_step

    recordings = sel.recordings()
    with sel.client() as client:
        stores = run_step(step, recordings, sel.out, client=client, options=options, overwrite=sel.overwrite, progress=sel.progress)
    _print_outputs(stores)


@dataset_command
def align(
    sel: Selection,
    reference: ReferenceOpt = "template",
    scale: Annotated[bool, typer.Option(help="Also fit a uniform scale.")] = False,
) -> None:
    """Remove rigid head motion: recon store -> <name>_aligned.zarr (v in local space, mat, motion).

    Examples:

      gmfx align /data/study -p 01

      gmfx_align /data/study --reference mean
    """
    _step(sel, "align", {"reference": reference, "scale": scale})


@dataset_command
def interpolate(
    sel: Selection,
    sampling_freq: SamplingOpt = None,
    method: Annotated[str, typer.Option(metavar="METHOD", help="linear, pchip or cubic.")] = "linear",
    max_gap: Annotated[float, typer.Option(min=0.0, metavar="SECONDS", help="Gaps (no face) longer than this stay NaN.")] = 0.5,
) -> None:
    """Resample onto an even time grid: <name>_aligned.zarr -> <name>_interpolated.zarr.

    Examples:

      gmfx interpolate /data/study --sampling-freq 30

      gmfx_interpolate /data/study --method pchip --max-gap 0.25
    """
    options = {"sampling_freq": sampling_freq, "method": method, "max_gap": max_gap}
    _step(sel, "interpolate", options)


@dataset_command
def filter_(
    sel: Selection,
    highpass: HighpassOpt = 0.005,
    lowpass: LowpassOpt = 4.0,
    order: Annotated[int, typer.Option(min=1, metavar="N", help="Butterworth order.")] = 5,
    causal: Annotated[bool, typer.Option(help="Causal (one-pass) filter instead of zero-phase.")] = False,
) -> None:
    """Butterworth band-pass along time: <name>_interpolated.zarr -> <name>_filtered.zarr.

    Examples:

      gmfx filter /data/study --highpass 0.01 --lowpass 6

      gmfx_filter /data/study --highpass 0 --lowpass 4 --causal
    """
    options = {"highpass": highpass or None, "lowpass": lowpass or None, "order": order, "causal": causal}
    _step(sel, "filter", options)


@dataset_command
def epoch(
    sel: Selection,
    start: StartOpt = -0.5,
    end: EndOpt = 2.0,
    anchor: AnchorOpt = "onset",
    baseline: BaselineOpt = None,
) -> None:
    """Cut the preprocessed data into epochs around the events of each recording's _events.tsv.

    Examples:

      gmfx epoch /data/study --start -0.5 --end 2

      gmfx epoch /data/study --anchor warp --baseline mean
    """
    from gmfx.stages.preproc import run_epochs

    recordings = sel.recordings()
    with sel.client() as client:
        stores = run_epochs(
            recordings, sel.out, client=client, overwrite=sel.overwrite, progress=sel.progress,
            start=start, end=end, anchor=anchor, baseline=baseline,
        )  # fmt: skip
    _print_outputs(stores)


# -- analysis: gmfx glm and gmfx generate ------------------------------------------------------------
def _contrasts(pairs: list[str] | None, where: str) -> dict[str, str] | None:
    """``NAME=EXPRESSION`` strings -> ``{name: expression}`` (None when none is given: one per condition)."""
    if not pairs:
        return None
    from gmfx._errors import ParameterError

    named = {}
    for pair in pairs:
        name, sep, expression = pair.partition("=")
        if not sep or not name.strip() or not expression.strip():
            raise ParameterError(f"contrast {pair!r} is not NAME=EXPRESSION", where=where, fix=f"write e.g. {where} 'smile-frown=smile - frown'")
        named[name.strip()] = expression.strip()
    return named


@dataset_command
def glm(
    sel: Selection,
    window_start: Annotated[float, typer.Option(metavar="SECONDS", help="First FIR lag after each onset.")] = 0.0,
    window_end: Annotated[float, typer.Option(metavar="SECONDS", help="Last FIR lag after each onset.")] = 2.0,
    modulator: Annotated[list[str] | None, typer.Option(metavar="COLUMN", help="Events column that scales each condition's response; repeatable.")] = None,
    drift_order: Annotated[int, typer.Option(min=-1, metavar="N", help="Highest Legendre degree of the drift (0: intercept only).")] = 3,
    motion: Annotated[bool, typer.Option(help="Use the head-motion parameters as nuisance regressors.")] = True,
    ar1: Annotated[bool, typer.Option(help="AR(1) prewhitening per vertex and coordinate.")] = False,
    t_contrast: Annotated[list[str] | None, typer.Option(metavar="NAME=EXPR", help="t contrast at every lag, e.g. 'smile-frown=smile - frown'; repeatable [default: each condition].")] = None,
    f_contrast: Annotated[list[str] | None, typer.Option(metavar="NAME=EXPR", help="F contrast over all lags; repeatable [default: each condition].")] = None,
    group: Annotated[bool, typer.Option(help="Also combine the fits of each task (fixed and random effects) into group/task-<task>_glm.zarr.")] = False,
    reference: Annotated[str, typer.Option(metavar="REF", help="Group: shape the faces are aligned to: mean, first or template.")] = "mean",
) -> None:
    """Fit how each condition of the events moves every vertex (lazy GLM): <name>_preproc.zarr -> <name>_glm.zarr.

    Examples:

      gmfx glm /data/study --window-end 2 --ar1

      gmfx glm /data/study --modulator intensity --t-contrast 'smile-frown=smile - frown' --group
    """
    from gmfx.stages import glm as stage

    recordings = sel.recordings()
    options = {
        "window": (window_start, window_end), "modulators": tuple(modulator or ()), "drift_order": drift_order, "ar1": ar1,
        "t_contrasts": _contrasts(t_contrast, "--t-contrast"), "f_contrasts": _contrasts(f_contrast, "--f-contrast"),
        **({} if motion else {"motion": None}),
    }  # fmt: skip
    with sel.client() as client:
        stores = stage.glm(recordings, sel.out, client=client, overwrite=sel.overwrite, progress=sel.progress, **options)
        if group:
            stores += stage.group(recordings, sel.out, client=client, overwrite=sel.overwrite, progress=sel.progress, reference=reference)
    _print_outputs(stores)


@dataset_command
def generate(
    sel: Selection,
    condition: Annotated[list[str] | None, typer.Option(metavar="NAME", help="Condition to generate; repeatable [default: all].")] = None,
    shape: Annotated[str, typer.Option(metavar="SHAPE", help="Face the movement is added to: mean (the participant's or group's) or template.")] = "mean",
    gain: Annotated[float, typer.Option(metavar="FACTOR", help="Multiply the movement (exaggerate subtle expressions).")] = 1.0,
    colour: Annotated[str, typer.Option(metavar="COLOUR", help="Per-vertex colour: displacement or F.")] = "displacement",
    group: Annotated[bool, typer.Option(help="Generate from the group fits (group/task-<task>_glm.zarr) instead of each recording's.")] = False,
) -> None:
    """Write the face movement each condition predicts as a renderable mesh store beside its fit.

    Examples:

      gmfx generate /data/study --condition smile --shape template

      gmfx generate /data/study --group --gain 3 --colour F
    """
    from gmfx.stages import glm as stage

    recordings = sel.recordings()
    fits = (
        [stage.group_location(sel.out, task) for task in sorted({r.task for r in recordings})]
        if group
        else [stage.glm_location(sel.out, r) for r in recordings]
    )
    with sel.client() as client:
        stores = stage.generate(fits, conditions=condition, client=client, overwrite=sel.overwrite, progress=sel.progress,
                                shape=shape, gain=gain, colour=colour)  # fmt: skip
    _print_outputs(stores)


def _print_summary(summaries, timings, out: Location) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gmfx run: {len(summaries)} recording(s)")
    for column in ("recording", "frames", "face found", "outputs"):
        table.add_column(column, overflow="fold")
    for summary in summaries:
        if summary.failed_stage:
            table.add_row(summary.recording, "-", "-", f"failed in {summary.failed_stage} (see below)")
            continue
        table.add_row(
            summary.recording,
            str(summary.frames),
            f"{summary.detected_fraction:.0%}",
            "\n".join(summary.outputs.values()),
        )
    console = Console(width=200)
    console.print(table)
    console.print(
        "time per stage, from the first recording starting it to the last finishing it (recordings run their "
        "stages on their own, so stages overlap): " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
    )
    finished = [summary for summary in summaries if not summary.failed_stage]
    if finished:
        outputs = finished[0].outputs
        console.print(
            f"Outputs are in {out}. Open them lazily with xarray, e.g.:\n"
            f"  import gmfx\n"
            f"  recon = gmfx.open_recon({outputs['recon']!r})\n"
            f"  preproc = gmfx.open_recon({outputs['preproc']!r})"
        )


# -- rendering and quality control (gmfx render, gmfx qc, gmfx recon --render) ----------------------------
def _recon_videos(sel: Selection, recordings, client) -> list:
    """The original tool's two videos per recording: the mesh in world space, and over the frames."""
    from gmfx.render import ViewOptions, run_render

    views = [ViewOptions(space="world"), ViewOptions(space="image", background="frame")]
    return [
        video
        for view in views
        for video in run_render(recordings, sel.out, client=client, view=view, overwrite=sel.overwrite, progress=sel.progress)
    ]


@dataset_command
def render(
    sel: Selection,
    store: Annotated[str, typer.Option(metavar="STORE", help="Store to draw: recon, preproc, align, interpolate or filter.")] = "recon",
    space: Annotated[str, typer.Option(metavar="SPACE", help="image (over the frames), world (head motion kept) or local (removed).")] = "image",
    panels: Annotated[str, typer.Option(metavar="LIST", help="Comma-separated panels: mesh, overlay, original.")] = "mesh,overlay,original",
    stack: Annotated[str, typer.Option(metavar="HOW", help="Panels side by side (horizontal) or one above the other (vertical).")] = "horizontal",
    background: Annotated[str, typer.Option(metavar="BG", help="Behind an image-space mesh panel: black or frame.")] = "black",
    opacity: Annotated[float, typer.Option(min=0.0, max=1.0, metavar="ALPHA", help="Of the mesh in the overlay panel.")] = 0.5,
    shading: Annotated[str, typer.Option(metavar="MODE", help="smooth or flat.")] = "smooth",
    color: Annotated[str | None, typer.Option(metavar="VAR", help="Colour the vertices by a store variable with a vertex dim, or displacement.")] = None,
    cmap: Annotated[str, typer.Option(metavar="NAME", help="Matplotlib colour map of --color.")] = "viridis",
    size: Annotated[str | None, typer.Option(metavar="WxH", help="Size of world/local panels [default: the frames' size].")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu (numba) or cuda (nvdiffrast, pip install gmfx[gpu]).")] = "cpu",
    frame: Annotated[int | None, typer.Option(min=0, metavar="N", help="Write frame N as a PNG instead of a video.")] = None,
    time: Annotated[float | None, typer.Option(metavar="SECONDS", help="Write the frame nearest this time as a PNG.")] = None,
    segment_frames: Annotated[int, typer.Option(min=1, metavar="N", help="Frames per render task.")] = 256,
) -> None:
    """Render a store of every recording to an mp4 (with the source's frame times) or a PNG still.

    Examples:

      gmfx render /data/study -p 01

      gmfx render /data/study --store preproc --space local --panels mesh --color displacement

      gmfx render /data/study --space image --panels overlay --frame 120
    """
    from gmfx.render import ViewOptions, run_render

    try:
        width, height = (int(n) for n in size.lower().split("x")) if size else (None, None)
    except ValueError:
        raise typer.BadParameter(f"{size!r} is not WIDTHxHEIGHT, e.g. 640x480", param_hint="--size") from None
    view = ViewOptions(
        space=space, panels=tuple(p.strip() for p in panels.split(",") if p.strip()), stack=stack, background=background,
        opacity=opacity, shading=shading, color=color, cmap=cmap, size=(width, height) if size else None, device=device,
    )  # fmt: skip
    recordings = sel.recordings()
    with contextlib.ExitStack() as stack_:
        client = stack_.enter_context(sel.client()) if frame is None and time is None else None
        outputs = run_render(
            recordings, sel.out, client=client, store=store, view=view, frame=frame, time=time,
            segment_frames=segment_frames, overwrite=sel.overwrite, progress=sel.progress,
        )  # fmt: skip
    _print_outputs(outputs)


@dataset_command
def qc(sel: Selection) -> None:
    """Write the quality-control report: PNG figures per recording and one HTML page (<out>/qc/index.html).

    Examples:

      gmfx qc /data/study

      gmfx qc s3://lab/study --out s3://lab/derivatives/gmfx -s anon=false
    """
    from gmfx.render import qc_report

    typer.echo(str(qc_report(sel.recordings(), sel.out)))


models_app = typer.Typer(
    help="List the reconstruction models, their files (present or missing) and where to get them.",
    rich_markup_mode=None,
    add_completion=False,
)
app.add_typer(models_app, name="models")
ModelDirOpt = Annotated[
    str | None,
    typer.Option("--model-dir", metavar="URL", help="Folder or URL of the model files [default: $GMFX_MODEL_DIR, else ~/.cache/gmfx/models].", show_default=False),
]


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, model_dir: ModelDirOpt = None, storage_option: StorageOpt = None) -> None:
    """List the installed reconstruction models, what they declare and the model files each needs.

    Examples:

      gmfx models

      gmfx models --model-dir s3://lab/models -s client_kwargs.endpoint_url=http://127.0.0.1:9000
    """
    if ctx.invoked_subcommand is not None:
        return
    from gmfx.models import available_backends, get_backend
    from gmfx.models._files import model_dir as resolve_model_dir
    from gmfx.models._files import model_file_status

    options = parse_storage_options(storage_option)
    if model_dir:  # the FLAME family reads its topology from there
        os.environ["GMFX_MODEL_DIR"] = model_dir
    root = resolve_model_dir(model_dir, options)
    typer.echo(f"model directory: {root.url}")
    for name in available_backends():
        try:
            backend = get_backend(name)
        except GmfxError as error:
            typer.echo(f"{name}: cannot be loaded ({error.what})")
            continue
        devices = "/".join(backend.devices) + (" (GPU required)" if backend.requires_gpu else "")
        codes = ", ".join(f"{code} ({size})" for code, size in backend.outputs.codes.items()) or "none"
        status = model_file_status(backend, root)
        try:
            vertices = f"{backend.topology().n_vertices} vertices"
        except GmfxError:
            vertices = "vertices unknown until its files are present"
        identity = "".join(f", identity {code} ({size}) per face" for code, size in backend.identity.items())
        typer.echo(f"{name} (version {backend.version}): {vertices}, devices {devices}, codes {codes}{identity}")
        for spec, found in status:
            if found is not None:
                typer.echo(f"  present  {spec.description}: {found.url}")
            else:
                typer.echo(f"  MISSING  {spec.description} ({' or '.join(spec.paths)}): {spec.obtain}")


@models_app.command("import-flame")
def import_flame(
    file: Annotated[str, typer.Argument(metavar="FILE", help="FLAME .pkl (generic_model.pkl, flame2023.pkl, ...).", show_default=False)],
    model_dir: ModelDirOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="URL", help="Where to write the .npz [default: FLAME2020/generic_model.npz in the model directory].")] = None,
    storage_option: StorageOpt = None,
) -> None:
    """Convert a FLAME .pkl once into a pickle-free .npz that gmfx reads (checked key by key).

    The .pkl is read by gmfx's restricted unpickler (chumpy and SciPy objects become arrays; anything
    else is refused). Example:

      gmfx models import-flame ~/Downloads/FLAME2020/generic_model.pkl --model-dir /lab/models
    """
    from gmfx.models._files import model_dir as resolve_model_dir
    from gmfx.models._flame import read_flame, write_flame_npz

    options = parse_storage_options(storage_option)
    try:
        source = Location(file, options)
        if not source.exists():
            raise GmfxError(f"no file {file}", where=file, fix="give the path of the FLAME .pkl")
        with source.open("rb") as handle:
            model = read_flame(handle.read(), where=source.url)
        target = Location(out, options) if out else resolve_model_dir(model_dir, options).child("FLAME2020", "generic_model.npz")
        fs, path = target.filesystem()
        fs.makedirs(fs._parent(path), exist_ok=True)
        with target.open("wb") as handle:
            write_flame_npz(model, handle)
    except GmfxError as error:
        typer.echo(redact(f"error: {error}", options), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{target.url} ({model.n_vertices} vertices, {len(model.faces)} triangles, {model.n_expression} expression components)")


@models_app.command("import-bfm")
def import_bfm(
    folder: Annotated[str, typer.Argument(metavar="FOLDER", help="Folder with 01_MorphableModel.mat, Exp_Pca.bin and Deep3DFaceRecon's BFM/ files.", show_default=False)],
    model_dir: ModelDirOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="URL", help="Where to write the .mat [default: BFM/BFM_model_front.mat in the model directory].")] = None,
    storage_option: StorageOpt = None,
) -> None:
    """Convert the original BFM 2009 files once into the front model Deep3D and bfm-fit read.

    FOLDER holds 01_MorphableModel.mat (BFM 2009), Exp_Pca.bin (Guo et al.) and, from the BFM/ folder of
    Deep3DFaceRecon_pytorch, std_exp.txt, BFM_front_idx.mat, BFM_exp_idx.mat and facemodel_info.mat.
    The same conversion as Deep3DFaceRecon's transferBFM09. Example:

      gmfx models import-bfm ~/Downloads/BFM --model-dir /lab/models
    """
    import scipy.io

    from gmfx.models._bfm import bfm_from_dict
    from gmfx.models._bfm_convert import convert_bfm09
    from gmfx.models._files import model_dir as resolve_model_dir

    options = parse_storage_options(storage_option)
    try:
        content = convert_bfm09(Location(folder, options))
        model = bfm_from_dict(content, where=folder)
        target = Location(out, options) if out else resolve_model_dir(model_dir, options).child("BFM", "BFM_model_front.mat")
        fs, path = target.filesystem()
        fs.makedirs(fs._parent(path), exist_ok=True)
        with target.open("wb") as handle:
            scipy.io.savemat(handle, content)
    except GmfxError as error:
        typer.echo(redact(f"error: {error}", options), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{target.url} ({model.n_vertices} vertices, {len(model.triangles)} triangles, {model.sizes['id']} identity / "
               f"{model.sizes['exp']} expression / {model.sizes['tex']} texture components)")  # fmt: skip


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
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside a dataset command's session (e.g. while importing): still one line
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


def _alias(command: str):
    """An entry point ``gmfx_<command>`` that behaves as ``gmfx <command>`` (the original tool's names)."""

    def run() -> None:
        typer.main.get_command(app).main(args=[command, *sys.argv[1:]], prog_name="gmfx")

    return run


decode_main = _alias("decode")
recon_main = _alias("recon")
align_main = _alias("align")
interpolate_main = _alias("interpolate")
filter_main = _alias("filter")
