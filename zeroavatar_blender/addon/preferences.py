"""Add-on preferences: where the engine's Python is (or installing one), body model files,
diffusion weights, device and default quality."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from ..blender_jobs.package import filtered_requirements
from . import client, jobs
from .properties import BODY_ITEMS, QUALITY_ITEMS

log = logging.getLogger(__name__)

DEVICE_ITEMS = [
    ("auto", "Auto", "A CUDA GPU if the engine's torch sees one, else the CPU"),
    ("cuda", "CUDA", "An NVIDIA GPU (fails clearly if there is none)"),
    ("cpu", "CPU", "The processor (slow for Full quality)"),
]
WEIGHTS_ITEMS = [
    ("HF_CACHE", "Hugging Face Cache", "Repository ids already downloaded into the Hugging Face cache"),
    ("FOLDER", "Local Folders", "Diffusers folders on disk"),
    ("FILE", "Single Files", "Single .safetensors checkpoints"),
]
ENGINE_VENV = "engine_venv"


class ZeroAvatarPreferences(bpy.types.AddonPreferences):
    bl_idname = jobs.TOP_PACKAGE

    auto_detect: BoolProperty(
        name="Auto-detect Engine", default=True,
        description="Use ZEROAVATAR_ENGINE_PYTHON, the installed engine, a checkout's .venv or Blender's Python")
    engine_python: StringProperty(
        name="Engine Python", subtype="FILE_PATH",
        description="A Python executable that has the ZeroAvatar engine's packages (torch, ...)")
    body_model: EnumProperty(name="Body Model", items=BODY_ITEMS, default="anny")
    smpl_path: StringProperty(name="SMPL File", subtype="FILE_PATH",
                              description="SMPL model file (.npz or .pkl) or its folder")
    smplx_path: StringProperty(name="SMPL-X File", subtype="FILE_PATH",
                               description="SMPL-X model file (.npz or .pkl) or its folder")
    weights_source: EnumProperty(name="Weights", items=WEIGHTS_ITEMS, default="HF_CACHE",
                                 description="Where the Stable Diffusion and ControlNet weights are (Full quality)")
    sd_repo: StringProperty(name="Stable Diffusion", description="Repository id in the cache (empty: engine default)")
    controlnet_repo: StringProperty(name="Depth ControlNet", description="Repository id in the cache (empty: engine default)")
    hf_home: StringProperty(name="Cache Folder", subtype="DIR_PATH",
                            description="Hugging Face cache location (empty: the default, ~/.cache/huggingface)")
    sd_folder: StringProperty(name="Stable Diffusion", subtype="DIR_PATH")
    controlnet_folder: StringProperty(name="Depth ControlNet", subtype="DIR_PATH")
    sd_file: StringProperty(name="Stable Diffusion", subtype="FILE_PATH")
    controlnet_file: StringProperty(name="Depth ControlNet", subtype="FILE_PATH")
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="auto")
    gpu_memory_limit: FloatProperty(
        name="GPU Memory Limit", default=0.0, min=0.0, soft_max=48.0, step=50, precision=1,
        description="GiB of GPU memory the engine may hold, leaving the rest to Blender's viewport and "
                    "renders on the same card (0: no limit)")
    default_quality: EnumProperty(name="Default Quality", items=QUALITY_ITEMS, default="fast")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        box = layout.box()
        box.label(text="Engine", icon="SETTINGS")
        box.prop(self, "auto_detect")
        row = box.row()
        row.active = not self.auto_detect
        row.prop(self, "engine_python")
        found, detail = describe_engine(self)
        box.label(text=detail, icon="CHECKMARK" if found else "ERROR")
        row = box.row()
        row.operator("zeroavatar.install_engine", icon="IMPORT")
        row.operator("zeroavatar.redetect_engine", icon="FILE_REFRESH")
        st = INSTALLER.state
        if st.status != "idle":
            col = box.column(align=True)
            col.progress(factor=(st.step - (st.status == "running")) / max(1, st.total), type="BAR",
                         text=f"{st.status}: step {st.step}/{st.total} {st.label}")
            if st.last_line:
                col.label(text=st.last_line)
            if st.status == "running":
                col.operator("zeroavatar.cancel_install", icon="CANCEL")
            if INSTALLER.chain is not None:
                col.label(text=f"Log: {INSTALLER.chain.log_path}")
        if not bpy.app.online_access:
            box.label(text="Online access is off (Preferences > System): Install Engine is unavailable",
                      icon="INFO")
        row = box.row()
        row.operator("zeroavatar.check_setup", icon="VIEWZOOM").prepare = False
        row.operator("zeroavatar.check_setup", text="Prepare First Run", icon="MODIFIER").prepare = True
        draw_check(box.column(align=True))

        box = layout.box()
        box.label(text="Body and Quality", icon="OUTLINER_OB_ARMATURE")
        box.prop(self, "body_model")
        if self.body_model == "smpl":
            box.prop(self, "smpl_path")
        elif self.body_model == "smplx":
            box.prop(self, "smplx_path")
        box.prop(self, "default_quality")
        box.prop(self, "device")
        row = box.row()
        row.active = self.device != "cpu"
        row.prop(self, "gpu_memory_limit")

        box = layout.box()
        box.label(text="Diffusion Weights (Full quality)", icon="TEXTURE")
        box.prop(self, "weights_source", expand=True)
        if self.weights_source == "HF_CACHE":
            box.prop(self, "sd_repo")
            box.prop(self, "controlnet_repo")
            box.prop(self, "hf_home")
        elif self.weights_source == "FOLDER":
            box.prop(self, "sd_folder")
            box.prop(self, "controlnet_folder")
        else:
            box.prop(self, "sd_file")
            box.prop(self, "controlnet_file")


@dataclass
class DefaultPreferences:
    """The preferences' defaults, when the add-on was registered without addon_utils (scripts,
    tests): Blender only keeps AddonPreferences for add-ons it enabled itself."""

    auto_detect: bool = True
    engine_python: str = ""
    body_model: str = "anny"
    smpl_path: str = ""
    smplx_path: str = ""
    weights_source: str = "HF_CACHE"
    sd_repo: str = ""
    controlnet_repo: str = ""
    hf_home: str = ""
    sd_folder: str = ""
    controlnet_folder: str = ""
    sd_file: str = ""
    controlnet_file: str = ""
    device: str = "auto"
    gpu_memory_limit: float = 0.0
    default_quality: str = "fast"


def get_prefs(context: bpy.types.Context | None = None) -> Any:
    context = context or bpy.context
    addon = context.preferences.addons.get(jobs.TOP_PACKAGE)
    return addon.preferences if addon is not None and addon.preferences is not None else DefaultPreferences()


def engine_venv_dir(create: bool = False) -> Path:
    return jobs.user_dir(ENGINE_VENV, create=create)


def find_engine(prefs: Any) -> client.EnginePython:
    """Raises client.EngineNotFoundError with what was tried."""
    configured = "" if prefs.auto_detect else bpy.path.abspath(prefs.engine_python)
    try:
        venv = engine_venv_dir()
    except Exception:  # noqa: BLE001 - no user folder (read-only config): skip that candidate
        venv = None
    return client.find_engine_python(configured, venv, jobs.package_parent())


def describe_engine(prefs: Any) -> tuple[bool, str]:
    try:
        found = find_engine(prefs)
    except client.EngineNotFoundError as exc:
        return False, str(exc)[:200]
    return True, f"Engine Python ({found.source}): {found.path}"


def body_args(prefs: Any) -> list[str]:
    args = ["--body", prefs.body_model]
    path = {"smpl": prefs.smpl_path, "smplx": prefs.smplx_path}.get(prefs.body_model, "")
    if path:
        args += ["--body-model-path", bpy.path.abspath(path)]
    return args


def weights_args(prefs: Any) -> list[str]:
    sd, cn = {
        "HF_CACHE": (prefs.sd_repo, prefs.controlnet_repo),
        "FOLDER": (bpy.path.abspath(prefs.sd_folder) if prefs.sd_folder else "",
                   bpy.path.abspath(prefs.controlnet_folder) if prefs.controlnet_folder else ""),
        "FILE": (bpy.path.abspath(prefs.sd_file) if prefs.sd_file else "",
                 bpy.path.abspath(prefs.controlnet_file) if prefs.controlnet_file else ""),
    }[prefs.weights_source]
    args = []
    if sd:
        args += ["--sd-weights", sd]
    if cn:
        args += ["--controlnet-weights", cn]
    return args


def gpu_memory_args(prefs: Any) -> list[str]:
    """The engine's allocator cap (OptimiseConfig.gpu_memory_gib) when the user set a limit."""
    limit = float(prefs.gpu_memory_limit)
    return ["--set", f"gpu_memory_gib={limit:g}"] if limit > 0 else []


def engine_env_extra(prefs: Any) -> dict[str, str]:
    extra = {}
    if prefs.weights_source == "HF_CACHE" and prefs.hf_home:
        extra["HF_HOME"] = bpy.path.abspath(prefs.hf_home)
    return extra


# -- Install engine ---------------------------------------------------------------------------
def requirements_files() -> tuple[Path, Path | None]:
    """(engine.txt, engine-lock.txt or None): bundled in the extension, or the checkout's."""
    for root in (jobs.PACKAGE_DIR / "requirements", jobs.package_parent() / "requirements"):
        req = root / "engine.txt"
        if req.is_file():
            lock = root / "engine-lock.txt"
            return req, lock if lock.is_file() else None
    raise FileNotFoundError("requirements/engine.txt is not bundled with this add-on; reinstall the extension")


def install_steps(base_python: str, venv: Path, requirements: Path, lock: Path | None) -> list[tuple[str, list[str]]]:
    py = str(client.venv_python(venv))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    install = [*pip, "-r", str(requirements)] + (["-c", str(lock)] if lock else [])
    return [
        ("create the environment", [base_python, "-m", "venv", str(venv)]),
        ("update pip", [*pip, "--upgrade", "pip"]),
        ("install the engine's packages (several GB)", install),
        ("check the engine", [py, "-c", "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"]),
    ]


class _Installer:
    chain: client.CommandChain | None = None

    @property
    def state(self) -> client.ChainState:
        return self.chain.poll() if self.chain is not None else client.ChainState()

    @property
    def running(self) -> bool:
        return self.chain is not None and self.chain.state.status == "running"


INSTALLER = _Installer()


def polling_timer(poll: Callable[[], client.ChainState], name: str,
                  on_end: Callable[[], None] | None = None) -> Callable[[], float | None]:
    """A bpy timer that advances a background command every 0.5 s and redraws until it ends."""
    def timer() -> float | None:
        try:
            state = poll()
            jobs.redraw()
            if state.status != "running":
                if on_end is not None:
                    on_end()
                return None
        except Exception:  # noqa: BLE001
            log.exception(name)
            return None
        return 0.5

    return timer


_installer_timer = polling_timer(lambda: INSTALLER.state, "installer timer", lambda: client._TORCH_PROBE.clear())


class ZEROAVATAR_OT_install_engine(bpy.types.Operator):
    bl_idname = "zeroavatar.install_engine"
    bl_label = "Install Engine"
    bl_description = ("Create a Python environment in the add-on's user folder and install the engine's "
                      "packages from PyPI (several GB, needs online access)")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not INSTALLER.running

    def execute(self, context: bpy.types.Context) -> set[str]:
        if not bpy.app.online_access:
            self.report({"ERROR"}, "Online access is off: allow it in Preferences > System > Network, "
                                   "or point Engine Python at an existing environment")
            return {"CANCELLED"}
        try:
            req, lock = requirements_files()
            venv = engine_venv_dir(create=True)
            filtered = venv.parent / "engine-requirements.txt"
            filtered.write_text(filtered_requirements(req.read_text(encoding="utf-8")), encoding="utf-8")
        except OSError as exc:
            self.report({"ERROR"}, f"Cannot prepare the install: {exc}")
            return {"CANCELLED"}
        INSTALLER.chain = client.CommandChain(install_steps(sys.executable, venv, filtered, lock),
                                              venv.parent / "install.log", cwd=venv.parent)
        INSTALLER.chain.start()
        if not bpy.app.timers.is_registered(_installer_timer):
            bpy.app.timers.register(_installer_timer, first_interval=0.5)
        self.report({"INFO"}, f"Installing the engine into {venv} (log: {INSTALLER.chain.log_path})")
        return {"FINISHED"}


class ZEROAVATAR_OT_cancel_install(bpy.types.Operator):
    bl_idname = "zeroavatar.cancel_install"
    bl_label = "Cancel Install"
    bl_description = "Stop installing the engine"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return INSTALLER.running

    def execute(self, context: bpy.types.Context) -> set[str]:
        INSTALLER.chain.cancel()
        return {"FINISHED"}


class ZEROAVATAR_OT_redetect_engine(bpy.types.Operator):
    bl_idname = "zeroavatar.redetect_engine"
    bl_label = "Detect Again"
    bl_description = "Forget the cached answer and look for the engine's Python again"

    def execute(self, context: bpy.types.Context) -> set[str]:
        client._TORCH_PROBE.clear()
        found, detail = describe_engine(get_prefs(context))
        self.report({"INFO"} if found else {"WARNING"}, detail)
        return {"FINISHED"}


# -- Check setup ---------------------------------------------------------------------------------
CHECK_ICONS = {"ok": "CHECKMARK", "note": "INFO", "missing": "ERROR"}


def check_argv(python: str, prefs: Any, report: Path, prepare: bool) -> list[str]:
    """The engine's ``check`` for these preferences (body, device, weights), writing ``report``."""
    argv = [python, *client.engine_command("check", "--json", str(report), *body_args(prefs),
                                           "--device", prefs.device, *weights_args(prefs))]
    return argv + (["--prepare"] if prepare else [])


class _Checker:
    """The last "Check Setup": its engine process, then its report (the engine's JSON)."""

    chain: client.CommandChain | None = None
    report_path: Path | None = None
    result: dict | None = None
    error: str = ""

    @property
    def running(self) -> bool:
        return self.chain is not None and self.chain.state.status == "running"

    def poll(self) -> client.ChainState:
        """Advance without blocking; once the engine is done, read its report."""
        state = self.chain.poll() if self.chain is not None else client.ChainState()
        if self.chain is not None and state.status != "running" and self.result is None and not self.error:
            try:  # a nonzero exit only says the default quality cannot run; the report says why
                self.result = json.loads(self.report_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.error = (f"the engine's check did not finish ({state.status}, exit {state.exit_code}): "
                              f"{state.last_line or 'no output'}; log: {self.chain.log_path}")
        return state


CHECKER = _Checker()


def draw_check(col: Any) -> None:
    if CHECKER.running:
        col.label(text=f"Checking: {CHECKER.chain.state.last_line or 'starting the engine'}", icon="TIME")
        return
    if CHECKER.error:
        col.label(text=CHECKER.error[:300], icon="ERROR")
        return
    if CHECKER.result is None:
        return
    for check in CHECKER.result.get("checks", []):
        col.label(text=f"{check['name']}: {check['detail']}"[:300], icon=CHECK_ICONS.get(check["status"], "INFO"))
        if check.get("fix"):
            col.label(text=f"    {check['fix']}"[:300], icon="BLANK1")
    runs = CHECKER.result.get("can_run", {})
    col.label(text="Can run: " + ", ".join(f"{q.title()} {'yes' if ok else 'no'}" for q, ok in runs.items()))


_checker_timer = polling_timer(CHECKER.poll, "check timer")


class ZEROAVATAR_OT_check_setup(bpy.types.Operator):
    bl_idname = "zeroavatar.check_setup"
    bl_label = "Check Setup"
    bl_description = ("Ask the engine what this machine can run with these preferences: body model, person "
                      "detection, GPU, diffusion weights, exports (a few seconds; nothing is downloaded)")

    prepare: BoolProperty(name="Prepare", default=False,
                          description="Also build the first-use items now: the Anny body cache (about 90 s) "
                                      "and, on a GPU, nerfacc's ray marcher (about a minute)")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not CHECKER.running

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = get_prefs(context)
        try:
            engine = find_engine(prefs)
            folder = jobs.user_dir("setup_check")
        except (client.EngineNotFoundError, OSError) as exc:
            self.report({"ERROR"}, f"{exc}. Install the engine, or set Engine Python")
            return {"CANCELLED"}
        report = folder / "report.json"
        report.unlink(missing_ok=True)
        CHECKER.report_path, CHECKER.result, CHECKER.error = report, None, ""
        label = "prepare the first run and check" if self.prepare else "check the setup"
        CHECKER.chain = client.CommandChain([(label, check_argv(engine.path, prefs, report, self.prepare))],
                                            folder / "check.log", cwd=folder,
                                            env=client.engine_env(jobs.package_parent(), engine_env_extra(prefs)))
        CHECKER.chain.start()
        if not bpy.app.timers.is_registered(_checker_timer):
            bpy.app.timers.register(_checker_timer, first_interval=0.5)
        return {"FINISHED"}


CLASSES = (ZeroAvatarPreferences, ZEROAVATAR_OT_install_engine, ZEROAVATAR_OT_cancel_install,
           ZEROAVATAR_OT_redetect_engine, ZEROAVATAR_OT_check_setup)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    if INSTALLER.running:
        INSTALLER.chain.cancel()
    if bpy.app.timers.is_registered(_installer_timer):
        bpy.app.timers.unregister(_installer_timer)
    if CHECKER.running:
        CHECKER.chain.cancel()
    if bpy.app.timers.is_registered(_checker_timer):
        bpy.app.timers.unregister(_checker_timer)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
