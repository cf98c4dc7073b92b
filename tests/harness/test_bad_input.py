"""Bad input to the harness is refused before any work, with the field and the way out named."""
import os
import signal

import pytest
import torch

from kalmannorm.harness import train as train_module
from kalmannorm.harness.cli import main as cli_main
from kalmannorm.harness.records import read_record
from kalmannorm.harness.train import Callback, Terminated, TrainConfig, train

TINY = dict(dataset="digits", arch="preact_resnet8", width=4, limit_train=64, limit_test=32,
            batch_size=16, epochs=1, threads=1, progress=False)
TINY_FLAGS = ["--arch", "preact_resnet8", "--width", "4", "--limit-train", "64", "--limit-test",
              "32", "--batch-size", "16", "--epochs", "1", "--threads", "1", "--quiet"]


def _flags(flags, replace):
    """TINY_FLAGS with the given flags replaced or added."""
    out = list(flags)
    for i in range(0, len(replace), 2):
        if replace[i] in out:
            out[out.index(replace[i]) + 1] = replace[i + 1]
        else:
            out += replace[i:i + 2]
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a run gets as far as loading data."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded: the config was not validated up front")
    monkeypatch.setattr(train_module, "load_dataset", refuse)


@pytest.mark.parametrize("flags, named", [
    (["--eval-batch-size", "0"], "eval_batch_size must be an integer >= 1 (got 0)"),
    (["--epochs", "-2"], "epochs must be an integer >= 1 (got -2)"),
    (["--epochs", "0"], "epochs must be an integer >= 1 (got 0)"),
    (["--lr", "-0.1"], "lr must be a finite number > 0 (got -0.1)"),
    (["--lr", "nan"], "lr must be a finite number > 0 (got nan)"),
    (["--weight-decay", "-0.0001"], "weight_decay must be a finite number >= 0"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1 (got 0)"),
    (["--limit-train", "0"], "limit_train must be an integer >= 1 or None (got 0)"),
    (["--threads", "0"], "threads must be an integer >= 1 or None (got 0)"),
    (["--time-limit", "-5"], "time_limit must be a number of seconds >= 0"),
    (["--norm", "bkn", "--gain", "1.5"], "gain must be in [0, 1]"),
    (["--recipe-option", "momentum=1.5"], "momentum must be in [0, 1)"),
    (["--recipe", "paper", "--recipe-option", "warmup_lr=-1"], "warmup_lr must be finite and >= 0"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--arch", "resnet7"], "unknown architecture 'resnet7'"),
    (["--arch", "resnet18", "--model-option", "colour=1"], "unknown options ['colour']"),
    (["--norm", "groupnorm"], "must be divisible by num_groups"),  # 32 groups, 4 channels
    (["--dataset", "folder"], "needs a data directory"),
    (["--device", "cpu", "--cuda-graphs"], "cuda_graphs needs a CUDA device"),
    (["--arch", "mobilenet_v2_w050", "--width", "8"], "takes width_mult"),
    (["--prediction-option", "rows_per_group=4"], "norm 'batchnorm' builds none"),
    (["--norm", "bkn", "--prediction-option", "rows_per_group=0"],
     "rows_per_group must be a positive int"),
    (["--norm", "bkn", "--prediction", "analytic", "--prediction-option", "rows_per_group=4"],
     "prediction 'analytic' does not take the options ['rows_per_group']; it takes none"),
    (["--norm", "bkn", "--prediction-option", "row_per_group=4"],
     "it takes ['rows_per_group', 'min_prior_values']"),
])
def test_invalid_values_are_refused_before_any_work(tmp_path, capsys, no_work, flags, named):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *_flags(TINY_FLAGS, flags), "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kalmannorm train: error:" in err and named in err, err
    assert not run_dir.exists()


def test_config_is_validated_again_when_train_starts(tmp_path, no_work):
    config = TrainConfig(**TINY, run_dir=str(tmp_path / "r"))
    config.eval_batch_size = 0  # changed after construction
    with pytest.raises(ValueError, match="eval_batch_size"):
        train(config)


def test_every_seed_is_checked_before_the_first_run(tmp_path, capsys, no_work):
    taken = tmp_path / "run" / "seed1"
    taken.mkdir(parents=True)
    (taken / "record.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli_main(["train", *TINY_FLAGS, "--seed", "0", "1", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert os.path.join("seed1", "record.json") in err and "--overwrite" in err
    assert not (tmp_path / "run" / "seed0").exists()


def _damage(path, how):
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "garbage":
        open(path, "wb").write(b"\x80\x04not a checkpoint at all")
    elif how == "empty":
        open(path, "wb").close()
    else:  # a readable torch file that is not a run checkpoint
        torch.save({"weights": torch.zeros(2)}, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the garbage file
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "foreign"])
def test_damaged_checkpoint_names_the_file_and_how_to_start_over(tmp_path, capsys, how):
    run_dir = str(tmp_path / "run")
    train(TrainConfig(**dict(TINY, epochs=1), run_dir=run_dir))
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    _damage(ckpt, how)
    with pytest.raises(ValueError, match="--overwrite") as info:
        train(TrainConfig(**dict(TINY, epochs=2), run_dir=run_dir, resume=True))
    assert ckpt in str(info.value) and "cannot resume" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:  # the command line says the same, no traceback
        cli_main(["train", *_flags(TINY_FLAGS, ["--epochs", "2"]), "--run-dir", run_dir, "--resume"])
    assert exit_info.value.code == 2 and ckpt in capsys.readouterr().err
    # The way out works: start again.
    record = train(TrainConfig(**dict(TINY, epochs=1), run_dir=run_dir, overwrite=True))
    assert record["status"] == "complete"


def test_sigterm_is_recorded_like_ctrl_c(tmp_path):
    class TerminateAtStep(Callback):
        def on_step_end(self, state, loss, errors, batch_size):
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    run_dir = str(tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated):
        train(TrainConfig(**dict(TINY, epochs=3), run_dir=run_dir), callbacks=[TerminateAtStep()])
    record = read_record(os.path.join(run_dir, "record.json"))
    assert record["status"] == "incomplete" and not record["complete"]
    assert record["stop_reason"] == "terminated (SIGTERM)" and record["epochs_done"] == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed after the run


def test_cli_exit_code_after_sigterm(tmp_path, monkeypatch, capsys):
    def terminated(config):
        raise Terminated("received signal 15 (SIGTERM)")

    monkeypatch.setattr(train_module, "train", terminated)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *TINY_FLAGS, "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 143 and "terminated" in capsys.readouterr().err
