"""Pure face tracking: a stable ``face`` index across frames and across time segments.

Each face slot remembers where its face was last seen. The detections of a new frame are matched to
the slots by minimum total centroid distance (Hungarian algorithm); a match is allowed only when the
face moved less than its own size since it was last seen, so a face that leaves and comes back near
where it left gets its slot back. Unmatched detections take the never-used slots first (left to right
in the image), then the slots not seen in this frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from gmfx.types import Region

__all__ = ["assign_slots", "match_points", "segment_ends", "stitch_segments", "track_faces"]


def match_points(reference: np.ndarray, points: np.ndarray, max_distance: np.ndarray) -> np.ndarray:
    """Match ``points`` one-to-one to ``reference`` rows by minimum total distance.

    Parameters
    ----------
    reference
        ``(n_reference, d)`` points; NaN rows never match.
    points
        ``(n_points, d)`` points to match.
    max_distance
        ``(n_points,)`` the farthest each point may be from its match.

    Returns
    -------
    ``(n_points,)`` index of each point's reference row, -1 where it has none.
    """
    matches = np.full(len(points), -1)
    valid = np.flatnonzero(~np.isnan(reference).any(axis=1))
    if not len(valid) or not len(points):
        return matches
    distance = np.linalg.norm(points[:, None, :] - reference[None, valid, :], axis=2)
    allowed = distance <= np.asarray(max_distance)[:, None]
    if len(points) == 1:  # the common single-face case: the nearest reference point
        nearest = int(np.argmin(distance[0]))
        matches[0] = valid[nearest] if allowed[0, nearest] else -1
        return matches
    forbidden = 1e6 * (float(distance.max()) + 1.0)  # finite, so the assignment always exists
    rows, cols = linear_sum_assignment(np.where(allowed, distance, forbidden))
    keep = allowed[rows, cols]
    matches[rows[keep]] = valid[cols[keep]]
    return matches


def assign_slots(last_seen: np.ndarray, centroids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The slot of each detection.

    Parameters
    ----------
    last_seen
        ``(n_slots, d)`` last centroid of each slot, NaN rows for slots never used.
    centroids
        ``(n_detections, d)`` centroids of this frame's detections (``n_detections <= n_slots``).
    sizes
        ``(n_detections,)`` size of each face (largest extent): the farthest it may have moved.

    Returns
    -------
    ``(n_detections,)`` int slot indices, all different.
    """
    n_slots = len(last_seen)
    if len(centroids) > n_slots:
        raise ValueError(f"{len(centroids)} detections for {n_slots} face slots")
    slots = match_points(last_seen, centroids, sizes)
    used = ~np.isnan(last_seen).any(axis=1)
    taken = set(slots.tolist())
    free = [*np.flatnonzero(~used), *(slot for slot in np.flatnonzero(used) if slot not in taken)]
    unmatched = sorted(np.flatnonzero(slots < 0), key=lambda i: tuple(centroids[i]))
    for detection, slot in zip(unmatched, free):
        slots[detection] = slot
    return slots


def track_faces(centroids: Sequence[np.ndarray], sizes: Sequence[np.ndarray], max_faces: int) -> list[np.ndarray]:
    """The slot of every detection of every frame (see :func:`assign_slots`), frames in time order."""
    last_seen = np.full((max_faces, centroids[0].shape[1] if len(centroids) else 3), np.nan)
    result = []
    for frame_centroids, frame_sizes in zip(centroids, sizes):
        slots = assign_slots(last_seen, np.asarray(frame_centroids), np.asarray(frame_sizes))
        last_seen[slots] = frame_centroids
        result.append(slots)
    return result


def stitch_segments(first: Sequence[np.ndarray], last: Sequence[np.ndarray], sizes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Permutations that give independently tracked segments one shared face index.

    Parameters
    ----------
    first, last
        Per segment, ``(max_faces, d)``: each local slot's centroid in the first and the last frame
        where it was seen (NaN rows for slots the segment never used).
    sizes
        Per segment, ``(max_faces,)``: each local slot's face size (NaN when unused).

    Returns
    -------
    Per segment, ``(max_faces,)`` ints: ``perm[local] = global`` slot.
    """
    if not first:
        return []
    n_slots, dims = first[0].shape
    last_seen = np.full((n_slots, dims), np.nan)
    permutations = []
    for seg_first, seg_last, seg_sizes in zip(first, last, sizes):
        present = np.flatnonzero(~np.isnan(seg_first).any(axis=1))
        slots = assign_slots(last_seen, seg_first[present], seg_sizes[present])
        taken = set(slots.tolist())
        unused_global = [g for g in range(n_slots) if g not in taken]
        perm = np.empty(n_slots, dtype=int)
        perm[present] = slots
        perm[np.setdiff1d(np.arange(n_slots), present)] = unused_global
        last_seen[slots] = seg_last[present]
        permutations.append(perm)
    return permutations


def segment_ends(
    detected: np.ndarray, centroid: np.ndarray, size: np.ndarray, regions: Sequence[Region]
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per region and face slot: centroid where it was first and last seen, and its largest size.

    ``detected`` is ``(time, face)``, ``centroid`` ``(time, face, d)``, ``size`` ``(time, face)``;
    slots never seen in a region get NaN.
    """
    first, last, sizes = [], [], []
    for region in regions:
        seen = detected[region.slice]
        slots = np.arange(seen.shape[1])
        present = seen.any(axis=0)
        first_row = np.argmax(seen, axis=0)
        last_row = len(region) - 1 - np.argmax(seen[::-1], axis=0)
        first.append(np.where(present[:, None], centroid[region.start + first_row, slots], np.nan))
        last.append(np.where(present[:, None], centroid[region.start + last_row, slots], np.nan))
        largest = np.where(seen, size[region.slice], -np.inf).max(axis=0)
        sizes.append(np.where(present, largest, np.nan))
    return first, last, sizes
