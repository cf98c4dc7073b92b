"""experiments/statistics_error.py: a record per (weights, prediction) from a real checkpoint,
and the committed page regenerates from the committed records."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kalmannorm as kn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import statistics_error  # noqa: E402


def test_a_record_measures_the_weights_of_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = statistics_error.build("resnet", None, "sampled", seed=3)
    state = {k: v for k, v in trained.state_dict().items() if "guard" not in k}
    data = kn.harness.data.load_dataset("cifar10_subset")
    record = statistics_error.measure(data, "resnet", dict(source="test", row="init", seed=3),
                                      state, "analytic", seed=3)
    assert record["convert_options"] == {"micro_batch": 2, "prediction": "analytic"}
    assert len(record["layers"]) == 19 and record["layers"][0]["layer"] == "norm0"
    assert record["layers"][1]["after"] == "Conv2d 3x3"
    json.dumps(record, allow_nan=False)  # plain data: no NaN (the first layer's prediction)
    assert record["layers"][0]["prediction_log_var_error"] is None
    with pytest.raises(ValueError, match="lacks"):
        statistics_error.build("resnet", {"norm0.weight": torch.ones(8)}, "sampled", seed=3)


def test_committed_page_regenerates_from_the_committed_records(tmp_path):
    committed = os.path.join(REPO, statistics_error.PAGE)
    if not os.path.exists(committed):
        pytest.skip("no page committed yet")
    subprocess.run([sys.executable, os.path.join(REPO, "experiments", "statistics_error.py"),
                    "--no-run", "--write", "--page", str(tmp_path / "page.md")],
                   check=True, capture_output=True, cwd=REPO)
    with open(committed) as f:
        assert (tmp_path / "page.md").read_text() == f.read()
