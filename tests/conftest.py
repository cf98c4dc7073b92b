"""Test configuration, read before any test module imports the package.

- The Triton kernels run under the interpreter where there is no GPU. ``TRITON_INTERPRET`` is
  read when the kernels are defined (at ``import kalmannorm``), so it is set here. It changes
  nothing else: on the CPU the ``auto`` backend never picks Triton.
- torchvision (and timm, which imports it) need stand-ins for torchvision's compiled ops when the
  installed wheel does not match the CPU torch; see experiments/torchvision_ops.py.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("torchvision") is not None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import torchvision_ops

    torchvision_ops.install()
