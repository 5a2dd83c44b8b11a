"""Design matrices from an experiment's events on an even time grid (pure NumPy/SciPy kernels).

A design has three kinds of columns:

* ``fir``: one regressor per condition (``trial_type``) and lag: 1 at ``onset + lag`` of every event of
  that condition (the onset snapped to the nearest grid sample). Overlapping events add up
  (superposition), so no epoching is needed and a response that outlasts the next onset is still
  estimated without bias.
* ``modulator``: the same FIR regressors with each event's value of another column (mean-centred within
  the condition; an event without a value counts 0) as amplitude: how the response scales with it.
* nuisance: Legendre polynomials of time up to ``drift_order`` (degree 0 is the intercept) and the
  head-motion parameters (unwrapped angles, z-scored), whose effects are estimated and then ignored.

The matrix is sparse (an hour at 30 fps with 4 conditions x 60 lags is ~250 columns of 108,000 rows,
220 MB dense; the FIR part holds a few ones per event).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.polynomial import legendre

from gmfx._errors import EventsError, ParameterError

__all__ = ["Design", "build_design", "fir_lags", "DEFAULT_MOTION_PARAMS"]

#: rigid motion only: align(scale=False) leaves scale and shear constant
DEFAULT_MOTION_PARAMS = ("tx", "ty", "tz", "rx", "ry", "rz")


@dataclass(frozen=True)
class Design:
    """A design matrix and the meaning of its columns.

    Attributes
    ----------
    matrix
        ``(time, regressor)`` sparse CSR matrix (float64); rows outside ``valid`` are zero.
    valid
        ``(time,)`` samples used in the fit (face detected and motion known).
    columns
        One row per regressor: ``name``, ``kind`` (fir, modulator, drift, motion), ``condition``, ``lag``.
    conditions
        The names along the fit's ``condition`` axis: trial types, then ``<trial_type>:<modulator>``.
    lags
        ``(lag,)`` seconds from the onset.
    """

    matrix: sp.csr_array
    valid: np.ndarray
    columns: pd.DataFrame
    conditions: tuple[str, ...]
    lags: np.ndarray

    @property
    def n_interest(self) -> int:
        """Columns of interest (FIR and modulators), first in the matrix, condition-major."""
        return len(self.conditions) * self.lags.size

    def dense(self) -> np.ndarray:
        """The matrix as a dense array (small designs, inspection and tests)."""
        return self.matrix.toarray()


def fir_lags(window: tuple[float, float], rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Lag sample offsets and their times (s) covering ``window`` on a grid of ``rate`` Hz."""
    start, end = (float(w) for w in window)
    if not end > start:
        raise ParameterError(
            f"the FIR window end {end} is not after its start {start}",
            where="glm(window=...)",
            fix="give (start, end) in seconds from each onset, e.g. (0, 2)",
        )
    first, last = int(round(start * rate)), int(round(end * rate))
    offsets = np.arange(first, max(last, first) + 1)
    return offsets, offsets / rate


def conditions_of(events: pd.DataFrame, modulators: Sequence[str], where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The trial types (sorted) and the (trial type, modulator) pairs of a table."""
    if "trial_type" not in events.columns:
        raise EventsError(
            f"the events table has no 'trial_type' column (columns: {', '.join(map(str, events.columns))})",
            where=where,
            fix="add a 'trial_type' column naming each event's condition",
        )
    types = events["trial_type"]
    if types.isna().any():
        row = int(np.flatnonzero(types.isna().to_numpy())[0])
        raise EventsError(
            f"event row {row + 1} has no trial_type", where=where, fix="name every event's condition (trial_type)"
        )
    names = sorted(map(str, types.unique()))
    pairs = []
    for column in modulators:
        if column not in events.columns:
            raise EventsError(
                f"the modulator column {column!r} is not in the events table",
                where=where,
                fix=f"use one of its columns: {', '.join(map(str, events.columns))}",
            )
        values = pd.to_numeric(events[column], errors="coerce")
        if values.isna().all():
            raise EventsError(
                f"the modulator column {column!r} holds no numbers", where=where, fix="give numeric values (or n/a)"
            )
        for name in names:
            chosen = values[events["trial_type"].astype(str) == name].dropna()
            if chosen.size > 1 and np.ptp(chosen.to_numpy()) > 0:
                pairs.append((name, column))
    return names, pairs


def build_design(
    events: pd.DataFrame,
    times: np.ndarray,
    *,
    window: tuple[float, float],
    modulators: Sequence[str] = (),
    drift_order: int = 3,
    motion: np.ndarray | None = None,
    motion_names: Sequence[str] = (),
    valid: np.ndarray | None = None,
    where: str = "events",
) -> Design:
    """Build the design of one face of one recording.

    Parameters
    ----------
    events
        Table with ``onset`` (s), ``trial_type`` and the ``modulators`` columns.
    times
        ``(time,)`` the even grid of the data (s).
    window
        First and last lag (s from each onset).
    drift_order
        Highest Legendre degree of the drift (``-1``: no drift and no intercept).
    motion
        ``(time, param)`` motion parameters (NaN where unknown), or ``None``.
    valid
        ``(time,)`` samples with data (default: all); samples with unknown motion are dropped too.
    """
    times = np.asarray(times, dtype=np.float64)
    n = times.size
    rate = (n - 1) / (times[-1] - times[0])
    offsets, lags = fir_lags(window, rate)
    names, pairs = conditions_of(events, modulators, where)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool).copy()
    kinds = [("fir", name, None) for name in names] + [("modulator", name, column) for name, column in pairs]
    onsets = np.rint((events["onset"].to_numpy(dtype=np.float64) - times[0]) * rate).astype(np.int64)
    types = events["trial_type"].astype(str).to_numpy()
    rows, cols, values = [], [], []
    for index, (kind, name, column) in enumerate(kinds):
        chosen = types == name
        amplitude = np.ones(chosen.sum())
        if kind == "modulator":
            raw = pd.to_numeric(events[column], errors="coerce").to_numpy(dtype=np.float64)[chosen]
            amplitude = np.nan_to_num(raw - np.nanmean(raw), nan=0.0)
        starts = onsets[chosen]
        for k, offset in enumerate(offsets):
            at = starts + offset
            inside = (at >= 0) & (at < n)
            rows.append(at[inside])
            cols.append(np.full(inside.sum(), index * offsets.size + k))
            values.append(amplitude[inside])
    n_interest = len(kinds) * offsets.size
    fir = sp.csr_array(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n_interest)
    )  # duplicates (overlapping events) are summed
    nuisance, nuisance_names = [], []
    if drift_order >= 0:
        x = 2 * (times - times[0]) / (times[-1] - times[0]) - 1
        for degree in range(drift_order + 1):
            nuisance.append(legendre.legval(x, np.eye(drift_order + 1)[degree]))
            nuisance_names.append(("drift", f"drift_{degree}"))
    if motion is not None:
        motion = np.asarray(motion, dtype=np.float64)
        valid &= np.isfinite(motion).all(axis=1)
        for j, param in enumerate(motion_names):
            column = motion[:, j].copy()
            known = valid & np.isfinite(column)
            if param.startswith("r"):  # angles near +/-180 degrees jump: unwrap before using them as numbers
                column[known] = np.unwrap(column[known], period=360.0)
            spread = column[known].std() if known.any() else 0.0
            if not spread > 1e-9 * max(1.0, np.abs(column[known]).max(initial=0.0)):
                continue  # constant: the intercept holds it already
            nuisance.append(np.where(known, (column - column[known].mean()) / spread, 0.0))
            nuisance_names.append(("motion", f"motion_{param}"))
    dense = np.column_stack(nuisance) if nuisance else np.zeros((n, 0))
    matrix = sp.hstack([fir, sp.csr_array(dense)], format="csr")
    keep = sp.diags_array(valid.astype(np.float64))
    matrix = sp.csr_array(keep @ matrix)
    matrix.eliminate_zeros()
    conditions = tuple(names) + tuple(f"{name}:{column}" for name, column in pairs)
    table = pd.DataFrame(
        [(f"{c}_lag{k}", "fir" if ":" not in c else "modulator", c, lag) for c in conditions for k, lag in enumerate(lags)]
        + [(name, kind, None, np.nan) for kind, name in nuisance_names],
        columns=["name", "kind", "condition", "lag"],
    )
    return Design(matrix=matrix, valid=valid, columns=table, conditions=conditions, lags=lags)
