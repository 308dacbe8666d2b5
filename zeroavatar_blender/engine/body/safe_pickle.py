"""A restricted unpickler for SMPL-family model files.

The official SMPL / SMPL-X ``.pkl`` files are Python 2 pickles (read with ``encoding="latin1"``)
holding numpy arrays, a ``scipy.sparse`` J_regressor and ``chumpy.ch.Ch`` arrays. Python's
``pickle.load`` would run whatever callable a file names, so a model file from the internet could
run code. This unpickler builds only what those files need: numpy arrays and dtypes, plain
containers, scipy.sparse matrices (csc/csr/coo) and chumpy ``Ch`` objects (mapped to
``ChumpyArray``, which keeps the array data: chumpy itself is neither needed nor imported). Any
other global is refused with ``UnsafePickleError`` before anything is called.

``.npz`` files can hide pickles too (object arrays; numpy runs them under ``allow_pickle=True``,
which is what ``smplx`` does): ``safe_load_npz`` reads plain members with ``allow_pickle=False``
and object members through the same restricted unpickler.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global a model file never needs (and that could run code)."""


class ChumpyArray:
    """What survives of a pickled ``chumpy.ch.Ch``: its array data ``x``."""

    x: np.ndarray

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or "x" not in state:
            raise UnsafePickleError("a chumpy object without array data (a computed chumpy expression, "
                                    "not a plain chumpy array) cannot be read without chumpy")
        self.x = np.asarray(to_plain(state["x"]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.x if dtype is None else self.x.astype(dtype)


class SparseState:
    """A pickled scipy.sparse matrix's attributes, turned into a real matrix by ``to_plain``
    (so old pickles, e.g. from ``scipy.sparse.csc``, load whatever scipy is installed)."""

    fmt = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected pickled state for a scipy.sparse {self.fmt} matrix")
        self.state = state

    def to_matrix(self) -> Any:
        import scipy.sparse as sp

        s = {k: to_plain(v) for k, v in self.state.items()}
        shape = tuple(int(n) for n in s.get("_shape", s.get("shape", ())))
        try:
            if self.fmt in ("csc", "csr"):
                cls = sp.csc_matrix if self.fmt == "csc" else sp.csr_matrix
                return cls((s["data"], s["indices"], s["indptr"]), shape=shape)
            rows, cols = s["coords"] if "coords" in s else (s["row"], s["col"])
            return sp.coo_matrix((s["data"], (rows, cols)), shape=shape)
        except (KeyError, ValueError, TypeError) as exc:
            raise UnsafePickleError(f"malformed scipy.sparse {self.fmt} matrix in the pickle: {exc}") from exc


_SPARSE_CLASSES = {fmt: type(f"{fmt}_matrix_state", (SparseState,), {"fmt": fmt}) for fmt in ("csc", "csr", "coo")}
_PLACEHOLDERS = (ChumpyArray, *_SPARSE_CLASSES.values())


def _numpy_attr(module: str, name: str) -> Any:
    """numpy.core.* moved to numpy._core.* in numpy 2: find the function in either."""
    import importlib

    for mod in (f"numpy._core.{module}", f"numpy.core.{module}"):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"this numpy has no {module}.{name}")


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to build a numpy array of type {subtype!r}")
    return _numpy_attr("multiarray", "_reconstruct")(subtype, shape, dtype)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocol 0/1 objects), for our placeholder classes only."""
    if cls not in _PLACEHOLDERS or base is not object or state is not None:
        raise UnsafePickleError(f"refusing to reconstruct {cls!r} from {base!r}")
    return object.__new__(cls)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """How Python 3 pickles bytes at protocol 2: _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _safe_bytes(*args: Any) -> bytes:
    if args and not isinstance(args[0], (bytes, str)):
        raise UnsafePickleError("refusing bytes() of a non-string")
    return bytes(*args)


def _allowed() -> dict[tuple[str, str], Callable[..., Any] | type]:
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("chumpy.ch", "Ch"): ChumpyArray,
        ("chumpy", "Ch"): ChumpyArray,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _safe_reconstruct
        table[(f"{core}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
        table[(f"{core}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
    for builtins in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex),
                          ("object", object), ("bytes", _safe_bytes), ("bytearray", bytearray)):
            table[(builtins, name)] = obj
    for copyreg in ("copyreg", "copy_reg"):
        table[(copyreg, "_reconstructor")] = _safe_reconstructor
    for fmt, cls in _SPARSE_CLASSES.items():
        for module in (f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}", "scipy.sparse"):
            table[(module, f"{fmt}_matrix")] = cls
            table[(module, f"{fmt}_array")] = cls
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only answers the table above."""

    def __init__(self, file: BinaryIO, source: str = "the pickle") -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._table[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load '{module}.{name}': a body-model file only holds "
                "numpy arrays, scipy.sparse matrices and chumpy arrays, and this name could run code"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing a persistent id in the pickle")


def to_plain(obj: Any) -> Any:
    """Replace placeholders by numpy arrays (chumpy) and scipy.sparse matrices, recursively."""
    if isinstance(obj, ChumpyArray):
        return obj.x
    if isinstance(obj, SparseState):
        return obj.to_matrix()
    if isinstance(obj, dict):
        return type(obj)((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        out = np.empty(obj.shape, dtype=object)
        for i, v in enumerate(obj.flat):
            out.flat[i] = to_plain(v)
        return out
    return obj


def safe_loads(data: bytes, source: str = "the pickle") -> Any:
    """Unpickle bytes with the restricted unpickler; placeholders already converted."""
    return to_plain(RestrictedUnpickler(io.BytesIO(data), source).load())


def safe_load(path: str | Path) -> Any:
    """Unpickle a file with the restricted unpickler (latin1, as the Python 2 model files need)."""
    path = Path(path)
    with open(path, "rb") as f:
        return to_plain(RestrictedUnpickler(f, str(path)).load())


def safe_load_npz(path: str | Path) -> dict[str, Any]:
    """All members of an .npz: plain arrays with allow_pickle=False, object arrays (pickled
    inside the zip) through the restricted unpickler."""
    path = Path(path)
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            try:
                out[key] = z[key]
            except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
                out[key] = _object_member(path, key)
    return out


def _object_member(path: Path, key: str) -> Any:
    """An object-dtype .npy inside the zip: a header, then a pickle of the array."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise UnsafePickleError(f"{path}: member {key!r} has an unsupported .npy version {version}")
        _shape, _fortran, dtype = read_header(f)
        if dtype != object:
            raise UnsafePickleError(f"{path}: member {key!r} could not be read as a plain array")
        return to_plain(RestrictedUnpickler(f, f"{path}[{key}]").load())
