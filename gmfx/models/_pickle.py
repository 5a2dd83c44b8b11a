"""Reading the pickles that face-model files come in, without running anything they ask for.

A pickle is a program: it names globals (``module.name``) and calls them. The files gmfx reads
(FLAME's Python-2 ``.pkl`` with chumpy objects and a SciPy sparse matrix, DECA's landmark ``.npy``,
PyTorch-Lightning checkpoints) only need arrays, dicts and tensors, so :class:`RestrictedUnpickler`
resolves a short list of globals to array/tensor builders and a few foreign classes to inert
records (:class:`Record`); any other global is refused with :class:`~gmfx.ModelError` naming it,
before anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import IO, Any

import numpy as np

from gmfx._errors import ModelError

__all__ = ["Record", "RestrictedUnpickler", "load_pickle", "load_torch", "read_npy_object"]


class Record:
    """An inert stand-in for an object of a foreign class (chumpy ``Ch``, SciPy sparse matrices,
    Lightning callbacks): it keeps the class name, the constructor arguments and the pickled state,
    and has no behaviour."""

    def __init__(self, module: str, name: str, args: tuple = (), state: Any = None) -> None:
        self.module, self.name, self.args, self.state = module, name, args, state

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.module}.{self.name})"


def _new_record_class(module: str, name: str) -> type:
    """A fresh class standing in for ``module.name``: NEWOBJ makes an empty :class:`Record`, BUILD fills its state."""

    def new(cls, *args: Any) -> Record:
        return Record(module, name, args)

    return type(name, (Record,), {"__new__": new, "__init__": lambda self, *a: None, "__module__": "gmfx.models._pickle"})


def _reconstructor(cls: Any, base: Any, state: Any) -> Record:
    """``copyreg._reconstructor`` for Python-2-era pickles, restricted to record classes."""
    if isinstance(cls, type) and issubclass(cls, Record):
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor asked to build {cls!r}")


def _torch_storage_from_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` without its unrestricted ``torch.load`` (tensors pickled by plain pickle)."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    table = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = multiarray._reconstruct
        table[(module, "scalar")] = multiarray.scalar
    for module in ("numpy", "numpy.core.numeric", "numpy._core.numeric"):
        table[(module, "ndarray")] = np.ndarray
        table[(module, "dtype")] = np.dtype
    table[("numpy", "dtype")] = np.dtype
    table[("_codecs", "encode")] = _latin1_encode
    table[("copyreg", "_reconstructor")] = _reconstructor
    table[("copy_reg", "_reconstructor")] = _reconstructor
    table[("__builtin__", "object")] = object
    table[("builtins", "object")] = object
    table[("collections", "OrderedDict")] = OrderedDict
    table[("builtins", "set")] = set
    table[("builtins", "frozenset")] = frozenset
    table[("builtins", "slice")] = slice
    return table


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _torch_globals() -> dict[tuple[str, str], Any]:
    try:
        import torch
        import torch._utils as tu
    except ImportError:  # pragma: no cover - torch is a dependency
        return {}
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", name): getattr(tu, name)
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
        if hasattr(tu, name)
    }
    table[("torch.storage", "_load_from_bytes")] = _torch_storage_from_bytes
    table[("torch", "Size")] = torch.Size
    table[("torch", "device")] = torch.device
    if hasattr(torch, "_tensor"):
        table[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    table[("torch", "Tensor")] = torch.Tensor
    table[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    for dtype in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"):
        table[("torch", dtype)] = getattr(torch, dtype)
    return table


#: module prefixes whose classes become inert records (their behaviour is never needed to read weights)
RECORD_MODULES = ("chumpy.", "scipy.sparse.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only arrays, tensors, containers and inert records.

    ``record_modules`` are module prefixes whose classes are replaced by :class:`Record` subclasses;
    every other global outside the allowed table raises :class:`pickle.UnpicklingError` naming it.
    """

    record_modules: tuple[str, ...] = RECORD_MODULES

    def __init__(self, file: IO[bytes], *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, *args, **kwargs)
        self._allowed = {**_numpy_globals(), **_torch_globals()}
        self._records: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if any((module + ".").startswith(prefix) for prefix in self.record_modules):
            key = (module, name)
            if key not in self._records:
                self._records[key] = _new_record_class(module, name)
            return self._records[key]
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}")


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and ``load``."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def load_pickle(data: bytes, *, where: str) -> Any:
    """The object pickled in ``data`` (any protocol, Python 2 strings as latin-1), restricted as above.

    Raises :class:`~gmfx.ModelError` naming the refused global, or saying the file is truncated.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise _refused(error, where) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ModelError(
            f"the file is not a readable pickle ({type(error).__name__}: {error}); it may be truncated",
            where=where,
            fix="download or copy the file again and check its size against the original",
        ) from None


def load_torch(data: bytes, *, where: str, lightning: bool = False) -> Any:
    """A ``torch.save`` file: ``weights_only=True`` for plain state dicts; ``lightning=True`` reads a
    Lightning checkpoint through :class:`RestrictedUnpickler` (its callbacks become records)."""
    import torch

    try:
        if lightning:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_PickleModule)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refused(error, where) from None
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for broken files
        raise ModelError(
            f"the checkpoint cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "it may be truncated or not a PyTorch file",
            where=where,
            fix="download or copy the file again and check its size against the original",
        ) from None


def read_npy_object(data: bytes, *, where: str) -> Any:
    """The object inside an ``.npy`` file holding a pickled object array (e.g. DECA's
    ``landmark_embedding.npy``: a 0-d array of a dict), read with :class:`RestrictedUnpickler`
    instead of ``np.load(allow_pickle=True)``."""
    from numpy.lib import format as npy

    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError as error:
        raise ModelError(f"not an .npy file ({error})", where=where, fix="check the file") from None
    if dtype != object:
        return np.load(io.BytesIO(data), allow_pickle=False)
    array = load_pickle(stream.read(), where=where)
    array = np.asarray(array, dtype=object).reshape(shape)
    return array[()] if shape == () else array


def _refused(error: Exception, where: str) -> ModelError:
    return ModelError(
        f"the file asks to load something gmfx does not allow ({error}); nothing in it was run",
        where=where,
        fix="use the original file from the model's authors; gmfx reads only arrays, tensors and known containers",
    )
