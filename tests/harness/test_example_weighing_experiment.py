"""experiments/example_weighing.py: alpha is chosen on one test half and scored on the other,
and the committed page regenerates from the committed records."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import example_weighing  # noqa: E402
from page_check import assert_page_regenerates  # noqa: E402 (this folder)


def test_alpha_is_chosen_on_one_half_and_scored_on_the_other():
    alphas = [0.0, 0.1, 0.2]
    # half 0 prefers 0.2, half 1 prefers 0.1; each is scored where the other chose
    result = example_weighing.cross_fit([[0.30, 0.25, 0.20], [0.32, 0.22, 0.26]], alphas)
    assert result["chosen"] == [0.2, 0.1]
    assert result["weighed_error"] == pytest.approx((0.26 + 0.25) / 2)
    assert result["plain_error"] == pytest.approx(0.31)
    # a tie goes to the smaller alpha, so no weighing when it does not help
    assert example_weighing.cross_fit([[0.2, 0.2, 0.3], [0.2, 0.2, 0.2]], alphas)["chosen"] == [0, 0]


def test_committed_page_regenerates_from_the_committed_records(tmp_path):
    assert_page_regenerates(tmp_path, "example_weighing.py",
                            os.path.join(REPO, example_weighing.PAGE))
