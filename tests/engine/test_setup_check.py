"""`check`: the real command on this machine (CPU, Anny cache, mediapipe), with the weights and
body files users give it, and its report's arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.guidance import tiny_models as tm
from zeroavatar_blender import protocol
from zeroavatar_blender.engine.setup_check import Check, Report

ROOT = Path(__file__).resolve().parents[2]


def check(tmp_path: Path, *args: str, **env: str) -> tuple[int, dict, str]:
    out = tmp_path / f"check_{len(list(tmp_path.glob('check_*.json')))}.json"
    proc = subprocess.run([sys.executable, "-m", "zeroavatar_blender.engine", "check", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "empty_hf"), **env))
    assert out.exists(), proc.stderr[-2000:]
    return proc.returncode, json.loads(out.read_text()), proc.stdout


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"].split(" (")[0]: c for c in report["checks"]}


def test_a_cpu_machine_without_weights_runs_fast_and_standard_and_is_told_what_full_needs(tmp_path):
    code, report, text = check(tmp_path)
    assert code == protocol.EXIT_OK
    assert report["can_run"] == {"fast": True, "standard": True, "full": False}
    checks = by_name(report)
    assert checks["body model"]["status"] == "ok" and "cache ready" in checks["body model"]["detail"]
    assert checks["person detection"]["status"] == "ok"
    # on the CPU, full is a choice first (the same words the run gives), then a missing weight
    assert checks["device"]["blocks"] == ["full"] and checks["device"]["code"] == protocol.EXIT_NEEDS_CHOICE
    assert "--allow-slow" in checks["device"]["fix"]
    weights = checks["diffusion weights"]
    assert weights["status"] == "missing" and weights["code"] == protocol.EXIT_MISSING_MODEL
    assert "--sd-weights" in weights["fix"] and "empty_hf" in weights["fix"]
    assert text.splitlines()[-1] == "can run: fast yes, standard yes, full no"
    code, _, _ = check(tmp_path, "--quality", "full")
    assert code == protocol.EXIT_NEEDS_CHOICE
    code, _, _ = check(tmp_path, "--quality", "full", "--allow-slow")
    assert code == protocol.EXIT_MISSING_MODEL


def test_weights_given_as_folders_are_found_without_loading_them(tmp_path):
    tiny = tm.make_layouts(tmp_path / "tiny")
    code, report, _ = check(tmp_path, "--quality", "full", "--allow-slow", "--sd-weights", str(tiny.sd_dir),
                            "--controlnet-weights", str(tiny.controlnet_dir))
    assert code == protocol.EXIT_OK and report["can_run"]["full"]
    weights = by_name(report)["diffusion weights"]
    assert weights["status"] == "ok" and str(tiny.sd_dir) in weights["detail"] and "not loaded" in weights["detail"]


def test_a_missing_smpl_file_stops_every_quality(tmp_path):
    code, report, _ = check(tmp_path, "--body", "smpl", "--body-model-path", str(tmp_path / "nowhere"))
    assert code == protocol.EXIT_MISSING_MODEL
    assert report["can_run"] == {"fast": False, "standard": False, "full": False}
    body = by_name(report)["body model"]
    assert body["status"] == "missing" and body["fix"]


def test_a_present_smpl_file_is_loaded(tmp_path):
    from tests.engine.body.synthetic_smpl import write_model_folder

    from zeroavatar_blender.engine.body import load_body

    folder = write_model_folder(tmp_path / "smpl")
    code, report, _ = check(tmp_path, "--body", "smpl", "--body-model-path", str(folder))
    assert code == protocol.EXIT_OK
    assert f"{load_body('smpl', folder).num_vertices} vertices from {folder}" in by_name(report)["body model"]["detail"]


def test_no_anny_cache_yet_is_a_note_that_names_the_first_runs_cost(tmp_path):
    empty = tmp_path / "anny_cache"
    code, report, _ = check(tmp_path, ZEROAVATAR_ANNY_CACHE=str(empty))
    assert code == protocol.EXIT_OK and report["can_run"]["fast"]
    body = by_name(report)["body model"]
    assert body["status"] == "note" and "90 s" in body["detail"] and "--prepare" in body["fix"]
    assert not empty.exists()  # looked, built nothing


def test_prepare_with_the_cache_ready_says_so_and_reports(tmp_path):
    code, report, _ = check(tmp_path, "--prepare")
    assert code == protocol.EXIT_OK and by_name(report)["body model"]["status"] == "ok"


@pytest.mark.parametrize("quality, expected", [("fast", 0), ("standard", 0), ("full", 9)])
def test_the_exit_code_is_the_first_check_that_stops_the_quality(quality, expected):
    report = Report([Check("device", "note", "CPU", blocks=("full",), code=9),
                     Check("weights", "missing", "none", blocks=("full",), code=5),
                     Check("export", "note", "no bpy")])
    assert report.exit_code(quality) == expected
    assert report.can_run(quality) == (expected == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_device_and_the_ray_marcher_are_reported(tmp_path):
    code, report, _ = check(tmp_path, "--device", "cuda")
    checks = by_name(report)
    assert code == protocol.EXIT_OK and checks["device"]["status"] == "ok" and "GiB" in checks["device"]["detail"]
    assert checks["GPU ray marcher"]["status"] in ("ok", "note") and checks["GPU ray marcher"]["detail"]
    assert "full" not in checks["device"]["blocks"]


def test_asking_for_cuda_without_one_is_a_choice_for_every_quality(tmp_path):
    """The same answer a run gets: not a bug (exit 1), a choice (9) that names the way out. The
    engine is shown no GPU, so this runs on a GPU machine too."""
    code, report, _ = check(tmp_path, "--device", "cuda", CUDA_VISIBLE_DEVICES="")
    device = by_name(report)["device"]
    assert code == protocol.EXIT_NEEDS_CHOICE and device["code"] == protocol.EXIT_NEEDS_CHOICE
    assert "--device auto or cpu" in device["fix"] and report["can_run"] == dict.fromkeys(("fast", "standard", "full"), False)
