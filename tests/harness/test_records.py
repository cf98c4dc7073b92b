"""Run records: portable paths, atomic writes, and the committed results regenerate unchanged."""
import glob
import json
import os
import subprocess
import sys

import pytest

from kalmannorm.harness.records import atomic_path, repo_relative, write_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_committed_records_carry_no_absolute_path():
    paths = glob.glob(os.path.join(REPO, "docs", "**", "*.json"), recursive=True)
    assert len(paths) >= 16
    for path in paths:
        with open(path) as f:
            absolute = [s for s in _strings(json.load(f)) if os.path.isabs(s)]
        assert not absolute, f"{os.path.relpath(path, REPO)} holds absolute paths {absolute}"


def test_repo_relative_inside_a_checkout_and_outside(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo / "sub")
    assert repo_relative("../runs/x") == os.path.join("runs", "x")  # from the checkout's root
    assert repo_relative(str(repo / "sub" / "r")) == os.path.join("sub", "r")
    outside = tmp_path / "elsewhere"
    assert repo_relative(str(outside)) == os.path.realpath(outside)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)  # no checkout: relative to the working directory
    assert repo_relative("runs/y") == os.path.join("runs", "y")


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = str(tmp_path / "a" / "record.json")
    write_json(path, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("{half")
            raise RuntimeError("killed mid-write")
    with open(path) as f:
        assert json.load(f) == {"epoch": 1}
    assert os.listdir(tmp_path / "a") == ["record.json"]  # no temporary left behind


def test_results_page_regenerates_from_the_committed_records(tmp_path):
    records = sorted(glob.glob(os.path.join(REPO, "docs", "results", "records", "*.json")))
    subprocess.run([sys.executable, os.path.join(REPO, "experiments", "write_results.py"),
                    *records, "--out", str(tmp_path)], check=True, capture_output=True, cwd=REPO,
                   env=dict(os.environ, MPLBACKEND="Agg"))
    with open(os.path.join(REPO, "docs", "results", "README.md")) as f:
        assert (tmp_path / "README.md").read_text() == f.read()
