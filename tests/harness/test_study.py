"""The study driver (experiments/study.py): its smoke mode runs the whole pipeline on the bundled
CIFAR subset (what the GPU script runs, on a CPU), its grid and its verdict rule, and the
committed page regenerates from the committed records."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import study  # noqa: E402
from page_check import assert_page_regenerates  # noqa: E402 (this folder)


def test_grid_runs_every_row_on_the_resnet_and_the_verdict_rows_on_mobilenet():
    jobs = study.grid(["resnet", "mobilenet_s1"], None, [0], {"mobilenet_s1": [0, 1]})
    assert [j for j in jobs if j[0] == "resnet"] == [("resnet", r, 0) for r in study.STUDY_ROWS]
    assert {(r, s) for f, r, s in jobs if f == "mobilenet_s1"} == {
        (r, s) for r in study.VERDICT_ROWS for s in (0, 1)}
    assert jobs.index(("mobilenet_s1", "bn-m2", 1)) > jobs.index(("resnet", "mabn-m2", 0))
    # a third seed for the rows the verdicts rest on, after every row's first two
    third = study.grid(["resnet", "mobilenet_s1"], None, [0, 1], verdict_seeds=[2])
    assert third[:len(third) - 2 * len(study.VERDICT_ROWS)] == study.grid(
        ["resnet", "mobilenet_s1"], None, [0, 1])
    assert third[-2 * len(study.VERDICT_ROWS):] == [
        (f, r, 2) for f in ("resnet", "mobilenet_s1") for r in study.VERDICT_ROWS]
    assert study.grid(["resnet"], ["bn-m2", "frn"], [0], verdict_seeds=[2]) == [
        ("resnet", "bn-m2", 0), ("resnet", "frn", 0), ("resnet", "bn-m2", 2)]


@pytest.mark.parametrize("family", list(study.FAMILIES))
def test_every_row_is_a_valid_train_command_and_builds_its_model(family):
    """Each row's arguments parse, validate and build the family's model, so that no row of a
    long grid fails only when its turn comes (a JSON option value, an option a layer rejects)."""
    from kalmannorm.harness.cli import build_parser, config_from_args
    from kalmannorm.harness.models import build_model

    args = argparse.Namespace(dataset="cifar10", root="/tmp/unused", epochs=1, device="cpu",
                              data_dir=None, width=4, threads=1, cuda_graphs=False,
                              limit_train=None, deadline=None, channels_last=[family])
    for row in study.ROWS:
        argv = study.command((family, row, 0), args)[3:]  # after "python -m kalmannorm"
        assert argv[0] == "train"
        (config,) = config_from_args(build_parser(argv).parse_args(argv))
        assert config.channels_last  # the family asked for it
        model = build_model(config.arch, 10, config.norm_layer(), 3, width=config.width,
                            **config.model_options)
        assert config.label == study.ROWS[row][0]
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_screening_grid_uses_its_own_rows_seeds_and_records():
    jobs = study.grid(study.PLANNED_FAMILIES, study.SCREEN_ROWS, study.SCREEN_SEEDS)
    assert {s for _, _, s in jobs}.isdisjoint({0, 1, 2})  # none of the study's seeds
    assert {(f, r) for f, r, _ in jobs} == {(f, r) for f in study.PLANNED_FAMILIES
                                            for r in study.SCREEN_ROWS}
    assert study.MICRO_BN in study.SCREEN_ROWS


def test_record_names_round_trip():
    for job in [("resnet", "bn-m2", 0), ("mobilenet_s1", "bkn-released", 11)]:
        assert study.job_of(study.record_name(job)) == job
        assert study.job_of(os.path.join("some", "dir", study.record_name(job))) == job


def test_verdict_rule():
    assert study.verdict([10.0, 10.2], [12.0, 12.1]) == "win"
    assert study.verdict([12.0, 12.1], [10.0, 10.2]) == "lose"
    assert study.verdict([10.0, 12.0], [11.0, 11.5]) == "tie"  # within the seed spread
    assert study.verdict([10.0], [12.0, 12.1]) == "n/a (<2 seeds)"


def test_smoke_runs_the_pipeline_and_writes_the_page(tmp_path):
    records = tmp_path / "records"
    subprocess.run([sys.executable, os.path.join(REPO, "experiments", "study.py"), "--smoke",
                    "--families", "resnet", "--rows", "bn-full", "bn-m2", "bkn-default",
                    "--seeds", "0", "--root", str(tmp_path / "runs"), "--records", str(records),
                    "--page", str(tmp_path / "study.md"), "--write"],
                   check=True, capture_output=True, cwd=REPO, env=dict(os.environ, MPLBACKEND="Agg"))
    names = sorted(os.listdir(records))
    assert names == [f"resnet-{r}-seed0.json" for r in ("bkn-default", "bn-full", "bn-m2")]
    bkn = json.loads((records / names[0]).read_text())
    assert bkn["complete"] and bkn["normalization"]["layers"][0]["options"]["decisions"] == "group"
    page = (tmp_path / "study.md").read_text()
    for row in ("bn-full", "bn-m2", "bkn-default"):  # seed 0's error, then 1 epoch
        assert re.search(rf"\| {re.escape(study.ROWS[row][0])} \| 0: \d+\.\d\d \| 1 \|", page)
    assert (tmp_path / "study" / "resnet.png").exists()
    # a second call finds every run complete and runs nothing
    again = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "study.py"),
                            "--smoke", "--families", "resnet", "--rows", "bn-full", "bn-m2",
                            "bkn-default", "--seeds", "0", "--root", str(tmp_path / "runs"),
                            "--records", str(records)],
                           check=True, capture_output=True, text=True, cwd=REPO)
    assert "3 runs, 0 to do" in again.stdout


def test_writing_the_study_page_rewrites_the_screening_page_that_reads_its_records(
        tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(study, "PAGE", str(tmp_path / "study.md"))
    monkeypatch.setattr(study, "SCREEN_PAGE", str(tmp_path / "screening.md"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    study.main(["--no-run", "--write"])
    for name in ("study.md", "screening.md"):
        with open(os.path.join(REPO, "docs", "results", name)) as f:
            assert (tmp_path / name).read_text() == f.read()


@pytest.mark.parametrize("screen", [False, True], ids=["study", "screening"])
def test_committed_page_regenerates_from_the_committed_records(tmp_path, screen):
    assert_page_regenerates(tmp_path, "study.py",
                            os.path.join(REPO, study.SCREEN_PAGE if screen else study.PAGE),
                            *(["--screen"] if screen else []))


def test_screening_decision_needs_wins_on_every_family_and_in_the_confirmation():
    def cells(errors):  # {(family, row): errors}
        return {key: {"errors": e} for key, e in errors.items()}

    r, m = study.PLANNED_FAMILIES
    base = {(r, "bn-m2"): [40.0, 40.2], (m, "bn-m2"): [60.0, 60.2]}
    screened = cells({**base, (r, "bkn-default"): [35.0, 35.1], (m, "bkn-default"): [55.0, 55.2],
                      (r, "bkn-released"): [35.0, 35.1], (m, "bkn-released"): [60.0, 61.0],
                      (r, "bkn-time"): [35.0, 35.1], (m, "bkn-time"): [55.0, 55.2],
                      (r, "bkn-rows4"): [40.0, 40.1],  # ties on the ResNet: MobileNet not run
                      (r, "bkn-analytic"): [35.0, 35.1]})  # wins, MobileNet to come
    confirmed = cells({(r, "bn-m2"): [22.0, 22.2], (r, "bkn-default"): [20.0, 20.1],
                       (r, "bkn-time"): [22.0, 23.0]})
    outcome = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2]
               for line in study.decision(screened, confirmed) if line.startswith("| BKN")}
    assert outcome == {study.ROWS["bkn-default"][0]: "adopted",
                       study.ROWS["bkn-released"][0]: "does not qualify",  # ties on MobileNet
                       study.ROWS["bkn-time"][0]: "qualifies, not confirmed",
                       study.ROWS["bkn-rows4"][0]: "does not qualify",
                       study.ROWS["bkn-analytic"][0]: "pending (screening incomplete)",
                       **{study.ROWS[row][0]: "pending (screening incomplete)"
                          for row in ("bkn-detached", "bkn-smooth", "bkn-time-smooth")}}


def test_each_option_is_judged_against_the_row_without_it():
    r, m = study.PLANNED_FAMILIES
    screened = {(r, "bkn-default"): {"errors": [40.0, 40.2]},
                (r, "bkn-smooth"): {"errors": [38.0, 38.1]},
                (r, "bkn-time"): {"errors": [40.0, 41.0]}}
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2:]
            for line in study.option_effects(screened) if line.startswith("| BKN")}
    assert rows[study.ROWS["bkn-smooth"][0]][0].startswith("win (38.05")
    assert rows[study.ROWS["bkn-time"][0]][0].startswith("tie")
    assert rows[study.ROWS["bkn-smooth"][0]][1] == "not run |"
    assert rows[study.ROWS["bkn-detached"][0]] == ["not run", "not run |"]


def test_memory_format_speed_times_the_study_rows_in_both_layouts(tmp_path):
    import memory_format_speed as speed

    records, page = tmp_path / "records", tmp_path / "memory-format.md"
    speed.main(["--family", "resnet", "--width", "4", "--rows", "bn-m2", "bkn-default",
                "--batch", "8", "--rounds", "2", "--warmup", "1", "--records", str(records),
                "--page", str(page), "--write"])
    (name,) = os.listdir(records)
    record = json.loads((records / name).read_text())
    assert record["config"]["model_arguments"]["bkn-default"] == study.model_arguments(
        "resnet", "bkn-default", 4)
    for r in record["results"]:
        assert len(r["contiguous_ms"]) == len(r["channels_last_ms"]) == 2
        assert r["ratio"] > 0
        assert f"| {study.ROWS[r['row']][0]} | {r['median_contiguous_ms']:.0f} |" in page.read_text()


def test_committed_memory_format_page_regenerates_from_its_records(tmp_path):
    import memory_format_speed as speed

    assert_page_regenerates(tmp_path, "memory_format_speed.py", os.path.join(REPO, speed.PAGE))
