"""ZeroAvatar for Blender: one photo of a person to a rigged, textured avatar.

This file must import without bpy: the engine (``python -m zeroavatar_blender.engine``) runs in
its own Python that has torch but no Blender. The Blender side is imported inside register().
"""

__version__ = "0.1.0"


def register() -> None:
    from .addon import register as _register

    _register()


def unregister() -> None:
    from .addon import unregister as _unregister

    _unregister()
