"""A check the experiment tests share: a committed results page regenerates from its records."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_page_regenerates(tmp_path, script: str, committed: str, *args: str) -> None:
    """The experiment script ``script`` run with ``--no-run [ARGS] --write`` writes ``committed``
    again, to the byte."""
    if not os.path.exists(committed):
        pytest.skip("no page committed yet")
    page = tmp_path / os.path.basename(committed)
    subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), "--no-run", *args,
                    "--write", "--page", str(page)],
                   check=True, capture_output=True, cwd=REPO, env=dict(os.environ, MPLBACKEND="Agg"))
    with open(committed) as f:
        assert page.read_text() == f.read()
