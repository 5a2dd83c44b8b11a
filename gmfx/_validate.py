"""Up-front checks: inputs and options that would give silently wrong results or fail late.

Each check raises a :class:`GmfxError` subclass naming the file or option, before any work starts.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from gmfx._errors import FrameTimesError, ParameterError

__all__ = ["FrameTimesWarning", "check_frame_times", "check_storage_retries"]

#: frame times whose span or median interval differ from the container's by more than this factor are
#: refused: seconds given in milliseconds (x1000), or a typo in the last row, are far outside it, while
#: a camera clock that drifts from the container's nominal rate (a few %) is not
FRAME_TIMES_FAIL_RATIO = 1.5
#: differences above this fraction (but within the factor above) only warn
FRAME_TIMES_WARN_FRACTION = 0.02


class FrameTimesWarning(UserWarning):
    """A ``_frametimes.tsv`` differs noticeably (but plausibly) from the container's timestamps."""


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
