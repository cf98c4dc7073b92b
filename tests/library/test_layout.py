"""The library wing stands alone: torch only, nothing of the harness or the benchmarks."""
import ast
import os
import subprocess
import sys

import kalmannorm

PACKAGE = os.path.dirname(kalmannorm.__file__)
LAB = ("kalmannorm.harness", "benchmarks", "experiments")
TRAIN_EXTRA = ("numpy", "sklearn", "PIL", "matplotlib", "tqdm")


def _library_files():
    """Every module of the library; ``__main__.py`` is the command line's door into the lab."""
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in ("harness", "__pycache__")]
        for name in files:
            if name.endswith(".py") and name != "__main__.py":
                yield os.path.join(folder, name)


def _package_of(path):
    """``kalmannorm.analytic`` for ``.../kalmannorm/analytic/rules.py`` or ``.../analytic/__init__.py``."""
    parts = os.path.relpath(os.path.dirname(path), PACKAGE).split(os.sep)
    return ".".join(["kalmannorm"] + [p for p in parts if p != "."])


def _imported_modules(source, package):
    """Absolute names of the modules ``source`` imports (relative imports resolved in ``package``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _offending(names):
    return [m for m in names if m.startswith(LAB) or m.split(".")[0] in TRAIN_EXTRA]


def test_library_files_import_no_lab_module_and_no_train_extra():
    files = list(_library_files())
    assert len(files) >= 8 and all("harness" not in f for f in files)
    offending = {}
    for path in files:
        with open(path) as f:
            bad = _offending(_imported_modules(f.read(), _package_of(path)))
        if bad:
            offending[os.path.relpath(path, PACKAGE)] = bad
    assert not offending, f"library files importing the lab or train-extra packages: {offending}"


def test_the_static_check_sees_relative_and_lazy_imports():
    source = """
import torch
from . import functional
def f():
    from .. import harness
    from .harness import cli  # kalmannorm.analytic.harness: not the lab
    from ..harness.train import train
    import numpy as np
"""
    names = list(_imported_modules(source, "kalmannorm.analytic"))
    assert "kalmannorm.analytic.functional" in names
    assert _offending(names) == ["kalmannorm.harness", "kalmannorm.harness.train",
                                 "kalmannorm.harness.train.train", "numpy"]


def test_import_kalmannorm_loads_no_lab_module():
    # numpy and tqdm are left out: torch itself imports them when they are installed.
    code = ("import sys, kalmannorm; "
            "print('\\n'.join(m for m in sys.modules if m.startswith(%r) or m.split('.')[0] in %r))"
            % (LAB, ("sklearn", "PIL", "matplotlib")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import kalmannorm` imported {out.stdout.split()}"


def test_library_trains_without_numpy():
    # torch warns without numpy and works; so must the library: convert, train step, deploy.
    code = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed
import torch
from torch import nn
import kalmannorm as kn
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                    nn.BatchNorm2d(4))
model = kn.convert_batchnorm(net, micro_batch=2)
model(torch.randn(4, 3, 6, 6)).square().mean().backward()
deploy = kn.to_batchnorm(model.eval())
print(type(deploy[1]).__name__, "numpy" in sys.modules and sys.modules["numpy"] is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BatchNorm2d", "False"]
