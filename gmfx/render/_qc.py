"""Quality control of reconstructions: per-recording measures, PNG figures and one HTML page per dataset.

Measures, per recording and face 0 (from the recon store; the frames store gives a still):

* face found: the fraction of frames with ``detected``;
* detection score over time;
* head motion over time, relative to the recording's median pose: translation of ``mat`` (in the
  vertices' units) and rotation as a rotation vector in degrees about the image axes (x right, y down,
  z away). Never Euler angles: MediaPipe's poses sit near the +/-180 degree wrap of the x angle;
* per-frame jitter: the median over vertices of ``|v[t] - (v[t-1] + v[t+1]) / 2|`` as a percentage of
  the face's width. A smooth movement gives nearly 0; landmark noise shows as spikes.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from gmfx.dataset import Recording
from gmfx.storage import Location, open_dataset, store_location

__all__ = ["QcMeasures", "qc_measures", "qc_figure", "qc_report"]


@dataclass(frozen=True)
class QcMeasures:
    """Per-frame QC series of one recording (face 0) and their summaries."""

    times: np.ndarray
    detected: np.ndarray
    score: np.ndarray
    translation: np.ndarray  # (time, 3)
    rotation: np.ndarray  # (time, 3) degrees
    jitter: np.ndarray  # (time,) % of face width
    units: str

    @property
    def detected_fraction(self) -> float:
        return float(self.detected.mean()) if self.detected.size else 0.0


def rotation_vectors(rotations: np.ndarray) -> np.ndarray:
    """``(n, 3)`` rotation vectors (degrees) of ``(n, 3, 3)`` rotation matrices (NaN stays NaN)."""
    from scipy.spatial.transform import Rotation

    out = np.full((len(rotations), 3), np.nan)
    finite = np.isfinite(rotations).all(axis=(1, 2))
    if finite.any():
        out[finite] = np.rad2deg(Rotation.from_matrix(rotations[finite]).as_rotvec())
    return out


def _pure_rotations(linear: np.ndarray) -> np.ndarray:
    """Nearest rotations to ``(n, 3, 3)`` linear maps (scale and shear removed; NaN kept)."""
    out = np.full_like(linear, np.nan)
    finite = np.isfinite(linear).all(axis=(1, 2))
    u, _, vt = np.linalg.svd(linear[finite])
    fix = np.where(np.linalg.det(u @ vt) < 0, -1.0, 1.0)
    u[:, :, -1] *= fix[:, None]
    out[finite] = u @ vt
    return out


def qc_measures(recon: xr.Dataset) -> QcMeasures:
    """The QC series of face 0 of a recon (or any mesh) store."""
    v = np.asarray(recon["v"].isel(face=0).values, np.float64)
    times = np.asarray(recon["time"].values, np.float64)
    detected = np.asarray(recon["detected"].isel(face=0).values, bool) if "detected" in recon else np.isfinite(v).all(axis=(1, 2))
    score = np.asarray(recon["score"].isel(face=0).values, np.float64) if "score" in recon else detected.astype(float)
    translation = rotation = np.full((len(times), 3), np.nan)
    if "mat" in recon:
        mat = np.asarray(recon["mat"].isel(face=0).values, np.float64)
        translation = mat[:, :3, 3] - np.nanmedian(mat[:, :3, 3], axis=0)
        rotations = _pure_rotations(mat[:, :3, :3])
        finite = np.isfinite(rotations).all(axis=(1, 2))
        if finite.any():
            median = _pure_rotations(np.median(rotations[finite], axis=0)[None])[0]
            rotation = rotation_vectors(rotations @ median.T)
    found = np.isfinite(v).all(axis=(1, 2))
    width = np.median(np.ptp(v[found][..., 0], axis=1)) if found.any() else np.nan
    jitter = np.full(len(times), np.nan)
    if len(times) > 2:
        middle = v[1:-1] - (v[:-2] + v[2:]) / 2
        jitter[1:-1] = 100 * np.median(np.linalg.norm(middle, axis=-1), axis=1) / width
    return QcMeasures(times, detected, score, translation, rotation, jitter, str(recon["v"].attrs.get("units", "")))


def qc_figure(measures: QcMeasures, title: str) -> bytes:
    """A PNG with four panels over time: detection score, translation, rotation, jitter."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 8), dpi=100, layout="constrained")
    axes = figure.subplots(4, 1, sharex=True)
    t = measures.times - (measures.times[0] if measures.times.size else 0)
    axes[0].plot(t, measures.score, color="black", lw=1)
    for start, stop in _runs(~measures.detected):
        axes[0].axvspan(t[start], t[stop - 1] if stop - 1 > start else t[start] + 1e-3, color="tab:red", alpha=0.3, lw=0)
    axes[0].set_ylabel("detection score")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_title(f"{title}: face found in {measures.detected_fraction:.1%} of {len(t)} frames (red: none)")
    for k, name in enumerate("xyz"):
        axes[1].plot(t, measures.translation[:, k], lw=1, label=name)
        axes[2].plot(t, measures.rotation[:, k], lw=1, label=f"about {name}")
    axes[1].set_ylabel(f"translation ({measures.units or 'units of v'})")
    axes[2].set_ylabel("rotation (deg)")
    axes[1].legend(loc="upper right", ncols=3, fontsize="small")
    axes[2].legend(loc="upper right", ncols=3, fontsize="small")
    axes[3].plot(t, measures.jitter, color="tab:purple", lw=1)
    axes[3].set_ylabel("jitter (% face width)")
    axes[3].set_xlabel("time (s)")
    for axis in axes:
        axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def qc_report(recordings: Sequence[Recording], out: Location, *, still: bool = True) -> Location:
    """Write ``<out>/qc/<recording>_qc.png`` (and ``_still.png``, the middle frame with its mesh) per
    recording with a recon store, and ``<out>/qc/index.html`` over them all; return the page."""
    from gmfx.render._api import _write_atomic, render_still
    from gmfx.render._views import ViewOptions

    folder = out.child("qc")
    rows, sections = [], []
    for recording in recordings:
        recon_location = store_location(out, recording, "recon")
        recon = open_dataset(recon_location, stage="recon")
        measures = qc_measures(recon)
        _write_atomic(folder.child(f"{recording.name}_qc.png"), qc_figure(measures, recording.name))
        images = [f"{recording.name}_qc.png"]
        frames = store_location(out, recording, "decode")
        if still and measures.detected.any() and frames.exists():
            middle = int(np.flatnonzero(measures.detected)[measures.detected.sum() // 2])
            view = ViewOptions(space="image", panels=("overlay", "original"))
            render_still(recon, folder.child(f"{recording.name}_still.png"), frame=middle, frames=frames, view=view)
            images.insert(0, f"{recording.name}_still.png")
        name = html.escape(recording.name)
        rows.append(
            f"<tr><td><a href='#{name}'>{name}</a></td><td>{len(measures.times)}</td>"
            f"<td class='{'bad' if measures.detected_fraction < 0.9 else ''}'>{measures.detected_fraction:.1%}</td>"
            f"<td>{np.nanmedian(measures.score) if measures.detected.any() else float('nan'):.2f}</td>"
            f"<td>{np.nanmax(np.abs(measures.rotation)) if np.isfinite(measures.rotation).any() else float('nan'):.1f}</td>"
            f"<td>{np.nanmedian(measures.jitter) if np.isfinite(measures.jitter).any() else float('nan'):.2f}</td></tr>"
        )
        figures = "".join(f"<img src='{html.escape(image)}' alt='{html.escape(image)}'>" for image in images)
        sections.append(f"<section id='{name}'><h2>{name}</h2><p>{html.escape(recon_location.url)}</p>{figures}</section>")
    page = _PAGE.format(
        title=html.escape(out.url),
        rows="".join(rows),
        sections="".join(sections),
    )
    target = folder.child("index.html")
    _write_atomic(target, page.encode())
    return target


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gmfx QC: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child {{ text-align: left; }} .bad {{ background: #fdd; }}
img {{ max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }}
</style></head><body>
<h1>gmfx quality control</h1><p>{title}</p>
<table><tr><th>recording</th><th>frames</th><th>face found</th><th>median score</th>
<th>max rotation from median pose (deg)</th><th>median jitter (% face width)</th></tr>{rows}</table>
{sections}
</body></html>
"""
