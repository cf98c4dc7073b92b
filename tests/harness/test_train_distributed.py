"""Two CPU ranks (gloo) under torch.distributed.run: identical replicas, one record from rank 0."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ARGS = ["--arch", "preact_resnet8", "--width", "4", "--limit-train", "64", "--limit-test", "32",
        "--batch-size", "8", "--epochs", "2", "--micro-batch", "2", "--device", "cpu", "--quiet"]


def _launch(tmp_path, *command):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_identical_parameters(tmp_path):
    # train() with a callback that saves every rank's final model; rank 1 is given its own
    # run_dir (a runtime field) to show it writes nothing.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from kalmannorm.harness.cli import build_parser, config_from_args
        from kalmannorm.harness.train import Callback, train

        class SaveFinal(Callback):
            def on_train_end(self, state, record):
                torch.save(dict(model=state.model.state_dict(), world=state.world_size),
                           f"final_rank{{state.rank}}.pt")

        rank = int(os.environ["RANK"])
        args = build_parser(["train"]).parse_args(["train", *{ARGS!r}, "--norm", "bkn", "--gain", "0.9", "--run-dir", f"run_rank{{rank}}"])
        (config,) = config_from_args(args)
        train(config, callbacks=[SaveFinal()])
    """))
    _launch(tmp_path, str(driver))
    a = torch.load(tmp_path / "final_rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "final_rank1.pt", weights_only=True)
    assert a["world"] == b["world"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    record = json.loads((tmp_path / "run_rank0" / "record.json").read_text())
    assert record["world_size"] == 2 and record["global_batch_size"] == 16
    assert record["steps_per_epoch"] == 64 // 2 // 8 and record["complete"]
    assert not (tmp_path / "run_rank1").exists()


def test_cli_under_torchrun(tmp_path):
    _launch(tmp_path, "-m", "kalmannorm", "train", *ARGS, "--run-dir", "run", "--norm", "ghost_batchnorm")
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "complete" and record["label"] == "BN, m=2"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "record.json"]
