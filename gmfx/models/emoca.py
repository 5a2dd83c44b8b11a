"""EMOCA (v1 and v2) as gmfx backends: DECA's coarse model plus EMOCA's expression encoder.

An EMOCA model folder (``EMOCA/<name>/`` in the model directory: ``cfg.yaml`` + a tree of Lightning
``*.ckpt`` files) holds DECA's encoder (``deca.E_flame.*``) and a second ResNet-50 encoder
(``deca.E_expression.*``) whose output replaces DECA's 50 expression numbers, and, when
``cfg.yaml`` says ``exp_deca_jaw_pose``/``exp_deca_global_pose``, the jaw and/or global pose too
(then 53 or 56 outputs; with both, global then jaw). The checkpoint used is the one whose name ends
with the smallest number after its last ``=`` (the best validation loss, as EMOCA's loader picks).
v1 and v2 differ in training only, so one backend reads both; ``emoca`` uses the folder
``EMOCA_v2_lr_mse_20`` (EMOCA's default) and ``emoca_v1`` the folder ``EMOCA``; the ``checkpoint``
option names another folder.

The checkpoint is read through gmfx's restricted unpickler (Lightning stores its callbacks as
classes, which become inert records); other modules' weights (detail networks, FLAME buffers,
losses) are ignored, while both encoders load strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import yaml

from gmfx._errors import ModelError
from gmfx.models._files import ModelFile, find_model_file, read_model_file
from gmfx.models._files import model_dir as resolve_model_dir
from gmfx.models._pickle import load_torch
from gmfx.models._resnet import ResNetEncoder, load_strict
from gmfx.models.deca import DECA_CODES, adopt_model_dir, FLAME_FILE, FLAME_MASKS_FILE, LANDMARK_FILE, DecaBackend, split_deca_code
from gmfx.storage import Location

__all__ = ["EmocaBackend", "EmocaV1Backend", "best_checkpoint", "emoca_files"]

_OBTAIN = (
    "register at https://emoca.is.tue.mpg.de, download the model zip named in "
    "gdl_apps/EMOCA/demos/download_assets.sh of https://github.com/radekd91/emoca and unzip it under EMOCA/"
)


def emoca_files(folder: str) -> tuple[ModelFile, ModelFile]:
    """The ``cfg.yaml`` and checkpoint entries of the EMOCA model folder ``EMOCA/<folder>``."""
    return (
        ModelFile(f"emoca_cfg:{folder}", (f"EMOCA/{folder}/cfg.yaml",), f"EMOCA configuration ({folder})", _OBTAIN),
        ModelFile(f"emoca_ckpt:{folder}", (f"EMOCA/{folder}/**/*.ckpt",), f"EMOCA checkpoint ({folder})", _OBTAIN),
    )


def best_checkpoint(urls: list[str]) -> str:
    """The checkpoint whose file stem ends with the smallest number after its last ``=`` (else the first by name)."""

    def score(url: str) -> tuple[float, str]:
        stem = url.rsplit("/", 1)[-1].removesuffix(".ckpt")
        match = re.search(r"=([-+0-9.eE]+)$", stem)
        try:
            return (float(match.group(1)) if match else float("inf"), url)
        except ValueError:
            return (float("inf"), url)

    return min(urls, key=score)


class EmocaBackend(DecaBackend):
    """EMOCA v2 (``EMOCA_v2_lr_mse_20``); options as :class:`~gmfx.models.deca.DecaBackend` plus
    ``checkpoint`` (another folder name under ``EMOCA/``)."""

    name = "emoca"
    version = "emoca-v2-flame2020"
    default_folder: ClassVar[str] = "EMOCA_v2_lr_mse_20"
    model_files: ClassVar[tuple[ModelFile, ...]] = (FLAME_FILE, LANDMARK_FILE, *emoca_files("EMOCA_v2_lr_mse_20"), FLAME_MASKS_FILE)

    def __init__(self, encoder: torch.nn.Module, expression: torch.nn.Module, config: Mapping[str, bool], flame, device: str, **options: Any) -> None:
        super().__init__(encoder, flame, device, **options)
        self.expression_encoder = self._on_device(expression)
        self.jaw_from_expression = bool(config["jaw"])
        self.global_from_expression = bool(config["global"])

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        attrs = super().attrs(**{k: v for k, v in options.items() if k != "checkpoint"})
        return {**attrs, "emoca_folder": options.get("checkpoint") or cls.default_folder}

    @classmethod
    def load(cls, device: str, **options: Any) -> EmocaBackend:
        folder = options.pop("checkpoint", None) or cls.default_folder
        checked = cls._check_options(**options)
        root = resolve_model_dir(checked.pop("model_dir"))
        adopt_model_dir(root)
        encoder, expression, config = cls._load_emoca(root, folder)
        return cls(encoder, expression, config, cls._flame_layer(root), device, **checked)

    @classmethod
    def _load_emoca(cls, root: Location, folder: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, bool]]:
        cfg_file, ckpt_file = emoca_files(folder)
        text, cfg_where = read_model_file(root, cfg_file)
        config = _expression_config(text, cfg_where)
        if find_model_file(root, ckpt_file) is None:
            read_model_file(root, ckpt_file)  # raises the missing-file error, saying where to get it
        fs, base = root.filesystem()
        candidates = sorted(fs.glob(f"{base.rstrip('/')}/{ckpt_file.paths[0]}"))
        chosen = best_checkpoint(candidates)
        with fs.open(chosen, "rb") as handle:
            checkpoint = load_torch(handle.read(), where=chosen, lightning=True)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping):
            raise ModelError("the EMOCA checkpoint has no 'state_dict'", where=chosen, fix="use the checkpoint of the EMOCA model zip")
        encoder = ResNetEncoder(sum(DECA_CODES.values()))
        load_strict(encoder, _prefixed(state, "deca.E_flame.", chosen), where=f"{chosen} [deca.E_flame]")
        expression_state = _prefixed(state, "deca.E_expression.", chosen)
        n_outputs = DECA_CODES["exp"] + 3 * (config["jaw"] + config["global"])
        found = tuple(expression_state.get("layers.2.weight", torch.empty(0)).shape[:1])
        if found != (n_outputs,):
            raise ModelError(
                f"the expression encoder has {found[0] if found else 'no'} outputs, but cfg.yaml implies {n_outputs} "
                f"(exp_deca_jaw_pose={config['jaw']}, exp_deca_global_pose={config['global']})",
                where=chosen,
                fix="keep cfg.yaml and the checkpoint of one EMOCA model folder together",
            )
        expression = ResNetEncoder(n_outputs)
        load_strict(expression, expression_state, where=f"{chosen} [deca.E_expression]")
        return encoder, expression, config

    def encode(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        codes = split_deca_code(self._run_encoder(self.encoder, crops))
        expression = self._run_encoder(self.expression_encoder, crops)
        n_exp = DECA_CODES["exp"]
        codes["exp"] = expression[:, :n_exp]
        extra = expression[:, n_exp:]
        global_pose, jaw = codes["pose"][:, :3], codes["pose"][:, 3:]
        if self.global_from_expression:
            global_pose, extra = extra[:, :3], extra[:, 3:]
        if self.jaw_from_expression:
            jaw = extra[:, :3]
        codes["pose"] = torch.cat([global_pose, jaw], dim=1)
        return codes


class EmocaV1Backend(EmocaBackend):
    """EMOCA v1 (the folder ``EMOCA``)."""

    name = "emoca_v1"
    version = "emoca-v1-flame2020"
    default_folder = "EMOCA"
    model_files = (FLAME_FILE, LANDMARK_FILE, *emoca_files("EMOCA"), FLAME_MASKS_FILE)


def _prefixed(state: Mapping[str, Any], prefix: str, where: str) -> dict[str, Any]:
    selected = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not selected:
        raise ModelError(f"the checkpoint holds no {prefix}* weights", where=where, fix="use the checkpoint of an EMOCA model zip")
    return selected


def _expression_config(text: bytes, where: str) -> dict[str, bool]:
    try:
        cfg = yaml.safe_load(text)
        model = cfg["coarse"]["model"] if "coarse" in cfg else cfg["model"]
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise ModelError(
            f"cfg.yaml has no coarse model settings ({type(error).__name__}: {error})",
            where=where,
            fix="use the cfg.yaml of the EMOCA model zip",
        ) from None
    return {"jaw": bool(model.get("exp_deca_jaw_pose", False)), "global": bool(model.get("exp_deca_global_pose", False))}
