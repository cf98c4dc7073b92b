"""Training harness: records, resume, recipes, parameter groups, CLI."""
import json
import os

import pytest
import torch
from torch import nn

from kalmannorm.harness.cli import main as cli_main
from kalmannorm.harness.records import EPOCH_FIELDS, REQUIRED_FIELDS, read_record
from kalmannorm.harness.report import write_report
from kalmannorm.harness.train import (
    Callback, PaperRecipe, ShortRecipe, TrainConfig, train, weight_decay_groups,
)

TINY = dict(dataset="digits", arch="preact_resnet8", width=4, limit_train=96, limit_test=40,
            batch_size=16, epochs=2, threads=1, progress=False)


def tiny(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "run_dir": str(tmp_path / name), **kw})


def test_tiny_run_writes_complete_record(tmp_path):
    steps_seen = []

    class CountSteps(Callback):
        def on_step_end(self, state, loss, errors, batch_size):
            steps_seen.append((state.epoch, state.step, batch_size))

    record = train(tiny(tmp_path, norm="bkn", gain=0.9, micro_batch=2), callbacks=[CountSteps()])
    on_disk = read_record(str(tmp_path / "run" / "record.json"))
    assert on_disk == json.loads(json.dumps(record))
    for key in REQUIRED_FIELDS:
        assert key in record
    assert record["status"] == "complete" and record["complete"] and record["stop_reason"] == "finished"
    assert record["label"] == "BKN (p=0.9), m=2"
    assert record["config"]["norm"] == "bkn" and record["config"]["micro_batch"] == 2
    assert record["recipe"]["name"] == "short" and record["recipe"]["epochs"] == 2
    assert record["versions"]["torch"] == torch.__version__
    assert record["seed"] == 0 and record["device"] == "cpu" and record["world_size"] == 1
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert record["dataset"]["train_size"] == 96 and record["dataset"]["test_size"] == 40
    assert record["epochs_done"] == 2 and record["steps_per_epoch"] == 6
    assert [e["epoch"] for e in record["history"]] == [0, 1]
    for entry in record["history"]:
        assert set(EPOCH_FIELDS) <= set(entry)
        assert 0 <= entry["test_error"] <= 1 and entry["train_loss"] > 0
        # 7 BKN layers; each but the first has a prior at each of the 6 steps, in each of the
        # 8 groups (one guard decision per group).
        assert entry["guard_priors"] == 6 * 6 * 8 and 0 <= entry["guard_fallbacks"] <= entry["guard_priors"]
    assert record["final"]["test_error"] == record["history"][-1]["test_error"]
    assert record["wall_time"] > 0
    assert len(steps_seen) == 12 and steps_seen[-1] == (1, 6, 16)
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pt")


def test_record_names_its_run_dir_relative_to_where_it_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git checkout: relative to the working directory
    record = train(tiny(tmp_path, epochs=1, run_dir=os.path.join("runs", "x")))
    assert record["run_dir"] == os.path.join("runs", "x")
    assert read_record(os.path.join("runs", "x", "record.json"))["run_dir"] == record["run_dir"]


def _final_state(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    return ckpt["model"], ckpt["optimizer"], ckpt["record"]


@pytest.mark.parametrize("method", [dict(norm="bkn", gain=0.9, micro_batch=2), dict(norm="batchnorm")])
def test_resume_reproduces_uninterrupted_run(tmp_path, method):
    full = train(tiny(tmp_path, "full", epochs=3, **method))
    stopped = train(tiny(tmp_path, "split", epochs=3, time_limit=0, **method))
    assert stopped["status"] == "incomplete" and not stopped["complete"]
    assert stopped["stop_reason"] == "time_limit" and stopped["epochs_done"] == 1
    assert read_record(str(tmp_path / "split" / "record.json"))["status"] == "incomplete"
    resumed = train(tiny(tmp_path, "split", epochs=3, resume=True, **method))
    assert resumed["status"] == "complete" and resumed["resumed_at"] == [1]
    assert [(c["epoch"], c["git_commit"]) for c in resumed["resumed_code"]] == [
        (1, full["git_commit"])]
    model_a, opt_a, rec_a = _final_state(tmp_path / "full")
    model_b, opt_b, rec_b = _final_state(tmp_path / "split")
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    measured = ("epoch_time", "wall_time", "peak_memory")  # of the machine, not of the run
    strip = lambda h: [{k: v for k, v in e.items() if k not in measured} for e in h]
    assert strip(full["history"]) == strip(resumed["history"])


def test_resume_refuses_changed_config_and_existing_run(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="lr"):
        train(tiny(tmp_path, epochs=1, lr=0.05, resume=True))
    again = train(tiny(tmp_path, epochs=1, resume=True))  # finished: nothing left to do
    assert again["status"] == "complete" and again["epochs_done"] == 1


def test_channels_last_trains_the_same_run_and_resumes_in_either_layout(tmp_path):
    method = dict(norm="bkn", gain=0.9, micro_batch=2, epochs=2)
    plain = train(tiny(tmp_path, "plain", **method))
    train(tiny(tmp_path, "last", channels_last=True, time_limit=0, **method))
    model, _, record = _final_state(tmp_path / "last")
    conv = [v for v in model.values() if v.dim() == 4]
    assert conv and all(v.is_contiguous(memory_format=torch.channels_last) for v in conv)
    assert not all(v.is_contiguous() for v in conv)  # the two layouts differ where C, H, W > 1
    assert record["config"]["channels_last"] is True
    # the layout is how a run computes, not what: it may change on resume
    resumed = train(tiny(tmp_path, "last", resume=True, **method))
    assert resumed["status"] == "complete" and resumed["resumed_at"] == [1]
    reference, _, _ = _final_state(tmp_path / "plain")
    model, _, _ = _final_state(tmp_path / "last")
    for key in reference:  # the same arithmetic up to rounding
        torch.testing.assert_close(model[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(plain["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_error"] == b["test_error"]


def test_resume_reads_a_field_the_saving_code_lacked_as_its_default(tmp_path):
    train(tiny(tmp_path, epochs=2, time_limit=0))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["record"]["config"]["cuda_graphs"]  # as written before the field existed
    torch.save(ckpt, path)
    assert train(tiny(tmp_path, epochs=2, resume=True))["status"] == "complete"
    ckpt = torch.load(path, weights_only=True)
    assert "cuda_graphs" not in ckpt["record"]["config"]  # the record keeps what it started with
    ckpt["record"]["config"]["lr"] = 0.05  # a field it had still has to match
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="lr: 0.05"):
        train(tiny(tmp_path, epochs=3, resume=True))


def test_resume_refuses_code_that_resolves_other_norm_options(tmp_path):
    # a run started by code whose BKN layers resolved another option (here: momentum)
    train(tiny(tmp_path, epochs=3, time_limit=0, norm="bkn", micro_batch=2))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    # an option the starting code lacked ran as its default: the run resumes
    options = ckpt["record"]["normalization"]["layers"][0]["options"]
    assert options.pop("backward_window") == 1
    torch.save(ckpt, path)
    assert train(tiny(tmp_path, epochs=3, time_limit=0, resume=True, norm="bkn",
                      micro_batch=2))["epochs_done"] == 2
    ckpt = torch.load(path, weights_only=True)
    options = ckpt["record"]["normalization"]["layers"][0]["options"]
    assert "backward_window" not in options  # the record keeps what it started with
    options["momentum"] = 0.2
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r'cannot resume .*"momentum": 0.2.*--overwrite'):
        train(tiny(tmp_path, epochs=3, resume=True, norm="bkn", micro_batch=2))
    assert path.read_bytes() == before


def test_true_small_batch_and_groupnorm(tmp_path):
    record = train(tiny(tmp_path, batch_size=2, limit_train=10, epochs=1, norm="groupnorm",
                        norm_options=dict(num_groups=2)))
    # the label derives from the configuration: GroupNorm's non-default option is in it
    assert record["steps_per_epoch"] == 5 and record["label"] == "GN, batch 2, num_groups=2"
    gn = record["normalization"]["layers"]
    assert [(e["class"], e["options"]["num_groups"]) for e in gn] == [
        ("kalmannorm.norms.GroupNorm", 2)] and record["normalization"]["predictor"] is None


def test_config_errors():
    with pytest.raises(ValueError, match="unknown config keys \\['bach_size'\\]"):
        TrainConfig.from_dict(dict(bach_size=3))
    with pytest.raises(ValueError, match="micro_batch=3"):
        TrainConfig(batch_size=128, micro_batch=3)
    with pytest.raises(ValueError, match="unknown 'short' recipe keys \\['milestones'\\]"):
        TrainConfig(recipe_options=dict(milestones=[1]))
    with pytest.raises(ValueError, match="short, paper|paper"):
        TrainConfig(recipe="fast")
    with pytest.raises(ValueError, match="ghost_batchnorm"):
        TrainConfig(norm="groupnorm", micro_batch=2).norm_layer()
    with pytest.raises(ValueError, match="norm='bkn'"):
        TrainConfig(norm="ghost_batchnorm", micro_batch=2, gain=0.9).norm_layer()


def test_paper_schedule():
    r = PaperRecipe()
    lrs = {e: r.lr_at(e, 0, 390) for e in (0, 1, 81, 82, 122, 123, 299, 300, 399)}
    assert lrs == {0: 0.01, 1: 0.1, 81: 0.1, 82: 0.01, 122: 0.01, 123: 0.001, 299: 0.001,
                   300: 0.0002, 399: 0.0002}
    assert r.epochs == 400 and r.momentum == 0.9 and not r.nesterov and r.weight_decay == 2e-4


def test_short_schedule_warmup_then_cosine():
    r = ShortRecipe(epochs=10, lr=0.2)
    lrs = [r.lr_at(e, s, 10) for e in range(10) for s in range(10)]
    peak = lrs.index(max(lrs))
    assert 10 <= peak <= 16 and max(lrs) <= 0.2 and lrs[0] == pytest.approx(0.2 * 0.04)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] < 0.001 and r.nesterov


def test_weight_decay_by_module_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    # A parameter whose name looks like a weight but belongs to a norm gets no decay.
    decay, rest = weight_decay_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(rest["params"]) == 4  # conv bias, norm weight and bias, linear bias


def test_cli_train_and_report(tmp_path, capsys):
    run = tmp_path / "cli"
    code = cli_main(["train", "--arch", "preact_resnet8", "--width", "4", "--limit-train", "64",
                     "--limit-test", "32", "--batch-size", "16", "--epochs", "1", "--threads", "1",
                     "--norm", "ghost_batchnorm", "--micro-batch", "2", "--seed", "0", "1",
                     "--run-dir", str(run), "--quiet"])
    assert code == 0
    for seed in (0, 1):
        assert read_record(str(run / f"seed{seed}" / "record.json"))["seed"] == seed
    capsys.readouterr()
    assert cli_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| BN, m=2 | preact_resnet8 | digits | 2 | 1 |" in out
    assert os.path.getsize(tmp_path / "rep" / "test_error.png") > 1000
    assert "BN, m=2" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_config_file_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(TINY, epochs=1, run_dir=str(tmp_path / "r"), colour="red")))
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--config", str(cfg)])
    assert exc.value.code == 2 and "colour" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--arch", "vgg16", "--run-dir", str(tmp_path / "v")])
    assert "preact_resnet20" in capsys.readouterr().err


def test_lazy_command_imported_only_when_chosen(monkeypatch, capsys):
    import subprocess
    import sys

    from kalmannorm.harness import cli

    code = ("import sys; from kalmannorm.harness.cli import build_parser; build_parser(['train', '--help']); "
            "print(any(m.startswith('benchmarks') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [cli.Command("nope", "missing", module="kalmannorm.nope")])
    with pytest.raises(SystemExit):
        cli_main(["nope"])
    assert "needs kalmannorm.nope, which is not available" in capsys.readouterr().err


def test_checkout_command_outside_a_checkout_says_how_to_run_it(monkeypatch, capsys):
    from kalmannorm.harness import cli

    assert cli._checkout_root() is not None  # these tests run from a checkout
    bench = next(c for c in cli.COMMANDS if c.name == "bench")
    monkeypatch.setattr(cli, "_checkout_root", lambda: None)
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c.name != "bench"] + [
        cli.Command("bench", bench.help, module="nobenchmarks.cli", in_checkout=True)])
    with pytest.raises(SystemExit):
        cli_main(["bench"])
    err = capsys.readouterr().err
    assert "python -m nobenchmarks --help" in err and "make bench" in err


def test_report_groups_seeds(tmp_path):
    for seed in (0, 1):
        train(tiny(tmp_path, f"s{seed}", epochs=1, seed=seed, label="mine"))
    result = write_report([str(tmp_path / "s0"), str(tmp_path / "s1" / "record.json")], str(tmp_path / "out"))
    row = [line for line in result["markdown"].splitlines() if line.startswith("| mine")]
    assert len(row) == 1 and "| 2 |" in row[0] and "±" in row[0]


def test_report_reads_a_directory_of_records_under_any_name(tmp_path):
    import shutil

    from kalmannorm.harness.report import collect_records

    for seed in (0, 1):
        train(tiny(tmp_path, f"s{seed}", epochs=1, seed=seed, label="mine"))
    copies = tmp_path / "records"
    copies.mkdir()
    for seed in (0, 1):  # as docs/results/*/records keep them
        shutil.copy(tmp_path / f"s{seed}" / "record.json", copies / f"mine-seed{seed}.json")
    (copies / "benchmark.json").write_text('{"schema": "something else"}')
    (copies / "notes.json").write_text("not json")
    records = collect_records([str(copies)])
    assert [r["seed"] for r in records] == [0, 1]
    assert [r["_path"] for r in records] == [str(copies / f"mine-seed{s}.json") for s in (0, 1)]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "benchmark.json").write_text('{"schema": "something else"}')
    with pytest.raises(FileNotFoundError, match="no run record .*kalmannorm.run/1"):
        collect_records([str(tmp_path / "none")])
    # a damaged record.json is reported, not skipped
    (tmp_path / "s1" / "record.json").write_text('{"schema": "something else"}')
    with pytest.raises(ValueError, match="is not a kalmannorm run record"):
        collect_records([str(tmp_path)])


def test_train_help_reads_its_defaults_from_the_dataclasses(monkeypatch, capsys):
    import dataclasses

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "batch_size")
    monkeypatch.setattr(field, "default", 77)  # a new default shows up in the help unretyped
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "SGD batch per process (default 77)" in out
    assert f"default: the recipe's (paper {PaperRecipe.epochs}, short {ShortRecipe.epochs})" in out
    assert f"paper {PaperRecipe.lr:g}, short {ShortRecipe.lr:g}" in out
    for name in ("norm", "arch", "prediction", "eval_batch_size", "device"):
        assert f"default {getattr(TrainConfig(), name)})" in out


def test_compile_trains_through_torch_compile(tmp_path, monkeypatch):
    """``--compile`` trains through torch.compile (dynamo with the eager backend here: no C++
    toolchain needed) and gives the same first-epoch loss as eager training."""
    compiled = []
    real = torch.compile

    def eager_compile(module, **kw):
        compiled.append(module)
        return real(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    eager = train(tiny(tmp_path, "eager", norm="bkn", micro_batch=2, epochs=1))
    record = train(tiny(tmp_path, "compiled", norm="bkn", micro_batch=2, epochs=1,
                        compile=True))
    assert len(compiled) == 1 and record["config"]["compile"] is True
    assert record["complete"]
    assert record["history"][0]["train_loss"] == pytest.approx(
        eager["history"][0]["train_loss"], rel=1e-4)


def test_record_carries_every_resolved_option_and_the_label_derives_from_them(tmp_path):
    import kalmannorm as kn

    record = train(tiny(tmp_path, norm="bkn", micro_batch=2, epochs=1,
                        norm_options=dict(gain_rule="fixed")))
    layers = record["normalization"]["layers"]
    assert len(layers) == 1 and layers[0]["class"] == "kalmannorm.modules.BatchKalmanNorm2d"
    assert layers[0]["count"] == 7
    # every option of the layer is stored, defaults included, as the layer holds them
    fresh = kn.BatchKalmanNorm2d(4, micro_batch=2, gain_rule="fixed")
    for name, value in layers[0]["options"].items():
        assert getattr(fresh, name) == value, name
    assert {"gain", "gain_rule", "propagate", "guard", "decisions", "running_stats",
            "micro_batch", "momentum", "eps"} <= set(layers[0]["options"])
    assert record["normalization"]["predictor"]["options"]["rows_per_group"] == 1
    assert record["label"] == "BKN, m=2, gain_rule=fixed"
    # the predictor's options reach the predictor, its record and the label
    record = train(tiny(tmp_path, "rows4", norm="bkn", micro_batch=2, epochs=1,
                        prediction_options=dict(rows_per_group=4)))
    assert record["normalization"]["predictor"]["options"]["rows_per_group"] == 4
    assert record["label"] == "BKN, m=2, rows_per_group=4"


def test_report_never_merges_different_configurations_and_flags_repeated_seeds(tmp_path):
    from kalmannorm.harness.report import summarize

    runs = [train(tiny(tmp_path, "a", norm="ghost_batchnorm", micro_batch=2, epochs=1,
                       label="BN, m=2")),
            train(tiny(tmp_path, "b", norm="ghost_batchnorm", micro_batch=2, epochs=2,
                       label="BN, m=2")),   # same label, another schedule
            train(tiny(tmp_path, "c", norm="ghost_batchnorm", micro_batch=2, epochs=1,
                       label="BN, m=2", threads=2))]  # a repeat of "a" (threads: run only)
    older = json.loads(json.dumps(runs[0]))
    del older["config"]["cuda_graphs"]  # a record written before the field: ran at its default
    # ... and before a layer option (the code without it ran as its default does)
    assert older["normalization"]["layers"][0]["options"].pop("backward_window") == 1
    rows = summarize(runs + [older])
    assert len(rows) == 2
    assert [r["runs"] for r in rows] == [3, 1]
    assert rows[0]["duplicate_seeds"] == [0] and rows[1]["duplicate_seeds"] == []
    # the label says what sets the rows apart
    assert rows[0]["label"] == "BN, m=2 [config.epochs=1, recipe.epochs=1]"
    assert rows[1]["label"] == "BN, m=2 [config.epochs=2, recipe.epochs=2]"
    from kalmannorm.harness.report import configuration, markdown_table
    assert "1 (3 runs; seed 0 repeated)" in markdown_table(rows)
    # an option the record has is what ran, default or not
    other = json.loads(json.dumps(older))
    other["normalization"]["layers"][0]["options"]["backward_window"] = 2
    assert configuration(other) != configuration(older) == configuration(runs[0])


def test_reparametrized_conv_weights_decay_through_their_parameter():
    import kalmannorm as kn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    kn.standardize_conv_weights(model)
    decay, rest = weight_decay_groups(model, 5e-4)
    params = decay["params"]
    assert [p is model[0].parametrizations.weight.original for p in params] == [True, False]
    assert params[1] is model[3].weight and all(p.is_leaf for p in params)
    assert sum(p.numel() for g in (decay, rest) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
