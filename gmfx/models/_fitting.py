"""3DMM fitting as pure torch functions: the losses, one optimisation stage, and the video schedule.

After 3DMM-Fitting-Pytorch (reference sections D.3-D.4), model-agnostic: a *decoder* turns coefficients
(``id``, ``exp``, ``tex``, ``angle``, ``gamma``, ``trans``) into :class:`Decoded` (68 landmarks and
the shaded mesh in crop pixels); :mod:`gmfx.models.bfm_fit` supplies the BFM one.

Losses, per frame (so every frame's fit can be checked on its own):
    ``landmark`` = ``sum_k w_k |(p_k - q_k) / size|^2`` with the weights of :func:`landmark_weights`;
    ``photometric`` = mean over the rendered pixels of the RGB distance ``|render - image|`` (colours in
    ``[0, 1]``, i.e. the reference's distance / 255); ``reflectance`` = variance of the albedo
    (``[0, 1]``) over the skin vertices; ``regulariser`` = ``w_id |id|^2 + w_exp |exp|^2 + w_tex |tex|^2``;
    ``pose`` = ``w_rot |angle - angle_prev|^2 + w_trans |trans - trans_prev|^2`` toward the *previous*
    frame (the reference pulls every frame toward the first one, its quirk (a)). The optimised total is
    the batch mean of ``w_lm landmark + w_photo photometric + w_refl reflectance + regulariser + pose``.

Video schedule (:func:`fit_video`), batched over the frames of a batch instead of one frame after the
other: the segment's first frame gets the full schedule (rigid 1000 + non-rigid 500 iterations by
default, as the reference's first frame); then every batch of frames starts from the last fitted frame
(warm start) and is optimised jointly, 50 rigid + 30 non-rigid iterations (the reference's per-frame
``rest_*_iters``), with the pose term chaining each frame to the one before it (the first to the previous
batch's last frame, held fixed). Identity (``id``, ``tex``) comes from :func:`fit_identity` and stays
fixed, so it cannot drift (the reference's quirk (b)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from gmfx._errors import ModelError

__all__ = [
    "CODE_SIZES",
    "LOSS_TERMS",
    "Decoded",
    "FitOptions",
    "Targets",
    "fit_identity",
    "fit_video",
    "frame_losses",
    "landmark_loss",
    "landmark_weights",
    "photometric_loss",
    "pose_loss",
    "reflectance_loss",
    "run_stage",
]

#: the 257 coefficients of Deep3D and 3DMM fitting, in their order
CODE_SIZES = {"id": 80, "exp": 64, "tex": 80, "angle": 3, "gamma": 27, "trans": 3}
#: codes fitted once per face (identity pass) and per frame
IDENTITY_CODES = ("id", "tex")
FRAME_CODES = ("exp", "angle", "gamma", "trans")
#: per-frame QC values stored with every fit (``landmark_px``: RMS landmark distance in frame pixels)
LOSS_TERMS = ("landmark_px", "landmark", "photometric", "reflectance", "regulariser", "pose", "total")
#: 0-based iBUG ids weighted 10 (nose ridge 28-30 and the mouth 48-67), the rest 1 (reference D.3)
HEAVY_LANDMARKS = (28, 29, 30, *range(48, 68))


@dataclass(frozen=True)
class FitOptions:
    """Weights, iteration counts and learning rates; defaults from 3DMM-Fitting-Pytorch (D.3, D.4).

    ``first_*_iterations``: identity pass and each segment's first frame (reference: 1000 + 500);
    ``rigid_iterations``/``nonrigid_iterations``: every later frame (reference video defaults 50 + 30).
    ``photometric=False`` fits landmarks and priors only (no rasterizer).
    """

    first_rigid_iterations: int = 1000
    first_nonrigid_iterations: int = 500
    rigid_iterations: int = 50
    nonrigid_iterations: int = 30
    rigid_lr: float = 1e-2
    nonrigid_lr: float = 1e-2
    landmark_weight: float = 100.0
    id_weight: float = 1e-3
    exp_weight: float = 0.8e-3
    tex_weight: float = 1.7e-6
    reflectance_weight: float = 1.0
    photometric_weight: float = 1.6
    rotation_weight: float = 1.0
    translation_weight: float = 1.0
    photometric: bool = True

    @classmethod
    def from_options(cls, **options: Any) -> FitOptions:
        """Checked options (numbers from the command line arrive as int, float or bool)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name not in known:
                raise TypeError(f"unknown option {name!r}")
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, not {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
            values[name] = type(default)(value)
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Decoded:
    """A decoder's output for ``B`` frames.

    ``landmarks`` ``(B, 68, 2)`` and ``vertices`` ``(B, V, 3)``: x, y in crop pixels (x right, y down,
    pixel centres at integers), z a depth growing away from the camera; ``colours`` ``(B, V, 3)``
    shaded, ``albedo`` ``(B, V, 3)``, both in ``[0, 1]``.
    """

    landmarks: torch.Tensor
    vertices: torch.Tensor
    colours: torch.Tensor
    albedo: torch.Tensor


#: coefficients, whether colours are needed (the photometric term) -> :class:`Decoded`
Decoder = Callable[[Mapping[str, torch.Tensor], bool], Decoded]


@dataclass(frozen=True, eq=False)
class Targets:
    """What ``B`` frames are fitted to: ``landmarks`` ``(B, 68, 2)`` crop pixels and, for the
    photometric term, the crops ``images`` ``(B, size, size, 3)`` in ``[0, 1]``."""

    landmarks: torch.Tensor
    size: int
    images: torch.Tensor | None = None

    def select(self, rows: slice | torch.Tensor) -> Targets:
        return Targets(self.landmarks[rows], self.size, None if self.images is None else self.images[rows])


def landmark_weights(n: int = 68) -> torch.Tensor:
    """``(68,)`` weights summing to 1: 10 for the nose ridge and the mouth, 1 elsewhere (D.3)."""
    weights = torch.ones(n, dtype=torch.float64)
    weights[list(HEAVY_LANDMARKS)] = 10.0
    return weights / weights.sum()


def landmark_loss(predicted: torch.Tensor, target: torch.Tensor, size: int) -> torch.Tensor:
    """``(B,)`` weighted squared landmark distances in units of the crop size."""
    weights = landmark_weights(predicted.shape[1]).to(predicted)
    return (((predicted - target) / size) ** 2).sum(dim=-1) @ weights


def photometric_loss(rendered: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean RGB distance over each frame's rendered pixels (``mask`` ``(B, H, W)``; 0 when empty)."""
    distance = torch.sqrt(((rendered - images) ** 2).sum(dim=-1) + 1e-12)
    weight = mask.to(distance.dtype)
    return (distance * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1)


def reflectance_loss(albedo: torch.Tensor, skin: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` variance of the albedo over the skin vertices (``skin`` ``(V,)`` 0/1; all when ``None``)."""
    weight = torch.ones(albedo.shape[1], dtype=albedo.dtype, device=albedo.device) if skin is None else skin.to(albedo)
    mean = (albedo * weight[:, None]).sum(dim=1, keepdim=True) / weight.sum()
    return (((albedo - mean) ** 2).sum(dim=-1) * weight).sum(dim=1) / weight.sum()


def pose_loss(angle: torch.Tensor, trans: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None, options: FitOptions) -> torch.Tensor:
    """``(B,)`` pose term toward the previous frame: frame ``b`` toward ``b - 1``, frame 0 toward
    ``previous`` (fixed; no term without it)."""
    if previous is None:  # frame 0 has no predecessor: compare it with itself (a zero term)
        previous = (angle[:1].detach(), trans[:1].detach())
    before_angle = torch.cat([previous[0].reshape(1, 3).to(angle), angle[:-1]])
    before_trans = torch.cat([previous[1].reshape(1, 3).to(trans), trans[:-1]])
    return options.rotation_weight * ((angle - before_angle) ** 2).sum(-1) + options.translation_weight * ((trans - before_trans) ** 2).sum(-1)


class Renderer:
    """Rasterizes the decoded meshes (no gradient) and interpolates their colours (with gradients)
    through :mod:`gmfx.render`: the numba z-buffer on CPU, nvdiffrast on CUDA. All frames of a batch
    go through one :func:`~gmfx.render.interpolate` call, laid side by side in one wide image."""

    def __init__(self, triangles: np.ndarray, device: torch.device) -> None:
        from gmfx.render import get_rasterizer

        self.triangles = np.ascontiguousarray(triangles, np.int32)
        self._tris = torch.as_tensor(self.triangles, dtype=torch.long, device=device)
        self._rasterizer = get_rasterizer("cpu" if device.type == "cpu" else str(device))

    def __call__(self, vertices: torch.Tensor, colours: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, size, size, 3)`` rendered colours and ``(B, size, size)`` coverage of ``vertices`` (crop pixels)."""
        from gmfx.render import interpolate

        n, count = vertices.shape[:2]
        raster_xyz = vertices.detach().to(torch.float32).cpu().numpy().copy()
        raster_xyz[..., :2] += 0.5  # the rasterizer's pixel centres are at j + 0.5
        triangle = self._rasterizer.rasterize(raster_xyz, self.triangles, width=size, height=size).triangle
        shift = torch.arange(n, device=vertices.device, dtype=vertices.dtype)[:, None] * size
        side_by_side = torch.stack([vertices[..., 0] + 0.5 + shift, vertices[..., 1] + 0.5], dim=-1).reshape(n * count, 2)
        tris = (self._tris[None] + torch.arange(n, device=vertices.device)[:, None, None] * count).reshape(-1, 3)
        ids = np.where(triangle >= 0, triangle + np.arange(n)[:, None, None] * len(self.triangles), -1)
        wide = np.ascontiguousarray(ids.transpose(1, 0, 2).reshape(size, n * size))
        image = interpolate(colours.reshape(n * count, 3), side_by_side, tris, wide)
        rendered = image.reshape(size, n, size, 3).permute(1, 0, 2, 3)
        return rendered, torch.as_tensor(triangle >= 0, device=vertices.device)


def frame_losses(
    decoded: Decoded,
    params: Mapping[str, torch.Tensor],
    targets: Targets,
    options: FitOptions,
    *,
    photometric: bool,
    renderer: Renderer | None = None,
    skin: torch.Tensor | None = None,
    chain: bool = True,
    previous: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every term of :data:`LOSS_TERMS` but ``landmark_px``, per frame ``(B,)`` (unweighted except
    ``regulariser``, ``pose`` and ``total``)."""
    n = decoded.landmarks.shape[0]
    zero = decoded.landmarks.new_zeros(n)
    terms = {"landmark": landmark_loss(decoded.landmarks, targets.landmarks, targets.size)}
    if photometric:
        if renderer is None or targets.images is None:
            raise ModelError("the photometric term needs the crops and a renderer", where="frame_losses", fix="pass images and renderer")
        rendered, mask = renderer(decoded.vertices, decoded.colours, targets.size)
        terms["photometric"] = photometric_loss(rendered, targets.images, mask)
        terms["reflectance"] = reflectance_loss(decoded.albedo, skin)
    else:
        terms["photometric"] = terms["reflectance"] = zero
    squares = {name: (params[name] ** 2).sum(-1).expand(n) for name in ("id", "exp", "tex")}
    terms["regulariser"] = options.id_weight * squares["id"] + options.exp_weight * squares["exp"] + options.tex_weight * squares["tex"]
    terms["pose"] = pose_loss(params["angle"], params["trans"], previous, options) if chain else zero
    terms["total"] = (
        options.landmark_weight * terms["landmark"]
        + options.photometric_weight * terms["photometric"]
        + options.reflectance_weight * terms["reflectance"]
        + terms["regulariser"]
        + terms["pose"]
    )
    return terms


class Adam:
    """Adam (Kingma & Ba 2015) with torch's defaults (betas 0.9, 0.999, eps 1e-8, bias correction),
    on a few tensors. The update of ``torch.optim.Adam``, written out: importing ``torch.optim`` loads
    ``torch._dynamo``, 6 s per worker process on the test machine, more than a whole segment's fit."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.first = [torch.zeros_like(p) for p in params]
        self.second = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        for param, first, second in zip(self.params, self.first, self.second):
            if param.grad is None:
                continue
            first.mul_(beta1).add_(param.grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denominator = (second / correction2).sqrt_().add_(self.eps)
            param.addcdiv_(first, denominator, value=-self.lr / correction1)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


def run_stage(
    decoder: Decoder,
    params: dict[str, torch.Tensor],
    free: tuple[str, ...],
    targets: Targets,
    options: FitOptions,
    *,
    iterations: int,
    lr: float,
    photometric: bool,
    renderer: Renderer | None = None,
    skin: torch.Tensor | None = None,
    chain: bool = True,
    previous: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``iterations`` Adam steps on the ``free`` entries of ``params`` (updated in place), minimising
    the batch mean of :func:`frame_losses`' ``total`` (landmarks only in a rigid stage: pass
    ``photometric=False`` and leave the priors out of ``free``)."""
    if iterations == 0 or not free:
        return
    leaves = {name: params[name].detach().clone().requires_grad_(True) for name in free}
    optimiser = Adam(list(leaves.values()), lr=lr)
    for _ in range(iterations):
        optimiser.zero_grad()
        current = {**params, **leaves}
        total = frame_losses(decoder(current, photometric), current, targets, options, photometric=photometric, renderer=renderer, skin=skin,
                             chain=chain, previous=previous)["total"]
        total.mean().backward()
        optimiser.step()
    for name, leaf in leaves.items():
        params[name] = leaf.detach()


def initial_params(n: int, *, sizes: Mapping[str, int] = CODE_SIZES, identity: Mapping[str, torch.Tensor] | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zero coefficients (``sizes``) for ``n`` frames; ``id`` and ``tex`` are ``(1, k)`` (shared) or ``identity``'s."""
    params = {name: torch.zeros((1 if name in IDENTITY_CODES else n, size), device=device, dtype=dtype) for name, size in sizes.items()}
    for name, value in (identity or {}).items():
        params[name] = torch.as_tensor(value, dtype=dtype, device=device).reshape(1, -1)
    return params


def _schedule(decoder: Decoder, params: dict[str, torch.Tensor], targets: Targets, options: FitOptions, *, rigid: int, nonrigid: int,
              nonrigid_free: tuple[str, ...], renderer: Renderer | None, skin: torch.Tensor | None,
              chain: bool, previous: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rigid stage (landmarks, pose), then the non-rigid one; the final per-frame losses."""
    photometric = options.photometric and renderer is not None
    run_stage(decoder, params, ("angle", "trans"), targets, options, iterations=rigid, lr=options.rigid_lr, photometric=False,
              chain=chain, previous=previous)
    run_stage(decoder, params, nonrigid_free, targets, options, iterations=nonrigid, lr=options.nonrigid_lr, photometric=photometric,
              renderer=renderer, skin=skin, chain=chain, previous=previous)
    with torch.no_grad():
        return frame_losses(decoder(params, photometric), params, targets, options, photometric=photometric, renderer=renderer, skin=skin,
                            chain=chain, previous=previous)


def fit_identity(decoder: Decoder, targets: Targets, options: FitOptions, *, sizes: Mapping[str, int] = CODE_SIZES,
                 renderer: Renderer | None = None, skin: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One ``id`` and ``tex`` shared by the ``B`` frames of ``targets`` (and per-frame ``exp``, pose,
    ``gamma``), with the full schedule; returns the coefficients and the per-frame losses."""
    n = targets.landmarks.shape[0]
    params = initial_params(n, sizes=sizes, device=targets.landmarks.device)
    losses = _schedule(decoder, params, targets, options, rigid=options.first_rigid_iterations, nonrigid=options.first_nonrigid_iterations,
                       nonrigid_free=tuple(sizes), renderer=renderer, skin=skin, chain=False, previous=None)
    return params, losses


def fit_video(decoder: Decoder, targets: Targets, identity: Mapping[str, torch.Tensor], options: FitOptions, *,
              sizes: Mapping[str, int] = CODE_SIZES, start: Mapping[str, torch.Tensor] | None = None, renderer: Renderer | None = None,
              skin: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-frame ``exp``, ``angle``, ``gamma``, ``trans`` of ``B`` consecutive frames of one face, with
    ``identity`` (``id``, ``tex``) fixed.

    ``start`` is the previous frame's fit (``exp``, ``angle``, ``gamma``, ``trans`` of shape ``(1, k)``):
    every frame starts from it and the first frame's pose is pulled toward it. Without ``start`` (a
    segment's first frame with this face) the first frame is fitted alone with the ``first_*``
    iteration counts, and the others start from it. Returns coefficients ``(B, k)`` and losses ``(B,)``.
    """
    n = targets.landmarks.shape[0]
    device = targets.landmarks.device
    pieces: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    first = 0
    if start is None:
        params = initial_params(1, sizes=sizes, identity=identity, device=device)
        losses = _schedule(decoder, params, targets.select(slice(0, 1)), options, rigid=options.first_rigid_iterations,
                           nonrigid=options.first_nonrigid_iterations, nonrigid_free=FRAME_CODES, renderer=renderer, skin=skin, chain=True,
                           previous=None)
        pieces.append((params, losses))
        start = {name: params[name] for name in FRAME_CODES}
        first = 1
    if first < n:
        rest = targets.select(slice(first, n))
        params = initial_params(n - first, sizes=sizes, identity=identity, device=device)
        for name in FRAME_CODES:
            params[name] = torch.as_tensor(start[name]).to(device).reshape(1, -1).expand(n - first, -1).clone()
        previous = (torch.as_tensor(start["angle"]).reshape(1, 3), torch.as_tensor(start["trans"]).reshape(1, 3))
        losses = _schedule(decoder, params, rest, options, rigid=options.rigid_iterations, nonrigid=options.nonrigid_iterations,
                           nonrigid_free=FRAME_CODES, renderer=renderer, skin=skin, chain=True, previous=previous)
        pieces.append((params, losses))
    params = {name: torch.cat([p[name] for p, _ in pieces]) for name in FRAME_CODES}
    params.update({name: pieces[0][0][name] for name in IDENTITY_CODES})
    losses = {name: torch.cat([loss[name] for _, loss in pieces]) for name in pieces[0][1]}
    return params, losses
