"""``kalmannorm statistics-error`` on a real training run, experiments/statistics_error.py's
records, and the committed page regenerated from the committed records."""
import json
import os
import sys

import pytest
import torch

from kalmannorm.harness.cli import main as cli_main
from kalmannorm.harness.diagnose import average_statistics_error, model_from_run
from kalmannorm.harness.train import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import statistics_error  # noqa: E402
from page_check import assert_page_regenerates  # noqa: E402 (this folder)

TINY = dict(dataset="digits", arch="preact_resnet8", width=4, limit_train=96, limit_test=40,
            batch_size=16, epochs=1, threads=1, progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "bn-m2"
    train(TrainConfig(**TINY, norm="ghost_batchnorm", micro_batch=2, run_dir=str(run_dir)))
    return str(run_dir)


def test_the_command_measures_a_trained_run(trained_run, tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert cli_main(["statistics-error", trained_run, "--batches", "2", "--batch-size", "16",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["convert_options"] == {"micro_batch": 2, "prediction": "sampled"}
    layers = saved["layers"]
    assert len(layers) == 7 and layers[0]["layer"] == "norm0"
    assert layers[0]["prediction_log_var_error"] is None  # no layer below the first
    assert all(la["prediction_log_var_error"] is not None for la in layers[1:])
    # the running statistics are the trained run's, not fresh ones
    config, data, model = model_from_run(trained_run)
    assert not torch.equal(model.norm0.running_var, torch.ones_like(model.norm0.running_var))
    closer = sum(la["estimate_log_var_error"] < la["observed_log_var_error"] for la in layers[1:])
    assert f"closer to the batch's than the group's own in {closer} of 6 layers" in printed


def test_the_command_refuses_what_it_cannot_measure(trained_run, tmp_path, capsys):
    gn = tmp_path / "gn"
    train(TrainConfig(**TINY, norm="groupnorm", norm_options=dict(num_groups=2),
                      run_dir=str(gn)))
    for argv, message in [([str(gn)], "trained with --norm groupnorm"),
                          ([str(tmp_path / "none")], "record.json not found"),
                          ([trained_run, "--batches", "100"], "ask for fewer")]:
        with pytest.raises(SystemExit) as exc:
            cli_main(["statistics-error", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_an_experiment_record_is_plain_data(trained_run, monkeypatch):
    monkeypatch.setattr(statistics_error, "BATCHES", 2)
    monkeypatch.setattr(statistics_error, "BATCH", 16)
    config, data, model = model_from_run(trained_run)
    record = statistics_error.measure(data, "resnet", dict(source="test", row="bn-m2", seed=3),
                                      model, "analytic", seed=3)
    assert record["convert_options"] == {"micro_batch": 2, "prediction": "analytic"}
    assert record["layers"][1]["after"] == "Conv2d 3x3" and len(record["layers"]) == 7
    json.dumps(record, allow_nan=False)
    # the same batches and samples as the harness function, which the command runs
    net = statistics_error.kn.convert_batchnorm(model, micro_batch=2, prediction="analytic")
    assert record["layers"] == average_statistics_error(net, data, 2, 16, 3)


def test_committed_page_regenerates_from_the_committed_records(tmp_path):
    assert_page_regenerates(tmp_path, "statistics_error.py",
                            os.path.join(REPO, statistics_error.PAGE))
