"""pytest set-up shared by the test suite and the library's doctests.

``pytest`` (see ``testpaths`` in pyproject.toml) also runs the docstring examples of the library
wing, ``src/kalmannorm`` without the training harness: they see ``torch`` and ``nn`` imported, as
in PyTorch's own docstrings, and any warning they raise is an error, so that no example shows a
user the library's warnings.

Without a GPU the Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET`` is read
when the kernels are defined (at ``import kalmannorm``), so it is set here, before anything
imports the package. It changes nothing else: on the CPU the ``auto`` backend never picks Triton.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torchvision (and timm, which imports it) need stand-ins for torchvision's compiled ops when the
# installed wheel does not match the CPU torch; see experiments/torchvision_ops.py.
if importlib.util.find_spec("torchvision") is not None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "experiments"))
    import torchvision_ops

    torchvision_ops.install()

# The lab wing: examples there are shell commands or need the `train` extra.
collect_ignore = ["src/kalmannorm/harness"]
if importlib.util.find_spec("triton") is None:  # an optional dependency
    collect_ignore.append("src/kalmannorm/functional/triton_kernels.py")


@pytest.fixture(autouse=True)
def _doctest_imports(doctest_namespace):
    doctest_namespace.update(torch=torch, nn=nn)


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.filterwarnings("error"))
