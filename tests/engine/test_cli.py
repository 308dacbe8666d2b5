"""The command line's own parsing: what it accepts and the errors it gives (the engine runs
end to end in test_bad_inputs.py and test_faults.py)."""

from __future__ import annotations

import pytest

from zeroavatar_blender.engine.cli import _settings_from_args, build_parser, checked_height, read_heights
from zeroavatar_blender.engine.errors import BadInputError
from zeroavatar_blender.engine.pipeline import JobSettings


def test_height_in_metres_or_a_hint_at_the_unit():
    assert checked_height(1.75) == 1.75
    with pytest.raises(BadInputError) as info:
        checked_height(175)
    assert "--height 1.75" in info.value.hint
    for bad in (0.0, -1.7, float("nan"), float("inf"), 3.1):
        with pytest.raises(BadInputError, match="not a person's height in metres"):
            checked_height(bad)


def test_heights_file(tmp_path):
    path = tmp_path / "heights.csv"
    path.write_text("\ufeffphoto,height\n# the cast\njane.jpg, 1.68\n\nbob,1.9\n", encoding="utf-8")
    assert read_heights(path) == {"jane.jpg": 1.68, "bob": 1.9}


@pytest.mark.parametrize("text, words", [
    ("jane.jpg,1.68\nbob.jpg,tall\n", ("line 2", "'tall' is not a number")),
    ("jane.jpg,168\n", ("line 1", "--height 1.68")),
    ("jane.jpg,1.6,extra\n", ("line 1", "expected `photo,metres`")),
])
def test_heights_file_errors_name_the_line(tmp_path, text, words):
    path = tmp_path / "heights.csv"
    path.write_text(text)
    with pytest.raises(BadInputError) as info:
        read_heights(path)
    message = f"{info.value.message} {info.value.hint}"
    assert all(w in message for w in words), message


def test_unreadable_heights_file(tmp_path):
    with pytest.raises(BadInputError, match="cannot read the heights file"):
        read_heights(tmp_path / "missing.csv")


def test_height_and_levels_of_detail_reach_the_job_settings():
    args = build_parser().parse_args(["generate", "p.png", "--out", "job", "--height", "1.7", "--lods", "2"])
    settings = _settings_from_args(args, JobSettings())
    assert settings.height_m == 1.7 and settings.lods == 2
    default = _settings_from_args(build_parser().parse_args(["generate", "p.png", "--out", "job"]), JobSettings())
    assert default.height_m is None and default.lods == 0
    with pytest.raises(SystemExit):  # argparse: exit 2 with the choices
        build_parser().parse_args(["finalise", "job", "--lods", "4"])
