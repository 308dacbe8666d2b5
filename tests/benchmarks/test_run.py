"""The benchmark runner's merge of a partial rerun into the last full run."""

import json

from tests.benchmarks.run import merged_results
from zeroavatar_blender.evaluation.benchmark import CaseResult


def _result(case: str, quality: str, chamfer: float) -> CaseResult:
    return CaseResult(case, quality, None, True, metrics={"chamfer_cm": chamfer})


def test_a_rerun_replaces_only_its_own_rows_in_the_old_order(tmp_path):
    old = [_result("a", "fast", 1.0), _result("a", "standard", 2.0), _result("b", "fast", 3.0)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": {}, "results": [r.__dict__ for r in old]}))
    merged = merged_results(path, [_result("a", "standard", 9.0), _result("c", "fast", 4.0)])
    assert [(r.case, r.quality, r.metrics["chamfer_cm"]) for r in merged] == [
        ("a", "fast", 1.0), ("a", "standard", 9.0), ("b", "fast", 3.0), ("c", "fast", 4.0)]
    assert merged_results(tmp_path / "missing.json", old) == old
