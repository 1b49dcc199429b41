"""benchmarks/compare_evals.py: two models' per-image evaluations, paired image by image."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from compare_evals import compare  # noqa: E402


def _write(directory, name, rows):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_paired_difference_and_gaps(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = [-80.0, -120.0, -95.0, -101.0]  # the images' own spread cancels in the paired difference
    _write(a, "test-L5000.rank0.jsonl", [{"index": i, "log_likelihood": v} for i, v in enumerate(base)])
    _write(a, "test-ais.rank0.jsonl", [{"index": i, "log_likelihood": v + 0.5, "acceptance_rate": 0.6,
                                        "step_size": 0.1} for i, v in enumerate(base)])
    # b's rows in another order and split over two ranks' files
    shift = [1.0, 2.0, 3.0, 2.0]
    rows = [{"index": i, "log_likelihood": v + s} for i, (v, s) in enumerate(zip(base, shift))]
    _write(b, "test-L5000.rank0.jsonl", rows[2:])
    _write(b, "test-L5000.rank1.jsonl", rows[:2][::-1])
    _write(b, "test-ais.rank0.jsonl", [{**r, "log_likelihood": r["log_likelihood"] + 1.5, "acceptance_rate": 0.7,
                                        "step_size": 0.2} for r in rows])
    out = compare(a, b)
    m, se = out["L_k"]["b_minus_a"]
    assert m == pytest.approx(2.0) and se == pytest.approx(math.sqrt(2 / 3 / 4))
    assert out["ais"]["b_minus_a"][0] == pytest.approx(3.0)
    assert out["gap_a"][0] == pytest.approx(0.5) and out["gap_b"][0] == pytest.approx(1.5)
    assert out["ais_b"]["step_size"] == pytest.approx(0.2)


def test_different_images_are_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, "test-L5000.rank0.jsonl", [{"index": 0, "log_likelihood": -1.0}, {"index": 1, "log_likelihood": -2.0}])
    _write(b, "test-L5000.rank0.jsonl", [{"index": 0, "log_likelihood": -1.0}])
    with pytest.raises(SystemExit, match="different images"):
        compare(a, b)
