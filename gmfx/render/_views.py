"""Views of a mesh store: what each output pixel shows, for image, world and local space.

A *mesh store* is any dataset with ``v (time, face, vertex, coord)`` and ``tris (triangle, corner)``
(recon, preproc, FLAME/BFM, generated movements); ``v.attrs["space"]`` says ``world`` (the default: the
camera's pixel space, x right, y down, z away from the camera) or ``local`` (head motion removed;
``mat (time, face, 4, 4)`` maps it to world). Preparing a view (:func:`plan_view`) reads a sample of
frames once to fix what stays constant over the video (the camera of world/local views, the colour
limits); rendering a range of frames (:func:`render_range`) is then a pure function of that range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import xarray as xr

from gmfx._errors import ParameterError, StorageError
from gmfx.render._raster import Cull, get_rasterizer
from gmfx.render._shade import Shading, shade

__all__ = ["Space", "Panel", "Stack", "Background", "ViewOptions", "ViewPlan", "plan_view", "render_range"]

Space = Literal["image", "world", "local"]
Panel = Literal["mesh", "overlay", "original"]
Stack = Literal["horizontal", "vertical"]
Background = Literal["black", "frame"]

#: frames read to fix a world/local camera and colour limits (evenly spread over the recording)
SAMPLE_FRAMES = 256
#: the mesh fills this fraction of a world/local panel's shorter side
FILL = 0.9


@dataclass(frozen=True)
class ViewOptions:
    """How a mesh store is drawn.

    Attributes
    ----------
    space
        ``image``: over the original frames (through ``mat`` for local-space stores); ``world``: face
        centred, head motion kept; ``local``: head motion removed (``inv(mat)`` for world stores).
    panels
        Left to right (or top to bottom): ``mesh`` (the reconstruction), ``overlay`` (the mesh over the
        frame at ``opacity``), ``original`` (the frame) - inferno's EMICA demo layout is all three.
    stack
        ``horizontal`` or ``vertical``.
    background
        Behind an image-space ``mesh`` panel: ``black`` or the ``frame`` (opaque overlay).
    opacity
        Of the mesh in the ``overlay`` panel; 0.5 keeps the frame's features readable through it.
    shading
        ``smooth`` (interpolated vertex normals) or ``flat`` (one normal per triangle).
    color
        Per-vertex colour map: a variable of the store with a ``vertex`` dim (and optionally ``time``,
        ``face``), ``displacement`` (distance of each vertex from its mean position in local space), or
        ``None`` (grey).
    cmap, clim
        Matplotlib colour map and its limits (default: the 2nd and 98th percentiles of the values).
    size
        ``(width, height)`` of world/local panels (default: the frames' size, else 512 x 512).
    cull
        ``back`` hides triangles facing away from the camera; ``none`` relies on depth alone.
    device
        ``cpu`` (numba) or ``cuda`` (nvdiffrast).
    """

    space: Space = "image"
    panels: tuple[Panel, ...] = ("mesh",)
    stack: Stack = "horizontal"
    background: Background = "black"
    opacity: float = 0.5
    shading: Shading = "smooth"
    color: str | None = None
    cmap: str = "viridis"
    clim: tuple[float, float] | None = None
    size: tuple[int, int] | None = None
    cull: Cull = "none"
    device: str = "cpu"

    def __post_init__(self) -> None:
        from gmfx._checks import check_choice

        for name, choices in (("space", Space), ("stack", Stack), ("background", Background), ("shading", Shading), ("cull", Cull)):
            check_choice(getattr(self, name), choices, function="ViewOptions", name=name)
        if not self.panels or any(p not in ("mesh", "overlay", "original") for p in self.panels):
            raise ParameterError(
                f"panels {self.panels!r} are not a choice of mesh, overlay, original",
                where="--panels",
                fix="give e.g. mesh,overlay,original",
            )
        if not 0 <= self.opacity <= 1:
            raise ParameterError(f"opacity {self.opacity} is outside [0, 1]", where="--opacity", fix="give 0..1")

    @property
    def needs_frames(self) -> bool:
        return self.space == "image" and self.background == "frame" or any(p != "mesh" for p in self.panels)


@dataclass(frozen=True)
class ViewPlan:
    """What :func:`plan_view` fixed for the whole video: times, topology, cameras, colours."""

    options: ViewOptions
    times: np.ndarray
    tris: np.ndarray
    store_space: str
    frame_size: tuple[int, int] | None  # (width, height) of the frames
    frame_index: np.ndarray | None  # frame shown with each mesh time (nearest in time)
    view: np.ndarray | None  # (3, 4) world/local -> panel pixels
    panel_size: tuple[int, int]
    clim: tuple[float, float] | None
    mean_local: np.ndarray | None = field(default=None, repr=False)  # (face, vertex, 3) for displacement


def _space(ds: xr.Dataset, where: str) -> str:
    if "v" not in ds or ds["v"].dims != ("time", "face", "vertex", "coord"):
        raise StorageError(
            "the store has no vertices `v (time, face, vertex, coord)` to render",
            where=where,
            fix="render a recon, preproc or model store (epochs stores: select one epoch's lags first)",
        )
    if "tris" not in ds:
        raise StorageError("the store has no triangles `tris (triangle, corner)`", where=where, fix="render a store written by gmfx recon or its successors")
    space = ds["v"].attrs.get("space", "world")
    if space not in ("world", "local"):
        raise StorageError(f"v has space={space!r}", where=where, fix="gmfx renders world or local vertices")
    return space


def _needs_mat(ds: xr.Dataset, why: str, where: str) -> None:
    if "mat" not in ds:
        raise StorageError(
            f"{why} needs `mat (time, face, 4, 4)` (local -> world), which the store lacks",
            where=where,
            fix="render a store that has mat (recon, preproc), or choose another --space",
        )


def _apply(mat: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``mat (..., 4, 4)`` applied to ``points (..., V, 3)``."""
    return np.einsum("...ij,...vj->...vi", mat[..., :3, :3], points) + mat[..., None, :3, 3]


def world_and_local(v: np.ndarray, mat: np.ndarray | None, store_space: str, want: str) -> np.ndarray:
    """Vertices of ``(n, face, V, 3)`` in ``want`` space (``world`` or ``local``)."""
    if want == store_space:
        return v
    with np.errstate(invalid="ignore"):
        if want == "world":
            return _apply(mat, v)
        finite = np.isfinite(mat).all(axis=(-2, -1))
        inverse = np.full_like(mat, np.nan)
        inverse[finite] = np.linalg.inv(mat[finite])
        return _apply(inverse, v)


def _sample(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_FRAMES)).round().astype(int))


def _color_values(ds: xr.Dataset, name: str, time: slice | np.ndarray, n_faces: int) -> xr.DataArray:
    """The colour variable as ``(time, face, vertex)`` for ``time`` (static variables broadcast)."""
    if name not in ds:
        raise ParameterError(
            f"the store has no variable {name!r} to colour the vertices by",
            where="--color",
            fix="give a variable with a vertex dim (" + ", ".join(k for k in ds.data_vars if "vertex" in ds[k].dims) + ") or displacement",
        )
    values = ds[name]
    extra = set(values.dims) - {"time", "face", "vertex"}
    if "vertex" not in values.dims or extra:
        raise ParameterError(
            f"variable {name!r} has dims {values.dims}: a colour map needs (vertex), (time, vertex) or (time, face, vertex)",
            where="--color",
            fix=f"select the other dims first (e.g. ds[{name!r}].sel(...)) and assign it to the dataset",
        )
    if "time" in values.dims:
        values = values.isel(time=time)
    return values.transpose(*[d for d in ("time", "face", "vertex") if d in values.dims])


def plan_view(ds: xr.Dataset, options: ViewOptions, frames: xr.Dataset | None = None, *, where: str = "the mesh store") -> ViewPlan:
    """Fix what stays constant over the video of ``ds`` drawn as ``options`` say (reads a sample of frames)."""
    store_space = _space(ds, where)
    times = np.asarray(ds["time"].values, np.float64)
    if options.space == "image" and store_space == "local" or options.space == "local" and store_space == "world":
        _needs_mat(ds, f"a {options.space}-space view of {store_space}-space vertices", where)
    frame_size = frame_index = None
    if frames is not None:
        _, height, width, _ = frames["frames"].shape
        frame_size = (width, height)
        frame_times = np.asarray(frames["time"].values, np.float64)
        right = np.clip(np.searchsorted(frame_times, times), 1, len(frame_times) - 1) if len(frame_times) > 1 else np.zeros(len(times), int)
        left = np.maximum(right - 1, 0)
        frame_index = np.where(np.abs(frame_times[left] - times) <= np.abs(frame_times[right] - times), left, right)
    elif options.needs_frames:
        raise ParameterError(
            "this view shows the original frames, but no frames store was given",
            where="--panels / --background",
            fix="give the frames store (gmfx decode writes it), or draw only the mesh panel with --space world or local",
        )
    elif options.space == "image":
        raise ParameterError(
            "an image-space view needs the frames' size: no frames store was given",
            where="--space image",
            fix="give the frames store, or use --space world or local",
        )
    sample = _sample(len(times))
    v = np.asarray(ds["v"].isel(time=sample).values, np.float32)
    mat = np.asarray(ds["mat"].isel(time=sample).values, np.float64) if "mat" in ds else None
    panel_size = options.size or frame_size or (512, 512)
    view = None
    if options.space != "image":
        points = world_and_local(v, mat, store_space, options.space)
        linear = np.eye(3)
        if options.space == "local" and mat is not None:  # look at the face as the camera saw it on average
            linear = np.nanmedian(mat[..., :3, :3].reshape(-1, 3, 3), axis=0)
        view = _fit_camera(points.reshape(-1, 3) @ linear.T, panel_size, where)
        view[:, :3] = view[:, :3] @ linear
    mean_local = None
    if options.color == "displacement":
        mean_local = np.nanmean(world_and_local(v, mat, store_space, "local") if mat is not None or store_space == "local" else v, axis=0)
    clim = options.clim
    if options.color is not None and clim is None:
        if options.color == "displacement":
            local = world_and_local(v, mat, store_space, "local") if mat is not None or store_space == "local" else v
            values = np.linalg.norm(local - mean_local, axis=-1)
        else:
            values = np.asarray(_color_values(ds, options.color, sample, ds.sizes["face"]).values)
        finite = values[np.isfinite(values)]
        low, high = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        clim = (float(low), float(high) if high > low else float(low) + 1.0)
    elif options.color is not None and options.color != "displacement":
        _color_values(ds, options.color, slice(0, 1), ds.sizes["face"])  # fail now on a bad variable
    return ViewPlan(
        options=options,
        times=times,
        tris=np.asarray(ds["tris"].values, np.int32),
        store_space=store_space,
        frame_size=frame_size,
        frame_index=frame_index,
        view=view,
        panel_size=panel_size,
        clim=clim,
        mean_local=mean_local,
    )


def _fit_camera(points: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    """``(3, 4)`` scale + shift putting ``points``' x/y bounding box in the middle :data:`FILL` of ``size``."""
    finite = points[np.isfinite(points).all(axis=1)]
    if not finite.size:
        raise StorageError("no frame of the store has a face to render", where=where, fix="check the reconstruction (detected is False everywhere)")
    low, high = finite.min(axis=0), finite.max(axis=0)
    extent = np.maximum(high - low, 1e-9)
    scale = FILL * min(size[0] / extent[0], size[1] / extent[1])
    centre = (low + high) / 2
    shift = np.array([size[0] / 2, size[1] / 2, 0.0]) - scale * centre
    return np.concatenate([np.eye(3) * scale, shift[:, None]], axis=1)


def _colors(plan: ViewPlan, ds_range: xr.Dataset, local: np.ndarray | None) -> np.ndarray | None:
    """Per-vertex RGB ``(n, face, V, 3)`` of the colour map, or None."""
    options = plan.options
    if options.color is None:
        return None
    import matplotlib

    n, n_faces, n_vertices = ds_range.sizes["time"], ds_range.sizes["face"], ds_range.sizes["vertex"]
    if options.color == "displacement":
        values = np.linalg.norm(local - plan.mean_local, axis=-1)
    else:
        array = _color_values(ds_range, options.color, slice(None), n_faces)
        values = np.asarray(array.values, np.float64)
        if "time" not in array.dims:
            values = values[None]
        if "face" not in array.dims:
            values = values[:, None]
        values = np.broadcast_to(values, (n, n_faces, n_vertices))
    low, high = plan.clim
    cmap = matplotlib.colormaps[options.cmap]
    rgba = cmap(np.clip((values - low) / (high - low), 0, 1))
    rgb = rgba[..., :3].astype(np.float32)
    rgb[~np.isfinite(values)] = 0.5
    return rgb


def render_range(plan: ViewPlan, ds_range: xr.Dataset, frames: np.ndarray | None) -> np.ndarray:
    """Draw the frames of ``ds_range`` (a time slice of the planned store) as ``(n, H, W, 3)`` uint8.

    ``frames`` holds the original frame shown with each mesh time (``plan.frame_index``), when the
    view needs them.
    """
    options = plan.options
    v = np.asarray(ds_range["v"].values, np.float32)
    mat = np.asarray(ds_range["mat"].values, np.float64) if "mat" in ds_range else None
    n, n_faces, n_vertices, _ = v.shape
    if options.space == "image":
        points = world_and_local(v, mat, plan.store_space, "world")
        width, height = plan.frame_size
    else:
        points = _apply(plan.view, world_and_local(v, mat, plan.store_space, options.space))
        width, height = plan.panel_size
    local = None
    if options.color == "displacement":
        local = world_and_local(v, mat, plan.store_space, "local") if mat is not None or plan.store_space == "local" else v
    colors = _colors(plan, ds_range, local)
    # every face is one part of a single mesh
    tris = (plan.tris[None] + n_vertices * np.arange(n_faces)[:, None, None]).reshape(-1, 3)
    flat_points = points.reshape(n, n_faces * n_vertices, 3).astype(np.float32)
    raster = get_rasterizer(options.device).rasterize(flat_points, tris, width=width, height=height, cull=options.cull)
    rgb = shade(
        raster,
        flat_points,
        tris,
        colors=None if colors is None else colors.reshape(n, n_faces * n_vertices, 3),
        shading=options.shading,
    )
    mask = raster.mask[..., None]
    mesh = (rgb * 255 + 0.5).astype(np.uint8)  # rounds: rgb is in [0, 1]
    panels = []
    for panel in options.panels:
        if panel == "original":
            panels.append(frames)
        elif panel == "overlay":
            if options.space == "image":
                blend = frames.copy()
                covered = raster.mask
                mix = (1 - options.opacity) * frames[covered] + options.opacity * mesh[covered].astype(np.float32)
                blend[covered] = (mix + 0.5).astype(np.uint8)
                panels.append(blend)
            else:  # the overlay is always in image space
                image = render_range(_image_plan(plan), ds_range, frames)
                panels.append(image)
        else:
            behind = frames if options.space == "image" and options.background == "frame" else np.zeros_like(mesh)
            panels.append(np.where(mask, mesh, behind))
    return _even(_stack(panels, options.stack))


def _image_plan(plan: ViewPlan) -> ViewPlan:
    """The plan of the image-space overlay panel that goes with a world/local view."""
    from dataclasses import replace

    return replace(plan, options=replace(plan.options, space="image", panels=("overlay",)))


def _stack(panels: Sequence[np.ndarray], stack: Stack) -> np.ndarray:
    """Panels ``(n, h_k, w_k, 3)`` side by side (or one above the other), padded with black."""
    if len(panels) == 1:
        return panels[0]
    axis = 2 if stack == "horizontal" else 1
    other = 1 if axis == 2 else 2
    size = max(p.shape[other] for p in panels)
    padded = []
    for p in panels:
        pad = [(0, 0)] * 4
        pad[other] = (0, size - p.shape[other])
        padded.append(np.pad(p, pad))
    return np.concatenate(padded, axis=axis)


def _even(images: np.ndarray) -> np.ndarray:
    """Pad to even height and width (H.264 with 4:2:0 chroma needs them)."""
    _, height, width, _ = images.shape
    if height % 2 == 0 and width % 2 == 0:
        return images
    return np.pad(images, [(0, 0), (0, height % 2), (0, width % 2), (0, 0)])
