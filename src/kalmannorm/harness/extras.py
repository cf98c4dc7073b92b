"""The packages of the ``train`` extra, imported on demand with an error that says how to get them.

The library (``kalmannorm``) needs torch only; the harness also reads images and datasets
(numpy, pillow, scikit-learn), plots (matplotlib) and draws progress bars (tqdm). Those come with
``pip install 'kalmannorm[train]'``, and a command that lacks one says so before it starts.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

__all__ = ["TRAIN_EXTRA", "MissingExtraError", "require", "require_all"]

# import name -> distribution name, as listed in pyproject's ``train`` extra
TRAIN_EXTRA = {"numpy": "numpy", "PIL": "pillow", "sklearn": "scikit-learn",
               "matplotlib": "matplotlib", "tqdm": "tqdm"}

INSTALL_HINT = "pip install 'kalmannorm[train]'"


class MissingExtraError(ModuleNotFoundError):
    """A package of the ``train`` extra is not installed."""


def _error(modules: Iterable[str], purpose: str) -> MissingExtraError:
    names = ", ".join(TRAIN_EXTRA.get(m, m) for m in modules)
    return MissingExtraError(f"{purpose} needs {names}, which is not installed; install the "
                             f"training extra: {INSTALL_HINT}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a package of the train extra) or raise :class:`MissingExtraError`
    naming ``purpose`` and the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise  # a dependency of the package itself is broken: show the real error
        raise _error([module], purpose) from None


def require_all(modules: Iterable[str], purpose: str) -> None:
    """Check that every module imports; one error lists all that are missing."""
    missing = []
    for module in modules:
        try:
            require(module, purpose)
        except MissingExtraError:
            missing.append(module)
    if missing:
        raise _error(missing, purpose)
