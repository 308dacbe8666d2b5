"""Build and check the extension zip: ``python -m zeroavatar_blender.blender_jobs.package --out dist``.

Blender installs an extension by unpacking the zip into ``<repo>/<id>/``, so the zip's root holds
the package's own files (``__init__.py``, ``addon/``, ``engine/`` ...) plus ``blender_manifest.toml``;
the installed folder is then named ``zeroavatar_blender`` and its parent is the engine's
PYTHONPATH. ``requirements/`` goes along for "Install Engine".

Checks, in order: our own (manifest fields, layout, every module compiles), Blender's manifest
validator (``blender_ext.py validate``, run with this Python), and an install into a throw-away
Blender user folder with ``bpy.ops.extensions.package_install_files`` in a subprocess, which
enables the extension, checks its operators, and starts the engine from the installed folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ROOT = PACKAGE_DIR.parent
MANIFEST = "blender_manifest.toml"
EXTENSION_ID = "zeroavatar_blender"
REQUIRED_FIELDS = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type",
                   "blender_version_min", "license")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".blend1", ".orig", ".rej")
ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same zip


class PackageError(RuntimeError):
    """The extension zip or its manifest is wrong; the message names the problem."""


def read_manifest(path: Path = ROOT / MANIFEST) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PackageError(f"cannot read {path}: {exc}") from exc


def check_manifest(manifest: dict) -> list[str]:
    """Our own rules on top of Blender's: fields present, id and version match the package."""
    from .. import __version__

    errors = [f"manifest lacks '{k}'" for k in REQUIRED_FIELDS if k not in manifest]
    if manifest.get("id") != EXTENSION_ID:
        errors.append(f"manifest id must be {EXTENSION_ID!r} (the engine imports the package by that name)")
    if manifest.get("version") != __version__:
        errors.append(f"manifest version {manifest.get('version')!r} != package __version__ {__version__!r}")
    if manifest.get("type") != "add-on":
        errors.append("manifest type must be 'add-on'")
    licenses = manifest.get("license", [])
    if not licenses or not all(isinstance(x, str) and x.startswith("SPDX:") for x in licenses):
        errors.append("license must be a list of 'SPDX:...' identifiers")
    permissions = manifest.get("permissions", {})
    for key in ("files", "network"):
        if not isinstance(permissions.get(key), str) or not permissions[key]:
            errors.append(f"permissions.{key} needs a reason")
    for wheel in manifest.get("wheels", []):
        if not (ROOT / wheel).is_file():
            errors.append(f"wheel listed in the manifest is missing: {wheel}")
    return errors


def filtered_requirements(text: str, skip: tuple[str, ...] = ("bpy", "pytest")) -> str:
    """engine.txt without what the engine does not need (the Blender module, test tools)."""
    out = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        for sep in ("==", ">=", "<=", "~=", "!=", "<", ">", "[", ";", " "):
            name = name.split(sep, 1)[0]
        if name.lower() not in skip:
            out.append(line)
    return "\n".join(out) + "\n"


def package_files(package_dir: Path = PACKAGE_DIR) -> list[tuple[Path, str]]:
    """(source, name in zip) for the package's files, sorted, without caches and editor litter."""
    out = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if path.is_dir() or any(p in SKIP_DIRS or p.startswith(".") for p in rel.parts):
            continue
        if path.suffix in SKIP_SUFFIXES:
            continue
        out.append((path, rel.as_posix()))
    return out


def _write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_zip(out_dir: Path, root: Path = ROOT) -> Path:
    manifest = read_manifest(root / MANIFEST)
    errors = check_manifest(manifest)
    if errors:
        raise PackageError("; ".join(errors))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        _write(zf, MANIFEST, (root / MANIFEST).read_bytes())
        for src, name in package_files(root / EXTENSION_ID):
            _write(zf, name, src.read_bytes())
        req = root / "requirements"
        _write(zf, "requirements/engine.txt", filtered_requirements((req / "engine.txt").read_text()).encode())
        if (req / "engine-lock.txt").is_file():
            _write(zf, "requirements/engine-lock.txt", (req / "engine-lock.txt").read_bytes())
        for wheel in manifest.get("wheels", []):
            _write(zf, wheel, (root / wheel).read_bytes())
    os.replace(tmp, path)
    return path


def check_zip(path: Path) -> list[str]:
    """Layout problems of a built zip (empty list: fine)."""
    errors = []
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        for required in (MANIFEST, "__init__.py", "protocol.py", "addon/__init__.py", "engine/__main__.py",
                         "requirements/engine.txt"):
            if required not in names:
                errors.append(f"{required} is not at the zip root")
        for name in names:
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or "\\" in name:
                errors.append(f"unsafe name in zip: {name}")
            if "__pycache__" in parts or name.endswith((".pyc", ".pyo")):
                errors.append(f"compiled file in zip: {name}")
            if name.endswith(".py"):
                try:
                    compile(zf.read(name), name, "exec", dont_inherit=True)
                except SyntaxError as exc:
                    errors.append(f"{name} does not compile: {exc}")
        manifest = tomllib.loads(zf.read(MANIFEST).decode("utf-8")) if MANIFEST in names else {}
        errors += check_manifest(manifest) if manifest else []
        reqs = zf.read("requirements/engine.txt").decode() if "requirements/engine.txt" in names else ""
        if any(line.split("==")[0].strip().lower() == "bpy" for line in reqs.splitlines()):
            errors.append("requirements/engine.txt must not install bpy into the engine")
    return errors


def blender_ext_script() -> Path | None:
    """Blender's own extension command-line tool, shipped inside the bpy module."""
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        found = sorted(Path(base).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    return None


def blender_validate(path: Path) -> tuple[bool, str]:
    """Blender's manifest + tags validation of the zip (what extensions.blender.org runs)."""
    script = blender_ext_script()
    if script is None:
        return True, "skipped: the bpy module is not installed"
    tags = script.parents[3] / "modules" / "_bpy_internal" / "extensions" / "tags.py"
    cmd = [sys.executable, str(script), "validate", str(path)]
    if tags.is_file():
        cmd += ["--valid-tags", str(tags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


_INSTALL_CHECK = textwrap.dedent(r"""
    import json, os, subprocess, sys
    import bpy
    import addon_utils

    zip_path, out_json = sys.argv[1], sys.argv[2]
    report = {}
    result = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                                      enable_on_install=True)
    report["install"] = sorted(result)
    module = "bl_ext.user_default.zeroavatar_blender"
    report["enabled"] = bpy.context.preferences.addons.get(module) is not None
    report["operators"] = sorted(op for op in dir(bpy.ops.zeroavatar))
    report["panel"] = hasattr(bpy.types, "VIEW3D_PT_zeroavatar")
    report["preferences"] = type(bpy.context.preferences.addons[module].preferences).__name__ \
        if report["enabled"] else None
    import importlib
    jobs = importlib.import_module(module + ".addon.jobs")
    client = importlib.import_module(module + ".addon.client")
    report["package_dir"] = str(jobs.PACKAGE_DIR)
    report["jobs_root"] = str(jobs.jobs_root())
    report["torch_imported"] = "torch" in sys.modules
    env = client.engine_env(jobs.package_parent())
    proc = subprocess.run([sys.executable, "-m", "zeroavatar_blender.engine", "--version"], env=env,
                          cwd=report["jobs_root"], capture_output=True, text=True, timeout=120)
    report["engine_version"] = (proc.stdout + proc.stderr).strip()
    report["engine_rc"] = proc.returncode
    addon_utils.disable(module, default_set=True)
    report["disabled"] = bpy.context.preferences.addons.get(module) is None and not hasattr(bpy.types, "VIEW3D_PT_zeroavatar")
    with open(out_json, "w") as f:
        json.dump(report, f)
""")


def install_check(path: Path, timeout: float = 300) -> dict:
    """Install the zip into a fresh Blender user folder (a subprocess with its own HOME, so a
    developer's Blender and the checkout's add-on are untouched) and report what it found."""
    with tempfile.TemporaryDirectory(prefix="zeroavatar-install-") as home:
        out_json = Path(home) / "report.json"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BLENDER_USER_CONFIG",
                                                                "BLENDER_USER_SCRIPTS", "BLENDER_USER_EXTENSIONS")}
        env["HOME"] = home
        proc = subprocess.run([sys.executable, "-c", _INSTALL_CHECK, str(Path(path).resolve()), str(out_json)],
                              env=env, cwd=home, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not out_json.exists():
            raise PackageError(f"installing {path} into Blender failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        report = json.loads(out_json.read_text())
    return report


def install_errors(report: dict) -> list[str]:
    errors = []
    if report.get("install") != ["FINISHED"] or not report.get("enabled"):
        errors.append(f"the extension did not install and enable: {report.get('install')}")
    if "generate" not in report.get("operators", []) or not report.get("panel"):
        errors.append("the installed extension did not register its operators and panel")
    if report.get("torch_imported"):
        errors.append("enabling the extension imported torch")
    if Path(report.get("package_dir", "")).name != EXTENSION_ID:
        errors.append(f"installed folder is {report.get('package_dir')}, not .../{EXTENSION_ID}")
    if ".user" not in Path(report.get("jobs_root", "")).parts:
        errors.append(f"jobs are not in the extension's user folder: {report.get('jobs_root')}")
    if report.get("engine_rc") != 0:
        errors.append(f"the engine did not start from the installed folder: {report.get('engine_version')}")
    if not report.get("disabled"):
        errors.append("disabling the extension left classes registered")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="folder for the zip (default dist/)")
    parser.add_argument("--no-install-check", action="store_true",
                        help="skip installing the zip into a throw-away Blender user folder")
    args = parser.parse_args(argv)
    try:
        path = build_zip(args.out)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    errors = check_zip(path)
    ok, blender_out = blender_validate(path)
    if not ok:
        errors.append(f"Blender's validator: {blender_out}")
    print(f"Blender's validator: {blender_out or 'ok'}")
    if not errors and not args.no_install_check:
        try:
            report = install_check(path)
        except PackageError as exc:
            errors.append(str(exc))
        else:
            errors += install_errors(report)
            print(f"installed and enabled in a temporary Blender user folder: {len(report['operators'])} operators, "
                  f"engine from the extension folder: {report['engine_version']}")
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
