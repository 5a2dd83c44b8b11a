"""Events tables, epoch sample times and baselines (pure NumPy/pandas kernels)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from gmfx._errors import EventsError, ParameterError
from gmfx.storage import Location

__all__ = ["ANCHORS", "read_events", "epoch_lags", "epoch_times", "apply_baseline", "outside_recording"]

ANCHORS = ("onset", "offset", "warp")


def read_events(source: pd.DataFrame | str | os.PathLike | Location) -> pd.DataFrame:
    """A validated events table: numeric finite ``onset``, numeric ``duration`` (NaN for ``n/a``), extra columns.

    Raises
    ------
    EventsError
        The file cannot be read, has no event rows, or ``onset``/``duration`` are missing or not numbers.
    """
    if isinstance(source, pd.DataFrame):
        table, where = source.copy(), "the events table given"
    else:
        location = source if isinstance(source, Location) else Location(os.fspath(source))
        where = location.url
        try:
            with location.open("rb") as handle:
                table = pd.read_csv(handle, sep="\t", na_values=["n/a"], keep_default_na=True)
        except (OSError, ValueError, pd.errors.ParserError) as error:
            raise EventsError(
                f"the events file cannot be read as a tab-separated table ({type(error).__name__}: {error})",
                where=where,
                fix="write it as BIDS _events.tsv: tab-separated with a header line and columns onset, duration",
            ) from error
    if "onset" not in table.columns and len(table.columns) == 1 and "," in str(table.columns[0]):
        raise EventsError(
            f"the events file is comma-separated (header {table.columns[0]!r}), not tab-separated",
            where=where,
            fix="save it with tabs between columns (BIDS _events.tsv; e.g. pandas: to_csv(path, sep='\\t', index=False))",
        )
    if "onset" not in table.columns:
        raise EventsError(
            f"the events table has no 'onset' column (columns: {', '.join(map(str, table.columns)) or 'none'})",
            where=where,
            fix="add an 'onset' column with each event's time in seconds (tab-separated)",
        )
    if "duration" not in table.columns:
        table["duration"] = np.nan
    for column in ("onset", "duration"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & table[column].notna() | (column == "onset") & numbers.isna()
        bad |= np.isinf(numbers.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise EventsError(
                f"the '{column}' of event row {row + 1} is {table[column].iloc[row]!r}, not a number "
                f"({int(bad.sum())} bad rows)",
                where=where,
                fix=f"give every event's {column} in seconds" + ("" if column == "onset" else " (or n/a)"),
            )
        table[column] = numbers.astype(float)
    if table.empty:
        raise EventsError(
            f"the events table has no events (a header with columns {', '.join(map(str, table.columns))}, but no rows)",
            where=where,
            fix="add one row per event (onset and duration in seconds, tab-separated), or leave this recording "
            "out of the epoch stage",
        )
    return table.reset_index(drop=True)


def epoch_lags(
    start: float, end: float, *, sampling_freq: float | None = None, n_lags: int | None = None
) -> np.ndarray:
    """Lags from ``start`` to ``end``: ``n_lags`` evenly spaced, or every ``1 / sampling_freq``."""
    if not end > start:
        raise ParameterError(
            f"the epoch end {end} is not after its start {start}", where="epoch", fix="use e.g. start=-0.5, end=2.0"
        )
    if n_lags is not None:
        if n_lags < 2:
            raise ParameterError(f"n_lags={n_lags} is below 2", where="epoch", fix="give at least 2 lags")
        return np.linspace(start, end, int(n_lags))
    count = int(np.floor((end - start) * sampling_freq + 1e-9)) + 1
    return start + np.arange(count) / sampling_freq


def epoch_times(onsets: np.ndarray, durations: np.ndarray, lags: np.ndarray, anchor: str) -> np.ndarray:
    """``(epoch, lag)`` sample times: ``onset + lag``, ``onset + duration + lag``, or ``onset + lag * duration`` (warp)."""
    onsets = np.asarray(onsets, dtype=np.float64)[:, None]
    durations = np.asarray(durations, dtype=np.float64)[:, None]
    if anchor == "onset":
        return onsets + lags[None, :]
    if anchor == "offset":
        return onsets + durations + lags[None, :]
    return onsets + lags[None, :] * durations


def outside_recording(onsets: np.ndarray, first: float, last: float) -> np.ndarray:
    """Indices of the events whose onset is before ``first`` or after ``last``."""
    onsets = np.asarray(onsets, dtype=np.float64)
    return np.flatnonzero((onsets < first) | (onsets > last))


def apply_baseline(values: np.ndarray, lags: np.ndarray, window: tuple[float, float], mode: str) -> np.ndarray:
    """Subtract (``"mean"``) or divide by (``"ratio"``) each epoch's mean over the lags in ``window`` (axis 1)."""
    inside = (lags >= window[0]) & (lags <= window[1])
    reference = np.nanmean(values[:, inside], axis=1, keepdims=True)
    return values - reference if mode == "mean" else values / reference
