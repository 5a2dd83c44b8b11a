"""MICA's and EMICA's files in their official layouts, with random values (see :mod:`._model_files`).

* :func:`write_mica_tar`: MICA's ``mica.tar`` (``torch.save`` of ``{'arcface': ..., 'flameModel': ...}``;
  ``flameModel`` holds the mapping network ``regressor.*`` and FLAME 2020 buffers ``generator.*``);
* :func:`write_emica_model`: an EMICA model folder as inferno's ``FaceReconstruction`` zip lays it out
  (``cfg.yaml`` with ``model.face_encoder`` + ``checkpoints/*.ckpt``, a Lightning checkpoint whose
  ``state_dict`` holds ``face_encoder.mica_deca_encoder.mica_encoder.E_mica.{arcface,flameModel.regressor}.*``,
  ``face_encoder.mica_deca_encoder.deca_encoder.encoder.*``, ``face_encoder.expression_encoder.encoder.*``,
  and the ignored ``shape_model.flame.*`` and ``renderer.*`` buffers).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np

from gmfx.testing._model_files import _encoder_state, _random_state, write_lightning_checkpoint

__all__ = ["EMICA_FOLDER", "write_emica_model", "write_mica_tar"]

EMICA_FOLDER = "EMICA-CVT_flame2020_notexture"


@lru_cache(maxsize=1)
def _mica_states(seed: int) -> tuple[OrderedDict, OrderedDict]:
    """Random ArcFace (iresnet100) and regressor state dicts; shape codes of order one (made once per
    seed: a model directory holds them twice, in mica.tar and in the EMICA checkpoint)."""
    import torch

    from gmfx.models._arcface import IResNet100, MicaRegressor

    rng = np.random.default_rng(seed)
    arcface = _random_state(IResNet100(), rng, scale=1.0)
    regressor = _random_state(MicaRegressor(), rng, scale=1.0)
    regressor["output.weight"] = regressor["output.weight"] * 5.0
    regressor["output.bias"] = torch.zeros_like(regressor["output.bias"])
    return arcface, regressor


def _flame_buffers() -> OrderedDict:
    import torch

    return OrderedDict(
        faces_tensor=torch.zeros(9976, 3, dtype=torch.long), v_template=torch.zeros(5023, 3),
        shapedirs=torch.zeros(5023, 3, 400), posedirs=torch.zeros(36, 15069), J_regressor=torch.zeros(5, 5023),
        parents=torch.tensor([-1, 0, 1, 1, 1]), lbs_weights=torch.zeros(5023, 5),
    )  # fmt: skip


def write_mica_tar(path: str | Path, *, seed: int = 0) -> Path:
    """Write MICA's ``mica.tar`` (~260 MB): ``{'arcface': iresnet100 state, 'flameModel': regressor.* +
    generator.* FLAME buffers}``."""
    import torch

    arcface, regressor = _mica_states(seed)
    flame_model = OrderedDict((f"regressor.{k}", v) for k, v in regressor.items())
    flame_model.update((f"generator.{k}", v) for k, v in _flame_buffers().items())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arcface": arcface, "flameModel": flame_model}, path)
    return path


def write_emica_model(folder: str | Path, *, jaw: bool = True, mica: bool = True, seed: int = 0) -> Path:
    """Write an EMICA model folder: ``cfg.yaml`` + ``checkpoints/emica-epoch=NN-val_loss=X.ckpt``.

    The DECA encoder predicts ``texcode 50, globalpose 3, cam 3, lightcode 27`` and the expression
    encoder ``expcode 100`` (+ ``jawpose 3`` with ``jaw``, which the DECA encoder predicts otherwise),
    as inferno's ``emica_encoder_*`` configurations. ``mica=False`` leaves MICA's weights out of the
    checkpoint (the backend then reads ``MICA/mica.tar``).
    """
    import yaml

    rng = np.random.default_rng(seed)
    deca_predicts = {"texcode": 50, **({} if jaw else {"jawpose": 3}), "globalpose": 3, "cam": 3, "lightcode": 27}
    expression_predicts = {"expcode": 100, **({"jawpose": 3} if jaw else {})}
    cam_start = sum(list(deca_predicts.values())[: list(deca_predicts).index("cam")])
    state = OrderedDict()
    prefix = "face_encoder.mica_deca_encoder."
    modules = [
        (prefix + "deca_encoder.encoder.", _encoder_state(sum(deca_predicts.values()), rng, camera_slice=slice(cam_start, cam_start + 3))),
        ("face_encoder.expression_encoder.encoder.", _encoder_state(sum(expression_predicts.values()), rng)),
    ]
    if mica:
        arcface, regressor = _mica_states(seed)
        modules += [(prefix + "mica_encoder.E_mica.arcface.", arcface), (prefix + "mica_encoder.E_mica.flameModel.regressor.", regressor)]
    for name, module_state in modules:
        state.update((name + key, value) for key, value in module_state.items())
    state.update((f"shape_model.flame.{k}", v) for k, v in _flame_buffers().items())
    import torch

    state["renderer.uv_face_mask"] = torch.zeros(1, 1, 256, 256)
    folder = Path(folder)
    write_lightning_checkpoint(folder / "checkpoints", "emica", state)
    encoders = {
        "expression_encoder": {"type": "ExpressionEncoder", "backbone": "ResNet50", "input_size": 224, "predicts": expression_predicts},
        "mica_deca_encoder": {"encoders": {
            "deca_encoder": {"type": "DecaEncoder", "backbone": "ResNet50", "input_size": 224, "predicts": deca_predicts},
            "mica_encoder": {"type": "MicaEncoder", "mica_model_path": "MICA/model/mica.tar", "mica_preprocessing": "fan",
                             "predicts": {"shape": 300}},
        }},
    }  # fmt: skip
    cfg = {
        "model": {
            "face_encoder": {"type": "EmicaEncoder", "encoders": encoders},
            "shape_model": {"type": "FlameShapeModel", "flame": {"n_shape": 300, "n_exp": 100, "flame_model_path": "FLAME/geometry/generic_model.pkl"}},
        },
        "inout": {"name": folder.name},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder
