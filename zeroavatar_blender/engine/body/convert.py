"""Read SMPL-family model files safely, and convert them once to a plain .npz.

    python -m zeroavatar_blender.engine.body.convert MODEL.pkl OUT.npz

The official .pkl files are Python 2 pickles with chumpy arrays and a scipy.sparse J_regressor;
they are read with the restricted unpickler in ``safe_pickle`` (no code in the file can run,
chumpy is not needed). The .npz written here holds only numeric and string arrays, so it loads
with ``allow_pickle=False`` anywhere.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, EngineError, OutputError
from .safe_pickle import UnsafePickleError, safe_load, safe_load_npz

MODEL_URLS = {"smpl": "https://smpl.is.tue.mpg.de", "smplx": "https://smpl-x.is.tue.mpg.de"}
# What smplx's SMPL / SMPL-X classes read from a model file.
REQUIRED_KEYS = {
    "smpl": ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"),
    "smplx": ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table",
              "hands_componentsl", "hands_componentsr", "hands_meanl", "hands_meanr",
              "lmk_faces_idx", "lmk_bary_coords"),
}


def read_model_arrays(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """A model file (.npz or .pkl) as plain arrays: (arrays, names of entries that are not arrays
    and were dropped, e.g. dicts of training info). Sparse matrices become dense, chumpy arrays
    become numpy arrays.

    allow_pickle: a file the restricted unpickler refuses is then read with Python's full pickle
    (it can run code: only for a file the user trusts). The restricted reader is always tried first.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pkl", ".pickle"):
        raise BadInputError(f"{path}: unsupported body-model file type {path.suffix!r}",
                            "use the .npz or .pkl file from the SMPL / SMPL-X download")
    try:
        try:
            raw = safe_load_npz(path) if suffix == ".npz" else safe_load(path)
        except UnsafePickleError as exc:
            if not allow_pickle:
                raise BadInputError(
                    str(exc), "this is not a plain SMPL/SMPL-X model file: download the model again from "
                    f"{MODEL_URLS['smpl']} or {MODEL_URLS['smplx']}; if you made this file yourself and "
                    "trust it, allow pickle (--allow-pickle) to load it with Python's full unpickler") from exc
            warnings.warn(f"{path}: loading with Python's full unpickler (allow_pickle): {exc}", stacklevel=2)
            raw = _trusted_load(path, suffix)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, ImportError,
            AttributeError, IndexError, TypeError) as exc:
        raise BadInputError(f"cannot read the body-model file {path}: {exc}",
                            "the file may be damaged or incomplete: download it again") from exc
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} holds a {type(raw).__name__}, not a body model's named arrays",
                            "use the SMPL / SMPL-X model file itself")
    arrays: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        array = _as_plain_array(value)
        if array is None:
            dropped.append(str(key))
        else:
            arrays[str(key)] = array
    return arrays, dropped


def _trusted_load(path: Path, suffix: str) -> Any:
    if suffix == ".npz":
        with np.load(path, allow_pickle=True) as z:
            return {k: z[k] for k in z.files}
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # noqa: S301 - explicit opt-in for a trusted file


def _as_plain_array(value: Any) -> np.ndarray | None:
    """A numeric or string array, or None for anything else (dicts, None, object arrays)."""
    if hasattr(value, "toarray") and "sparse" in type(value).__module__:
        return np.asarray(value.toarray())
    if isinstance(value, (dict, type(None))):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return None if array.dtype == object else array


def missing_keys(arrays: dict[str, np.ndarray], name: str = "smpl") -> list[str]:
    return [k for k in REQUIRED_KEYS[name] if k not in arrays]


def convert_smpl_to_npz(src: str | Path, dst: str | Path) -> Path:
    """Convert an SMPL / SMPL-X model file (.pkl or .npz) to an .npz of plain arrays (written to a
    temporary name, then renamed). Returns the path written."""
    return _convert(Path(src), Path(dst))[0]


def _convert(src: Path, dst: Path) -> tuple[Path, dict[str, np.ndarray], list[str]]:
    if not src.is_file():
        raise BadInputError(f"model file not found: {src}", "pass the .pkl/.npz file from the SMPL / SMPL-X download")
    arrays, dropped = read_model_arrays(src)
    missing = missing_keys(arrays, "smpl")
    if missing:
        raise BadInputError(f"{src} is not an SMPL-family model: it has no {', '.join(missing)}",
                            "pass the model file from the SMPL / SMPL-X download")
    if dst.suffix.lower() != ".npz":
        dst = dst.with_name(dst.name + ".npz")
    tmp = dst.with_name(f".{dst.name}.tmp")
    # SMPL-X's .npz carries a stray 'allow_pickle' flag; as a key it would clash with np.savez's
    # own argument of that name (numpy 2), and nothing reads it.
    plain = {k: v for k, v in arrays.items() if k != "allow_pickle"}
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **plain)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dst}: {exc.strerror or exc}", "choose a writable output folder") from exc
    return dst, arrays, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zeroavatar_blender.engine.body.convert",
        description="Convert an SMPL / SMPL-X model file (.pkl) to a plain .npz, safely (no pickle code runs).")
    parser.add_argument("src", type=Path, help="model file from the SMPL / SMPL-X download (.pkl or .npz)")
    parser.add_argument("dst", type=Path, help="output .npz (e.g. SMPL_NEUTRAL.npz)")
    args = parser.parse_args(argv)
    try:
        out, arrays, dropped = _convert(args.src, args.dst)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(f"wrote {out}: {len(arrays)} arrays ({', '.join(sorted(arrays))})")
    if dropped:
        print(f"left out (not arrays, not needed): {', '.join(sorted(dropped))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
