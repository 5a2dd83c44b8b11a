"""Up-front checks: inputs and options that would give silently wrong results or fail late.

Each check raises a :class:`GmfxError` subclass naming the file or option, before any work starts.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from gmfx._errors import FrameTimesError, ParameterError

__all__ = [
    "FrameTimesWarning",
    "ShortStretchWarning",
    "check_events",
    "check_frame_times",
    "check_pipeline",
    "check_storage_retries",
    "warn_short_stretches",
]

#: frame times whose span or median interval differ from the container's by more than this factor are
#: refused: seconds given in milliseconds (x1000), or a typo in the last row, are far outside it, while
#: a camera clock that drifts from the container's nominal rate (a few %) is not
FRAME_TIMES_FAIL_RATIO = 1.5
#: differences above this fraction (but within the factor above) only warn
FRAME_TIMES_WARN_FRACTION = 0.02


class FrameTimesWarning(UserWarning):
    """A ``_frametimes.tsv`` differs noticeably (but plausibly) from the container's timestamps."""


class ShortStretchWarning(UserWarning):
    """A stretch with a face is too short for the filter and is left NaN."""


def check_frame_times(times: np.ndarray, container_times: np.ndarray, *, frametimes: str, video: str) -> None:
    """Compare ``_frametimes.tsv`` with the container's timestamps: span (last - first) and median interval.

    Raises
    ------
    FrameTimesError
        When either differs by more than a factor ``FRAME_TIMES_FAIL_RATIO`` (both numbers in the message);
        a difference above ``FRAME_TIMES_WARN_FRACTION`` warns with :class:`FrameTimesWarning`.
    """
    if len(times) < 2 or len(container_times) < 2:
        return
    ours = (float(times[-1] - times[0]), float(np.median(np.diff(times))))
    theirs = (float(container_times[-1] - container_times[0]), float(np.median(np.diff(container_times))))
    if min(*ours, *theirs) <= 0:
        return
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    numbers = (
        f"span {ours[0]:.6g} s and median interval {ours[1]:.6g} s in the frame times, but "
        f"{theirs[0]:.6g} s and {theirs[1]:.6g} s in the video's own timestamps"
    )
    if max(abs(math.log(r)) for r in ratios) > math.log(FRAME_TIMES_FAIL_RATIO):
        raise FrameTimesError(
            f"the frame times do not fit the video: {numbers}",
            where=f"{frametimes} and {video}",
            fix="give column `t` in seconds (not milliseconds), check the last rows for typos, or remove "
            "the frame times file to use the video's own timestamps",
        )
    if max(abs(r - 1) for r in ratios) > FRAME_TIMES_WARN_FRACTION:
        warnings.warn(
            f"the frame times differ from the video's timestamps: {numbers}; where: {frametimes}; "
            "the frame times file is used",
            FrameTimesWarning,
            stacklevel=3,
        )


def check_storage_retries() -> int:
    """``GMFX_STORAGE_RETRIES`` as a whole number of 0 or more (default 5)."""
    raw = os.environ.get("GMFX_STORAGE_RETRIES", "5")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ParameterError(
            f"GMFX_STORAGE_RETRIES={raw!r} is not a whole number of 0 or more",
            where="environment variable GMFX_STORAGE_RETRIES",
            fix="set it to e.g. 5 (retries of a failed storage operation), or unset it",
        )
    return value


def warn_short_stretches(ds: xr.Dataset, filter_options: Mapping[str, Any], *, recording: str) -> list[tuple[float, float]]:
    """Warn (naming the recording and the time spans) about the stretches with a face that are too short
    for the filter's padding and that the filter leaves NaN; return the spans.

    ``ds`` is the interpolated (even-grid) dataset; ``detected`` (time, face) marks its valid samples.
    """
    from gmfx.preproc import _filters

    times = np.asarray(ds["time"].values, dtype=np.float64)
    if times.size < 2 or "detected" not in ds.variables:
        return []
    rate = 1.0 / float(np.median(np.diff(times)))
    options = {k: filter_options[k] for k in ("highpass", "lowpass", "order") if k in filter_options}
    sos, _ = _filters.design_butterworth(
        rate, highpass=options.get("highpass", 0.005), lowpass=options.get("lowpass", 4.0), order=options.get("order", 5)
    )
    need = 1 if filter_options.get("causal") else _filters.padding_samples(sos) + 1
    detected = np.asarray(ds["detected"].values, dtype=bool).reshape(times.size, -1)
    spans = [
        (float(times[s.start]), float(times[s.stop - 1]))
        for face in range(detected.shape[1])
        for s in _filters.valid_stretches(detected[:, face])
        if s.stop - s.start < need
    ]
    if spans:
        listed = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in spans[:5]) + (", ..." if len(spans) > 5 else "")
        warnings.warn(
            f"recording {recording}: {len(spans)} stretches with a face are shorter than the {need} samples "
            f"({need / rate:.2f} s) the filter needs and are left NaN: {listed}; to keep them, bridge gaps with "
            "a larger --max-gap, or lower --order",
            ShortStretchWarning,
            stacklevel=2,
        )
    return spans


def check_events(events: Any, *, anchor: str, where: str) -> None:
    """Refuse events whose duration is zero or negative when the epochs are anchored on it
    (``offset``: onset + duration; ``warp``: each event stretched to one length)."""
    from gmfx._errors import EventsError
    from gmfx.preproc._epochs import read_events

    table = read_events(events)
    if anchor not in ("offset", "warp"):
        return
    durations = table["duration"].to_numpy(dtype=float)
    bad = np.flatnonzero(~(durations > 0))
    if bad.size:
        row = int(bad[0])
        raise EventsError(
            f"anchor={anchor!r} needs a positive duration for every event, but row {row + 1} has "
            f"{float(table['duration'].iloc[row]):g} s ({bad.size} such rows)",
            where=where,
            fix="fill the 'duration' column with positive seconds, or use --anchor onset",
        )


def check_pipeline(recordings: Sequence[Any], *, preproc_options: Mapping[str, Any], epoch_options: Mapping[str, Any]) -> None:
    """Everything about a whole run that can be checked before decode starts: the storage retry budget,
    the filter's cut-offs against the grid (when its rate is known up front: ``--sampling-freq`` or a
    ``_frametimes.tsv``), the epoch window and the events files.

    Raises
    ------
    ParameterError, EventsError, FrameTimesError
        Naming the option or file.
    """
    from gmfx._video import read_frame_times
    from gmfx.preproc import _filters

    check_storage_retries()
    interpolate = preproc_options.get("interpolate")
    sampling_freq = interpolate.get("sampling_freq") if isinstance(interpolate, Mapping) else None
    if sampling_freq is not None and not sampling_freq > 0:
        raise ParameterError(
            f"the sampling frequency {sampling_freq:g} Hz is not positive",
            where="--sampling-freq",
            fix="give a rate in Hz (e.g. 30), or leave --sampling-freq out for 1 / median frame interval",
        )
    filter_options = preproc_options.get("filter")
    if isinstance(filter_options, Mapping):
        for recording in recordings:
            rate = sampling_freq
            if rate is None and recording.frametimes is not None:
                times = read_frame_times(recording.frametimes, recording.video, None)
                rate = 1.0 / float(np.median(np.diff(times))) if times.size > 1 else None
            if rate is None:
                continue  # known after decode; the filter stage checks it then
            try:
                _filters.design_butterworth(
                    rate,
                    highpass=filter_options.get("highpass", 0.005),
                    lowpass=filter_options.get("lowpass", 4.0),
                    order=filter_options.get("order", 5),
                )
            except ParameterError as error:
                raise ParameterError(
                    f"recording {recording.name}: {error.what}",
                    where="--highpass / --lowpass / --order" + ("" if sampling_freq else f" (the grid of {recording.frametimes.url})"),
                    fix=error.fix,
                ) from error
    start, end = epoch_options.get("start", -0.5), epoch_options.get("end", 2.0)
    if not end > start:
        raise ParameterError(
            f"the epoch end {end:g} is not after its start {start:g}",
            where="--epoch-start / --epoch-end",
            fix="use e.g. --epoch-start -0.5 --epoch-end 2",
        )
    for recording in recordings:
        if recording.events is not None:
            check_events(recording.events, anchor=epoch_options.get("anchor", "onset"), where=recording.events.url)
