"""Test configuration: the Triton kernels run under the interpreter where there is no GPU.

``TRITON_INTERPRET`` is read when the kernels are defined (at ``import kalmannorm``), so it is
set here, before any test module imports the package. It changes nothing else: on the CPU the
``auto`` backend never picks Triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
