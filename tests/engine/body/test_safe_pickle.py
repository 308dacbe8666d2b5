import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from zeroavatar_blender.engine.body.safe_pickle import (
    RestrictedUnpickler, UnsafePickleError, safe_load, safe_load_npz, safe_loads,
)

from .synthetic_smpl import build_model, save_npz, save_official_pkl


class _Payload:
    """Pickles as a call to ``func(*args)``: what a malicious model file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module")
def model():
    return build_model("smpl")


@pytest.mark.parametrize("protocol", [0, 2])
def test_official_style_pickle_loads_without_chumpy(tmp_path, model, protocol):
    path = save_official_pkl(model, tmp_path / "SMPL_NEUTRAL.pkl", protocol=protocol)
    raw = path.read_bytes()
    assert b"chumpy.ch\nCh" in raw and b"scipy.sparse.csc\ncsc_matrix" in raw
    with pytest.raises(ModuleNotFoundError, match="chumpy"):  # what plain pickle does with it
        pickle.loads(raw, encoding="latin1")
    data = safe_load(path)
    assert "chumpy" not in sys.modules
    assert isinstance(data["v_template"], np.ndarray) and np.array_equal(data["v_template"], model["v_template"])
    assert np.array_equal(data["shapedirs"], model["shapedirs"])
    assert sp.issparse(data["J_regressor"]) and data["J_regressor"].format == "csc"
    assert np.array_equal(data["J_regressor"].toarray(), model["J_regressor"])
    assert np.array_equal(data["posedirs"], model["posedirs"])
    assert data["f"].dtype == np.uint32 and np.array_equal(data["f"], model["f"])
    assert data["bs_style"] == "lbs" and data["pose_training_info"] == {"subjects": 3}


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("payload", ["os.system", "subprocess", "eval", "nested"])
def test_refuses_code_and_does_not_run_it(tmp_path, protocol, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    obj = {
        "os.system": _Payload(os.system, command),
        "subprocess": _Payload(subprocess.call, ["touch", str(marker)]),
        "eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "nested": {"v_template": np.zeros((3, 3)), "x": [1, (_Payload(os.system, command),)]},
    }[payload]
    data = pickle.dumps(obj, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        safe_loads(data, "evil.pkl")
    assert not marker.exists()


def test_refuses_crafted_tricks():
    # numpy's _reconstruct is allowed, but only to build plain ndarrays
    evil = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncchumpy.ch\nCh\nK\x00\x85U\x01b\x87R."
    with pytest.raises(UnsafePickleError, match="numpy array of type"):
        safe_loads(evil)
    # _codecs.encode is allowed for latin1 only
    rot13 = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafePickleError, match="encoding"):
        safe_loads(rot13)
    assert safe_loads(rot13.replace(b"\x05\x00\x00\x00rot13", b"\x06\x00\x00\x00latin1")) == b"abc"
    unpickler = RestrictedUnpickler(io.BytesIO(b""), "x.pkl")
    for module, name in (("builtins", "eval"), ("numpy", "load"), ("numpy", "core.multiarray._reconstruct"),
                         ("chumpy.ch", "ChLambda"), ("copyreg", "__newobj__")):
        with pytest.raises(UnsafePickleError, match=f"x.pkl: refusing to load '{module}.{name}'"):
            unpickler.find_class(module, name)


def test_chumpy_expression_without_data_is_refused():
    state_without_x = b"\x80\x02cchumpy.ch\nCh\n)\x81}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(UnsafePickleError, match="computed chumpy expression"):
        safe_loads(state_without_x)


def test_npz_object_members_go_through_the_restricted_unpickler(tmp_path, model):
    path = save_npz(model, tmp_path / "m.npz")
    with pytest.raises(ValueError, match="allow_pickle"):
        with np.load(path) as z:
            z["joint2num"]
    data = safe_load_npz(path)
    assert data["joint2num"].item() == {"pelvis": 0, "left_hip": 1}
    assert np.array_equal(data["v_template"], model["v_template"])

    marker = tmp_path / "pwned"
    evil = np.empty((), dtype=object)
    evil[()] = _Payload(os.system, f"touch {marker}")
    np.savez(tmp_path / "evil.npz", v_template=model["v_template"], joint2num=evil)
    with pytest.raises(UnsafePickleError, match=r"evil.npz\[joint2num\]: refusing to load"):
        safe_load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
