"""Without the train extra the library works and the commands say what to install."""
import os
import subprocess
import sys

import pytest

from kalmannorm.harness.extras import MissingExtraError, require, require_all

HINT = "pip install 'kalmannorm[train]'"


def _cli(blocked, argv):
    """Run the command line in a fresh interpreter where the ``blocked`` packages are missing."""
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from kalmannorm.harness.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, blocked, named", [
    (["demo", "--epochs", "1"], ["matplotlib"], "matplotlib"),
    (["train", "--epochs", "1"], ["sklearn"], "scikit-learn"),
    (["train", "--epochs", "1"], ["numpy"], "numpy"),
    (["train", "--dataset", "folder", "--data-dir", "x"], ["PIL"], "pillow"),
])
def test_missing_extra_stops_the_command_before_any_work(tmp_path, command, blocked, named):
    out = str(tmp_path / "runs")
    argv = command + (["--out", out] if command[0] == "demo" else ["--run-dir", out])
    result = _cli(blocked, argv)
    assert result.returncode == 2, result.stderr
    assert HINT in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(out)  # nothing started


def test_help_works_without_numpy():
    result = _cli(["numpy", "sklearn", "PIL", "matplotlib"], ["train", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--micro-batch" in result.stdout


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("json", "x").dumps([]) == "[]"
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"the digits dataset needs scikit-learn.*kalmannorm\[train\]"):
        require("sklearn", "the digits dataset")
    with pytest.raises(ModuleNotFoundError, match="scikit-learn"):  # still a ModuleNotFoundError
        require_all(["json", "sklearn"], "demo")
