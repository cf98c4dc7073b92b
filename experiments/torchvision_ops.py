"""Kept for the tests' conftest and the experiments: the stand-ins moved into the package,
:mod:`kalmannorm.torchvision_ops`."""
from kalmannorm.torchvision_ops import install, nms  # noqa: F401
