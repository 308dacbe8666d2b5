import json
import math

import pytest

from zeroavatar_blender.engine.guidance.schedules import Schedule, as_schedule, value_at


def test_linear_interpolation_and_constant_ends():
    s = Schedule([(0, 0.98), (1000, 0.5)])
    assert s(0) == 0.98 and s(1000) == 0.5
    assert math.isclose(s(500), 0.74)
    assert math.isclose(s(250), 0.98 - 0.48 * 0.25)
    assert s(-10) == 0.98 and s(5000) == 0.5  # held beyond the ends


def test_several_segments_and_a_late_start():
    s = Schedule([(100, 1.0), (200, 3.0), (400, 2.0)])
    assert s(0) == 1.0 and s(100) == 1.0
    assert math.isclose(s(150), 2.0)
    assert math.isclose(s(300), 2.5)
    assert s(400) == 2.0 and s(10_000) == 2.0


def test_jump_at_repeated_step():
    # threestudio-style "hold, then switch": the later point wins from the step on.
    s = Schedule([(0, 0.98), (500, 0.98), (500, 0.5)])
    assert s(499.9) == 0.98
    assert s(500) == 0.5 and s(900) == 0.5


def test_step_interpolation_for_resolutions():
    s = Schedule([(0, 64), (1000, 128), (3000, 256)], interpolation="step")
    assert [s.at_int(x) for x in (0, 999, 1000, 2999, 3000, 10**6)] == [64, 64, 128, 128, 256, 256]
    lin = Schedule([(0, 64), (1000, 128)])
    assert lin.at_int(500) == 96 and lin.at_int(501) == 96  # 96.064 rounds to 96


def test_constants_and_coercion():
    assert Schedule.constant(7.5)(123) == 7.5
    assert Schedule(3.0)(10) == 3.0
    assert Schedule.constant(2).is_constant and not Schedule([(0, 1), (1, 2)]).is_constant
    assert value_at(0.02, 999) == 0.02
    assert value_at([(0, 0.0), (10, 1.0)], 5) == 0.5
    s = Schedule([(0, 1.0)])
    assert as_schedule(s) is s
    with pytest.raises(TypeError):
        as_schedule(True)


@pytest.mark.parametrize("points", [[], [(10, 1.0), (5, 2.0)], [(0, float("nan"))], [(float("inf"), 1.0)]])
def test_bad_points_are_refused(points):
    with pytest.raises(ValueError):
        Schedule(points)


def test_bad_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation"):
        Schedule([(0, 1)], interpolation="cubic")


def test_json_round_trip():
    s = Schedule([(0, 0.98), (500, 0.98), (500, 0.5), (2000, 0.2)], interpolation="linear")
    d = json.loads(json.dumps(s.to_json()))
    assert Schedule.from_json(d) == s
    r = Schedule([(0, 64), (100, 128)], interpolation="step")
    assert Schedule.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert Schedule.from_json([[0, 1.0], [10, 2.0]])(5) == 1.5
    assert Schedule.from_json(0.3)(99) == 0.3
    assert "Schedule([(0, 0.98)" in repr(s)
