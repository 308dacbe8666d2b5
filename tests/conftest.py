"""Shared test set-up: offline hubs, a private HOME (bpy writes there), the prebuilt Anny cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("ZEROAVATAR_ANNY_CACHE", str(ROOT / ".cache" / "anny"))
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ[var] = "1"


@pytest.fixture(scope="session")
def anny_body():
    from zeroavatar_blender.engine.body import load_body

    return load_body("anny")
