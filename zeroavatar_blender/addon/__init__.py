"""The Blender side of ZeroAvatar (bpy + numpy + stdlib; never torch, never the engine package).

register() wires the property groups, preferences, operators and sidebar panels, the polling
timer, and the hooks that stop running engines when Blender quits, a file is loaded or the
add-on is disabled (an orphaned engine would hold the GPU and its job folder).
"""

from __future__ import annotations

import atexit

import bpy
from bpy.app.handlers import persistent

from . import client, operators, panels, preferences, properties

_MODULES = (properties, preferences, operators, panels)


@persistent
def _on_load_pre(*_args: object) -> None:
    """The scenes that own the running jobs are about to go: stop the engines (they keep a
    checkpoint; Resume continues)."""
    client.stop_all(timeout=2.0)


@persistent
def _on_load_post(*_args: object) -> None:
    """A saved 'running' status has no engine behind it any more: say so and offer Resume."""
    for scene in bpy.data.scenes:
        props = getattr(scene, "zeroavatar", None)
        if props is not None and props.status == "RUNNING" and client.active_job(scene) is None:
            props.status = "INTERRUPTED"
            props.message = "Interrupted when Blender closed; Resume continues the job"


def _at_exit() -> None:
    try:
        client.stop_all(timeout=2.0)
    except Exception:  # noqa: BLE001 - the interpreter is going away
        pass


def register() -> None:
    for module in _MODULES:
        module.register()
    if _on_load_pre not in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.append(_on_load_pre)
    if _on_load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_on_load_post)
    atexit.register(_at_exit)


def unregister() -> None:
    client.stop_all(timeout=2.0)
    if bpy.app.timers.is_registered(client.poll_all):
        bpy.app.timers.unregister(client.poll_all)
    for handlers, fn in ((bpy.app.handlers.load_pre, _on_load_pre), (bpy.app.handlers.load_post, _on_load_post)):
        if fn in handlers:
            handlers.remove(fn)
    atexit.unregister(_at_exit)
    for module in reversed(_MODULES):
        module.unregister()
