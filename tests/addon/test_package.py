"""The extension zip: layout, manifest, Blender's validator, and a real install into Blender."""

from __future__ import annotations

import tomllib
import zipfile

import pytest

from zeroavatar_blender import __version__
from zeroavatar_blender.blender_jobs import package


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory):
    return package.build_zip(tmp_path_factory.mktemp("dist"))


def test_zip_layout(extension_zip):
    assert extension_zip.name == f"zeroavatar_blender-{__version__}.zip"
    assert package.check_zip(extension_zip) == []
    with zipfile.ZipFile(extension_zip) as zf:
        names = zf.namelist()
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
        reqs = zf.read("requirements/engine.txt").decode()
    assert "__init__.py" in names and "addon/client.py" in names and "engine/cli.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith(("tests/", ".venv/", "zeroavatar_blender/")) for n in names)
    assert manifest["id"] == "zeroavatar_blender" and manifest["version"] == __version__
    assert manifest["blender_version_min"] == "4.2.0" and set(manifest["permissions"]) == {"files", "network"}
    assert "torch==" in reqs and "bpy" not in reqs and "pytest" not in reqs


def test_build_is_reproducible(extension_zip, tmp_path):
    again = package.build_zip(tmp_path)
    assert again.read_bytes() == extension_zip.read_bytes()


def test_blender_validator_accepts_it(extension_zip):
    ok, output = package.blender_validate(extension_zip)
    assert ok, output
    assert package.blender_ext_script() is not None  # it really ran, not skipped


def test_check_zip_catches_a_bad_layout(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:  # the common mistake: the package folder inside the zip
        zf.writestr("zeroavatar_blender/__init__.py", "x = 1\n")
        zf.writestr("zeroavatar_blender/__pycache__/a.cpython-311.pyc", b"")
        zf.writestr("blender_manifest.toml", 'schema_version = "1.0.0"\nid = "other"\n')
        zf.writestr("broken.py", "def (:\n")
    errors = "\n".join(package.check_zip(bad))
    assert "__init__.py is not at the zip root" in errors
    assert "compiled file in zip" in errors and "broken.py does not compile" in errors
    assert "manifest id must be 'zeroavatar_blender'" in errors
    ok, output = package.blender_validate(bad)
    assert not ok and output


def test_manifest_rules():
    manifest = package.read_manifest()
    assert package.check_manifest(manifest) == []
    broken = dict(manifest, version="9.9.9", license=["GPL"], permissions={"files": ""})
    errors = "\n".join(package.check_manifest(broken))
    assert "version" in errors and "SPDX" in errors and "permissions.files" in errors
    assert "permissions.network" in errors


def test_filtered_requirements():
    text = "# c\nnumpy==1.26.4\nbpy==5.0.1\ntorch==2.13.0  # cpu\nPytest>=9\n\n"
    assert package.filtered_requirements(text).splitlines() == ["# c", "numpy==1.26.4", "torch==2.13.0  # cpu", ""]


def test_installs_into_blender_and_runs_the_engine_from_there(extension_zip):
    report = package.install_check(extension_zip)
    assert package.install_errors(report) == [], report
    for op in ("generate", "fit_body", "optimise", "finalise", "cancel", "export_fbx", "export_gltf", "install_engine",
               "check_setup"):
        assert op in report["operators"]
    assert report["preferences"] == "ZeroAvatarPreferences"
    assert report["jobs_root"].endswith("extensions/.user/user_default/zeroavatar_blender/jobs")
    assert report["engine_version"] == f"zeroavatar {__version__}"
