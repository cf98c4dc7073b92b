"""Run records: one JSON file per training run, rewritten after every epoch.

A record holds everything needed to read a result without the code that made it: the resolved
config, the git commit, package and torch versions, seed, device, per-epoch metrics and the
guard counters of BKN. Schema (``"schema": "kalmannorm.run/1"``)::

    schema, label, status ("running" | "incomplete" | "complete"), complete (bool),
    config {TrainConfig fields}, recipe {name, resolved recipe fields}, seed, device, device_name,
    world_size, global_batch_size, run_dir (relative to the checkout, see repo_relative),
    git_commit (str | null), git_dirty (bool | null), versions {kalmannorm, torch, python, numpy},
    dataset {name, train_size, test_size, num_classes, image_shape, pad, flip},
    model {arch, num_parameters}, epochs_planned, epochs_done, steps_per_epoch,
    started_at, updated_at (ISO 8601 UTC), wall_time (s, summed over sessions), resumed_at [epoch],
    resumed_code [{epoch, git_commit, git_dirty, kalmannorm}] (the code each resumed session ran;
                  absent in records written before it was kept),
    stop_reason (null | "finished" | "time_limit" | "interrupted" (Ctrl-C) |
                 "terminated (SIGTERM)" | "non-finite training loss" | "error: ..."),
    history [{epoch, lr, steps, train_loss, train_error, test_loss, test_error, epoch_time,
              wall_time, guard_fallbacks, guard_priors, peak_memory {kind, bytes}}],
        # errors are fractions in [0, 1]; peak_memory: the epoch's CUDA peak, or the CPU
        # process's peak RSS so far
    final {train_loss, train_error, test_loss, test_error},
    normalization {layers [{class, count, options}], predictor {class, options} | null}
        # every resolved option of every norm layer, defaults included (describe_normalization)

Writes are atomic (temporary file + rename), so a killed run leaves the last complete record.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import json
import os
import platform
import subprocess
from typing import Any, Dict, Iterator, Optional, Tuple

__all__ = [
    "SCHEMA",
    "REQUIRED_FIELDS",
    "git_info",
    "repo_relative",
    "versions",
    "now",
    "atomic_path",
    "write_json",
    "read_record",
    "describe_normalization",
    "changed_options",
]

SCHEMA = "kalmannorm.run/1"
REQUIRED_FIELDS = (
    "schema", "label", "status", "complete", "config", "seed", "device", "world_size", "git_commit",
    "versions", "dataset", "model", "epochs_planned", "epochs_done", "started_at", "updated_at",
    "wall_time", "history", "final",
)
EPOCH_FIELDS = (
    "epoch", "lr", "steps", "train_loss", "train_error", "test_loss", "test_error", "epoch_time",
    "wall_time", "guard_fallbacks", "guard_priors",
)


def git_info(path: Optional[str] = None) -> Tuple[Optional[str], Optional[bool]]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package).

    Outside a checkout: ``(KALMANNORM_GIT_COMMIT, None)`` if that variable is set, else
    ``(None, None)``.
    """
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return _commit_from_environment()
        status = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return _commit_from_environment()


def repo_relative(path: str) -> str:
    """``path`` as a record stores it: relative to the root of the git checkout holding the
    working directory (outside a checkout: to the working directory) when it lies inside, else
    absolute. So committed records name ``runs/cifar/bn-seed0``, not a machine's home folder.
    """
    cwd = os.getcwd()
    try:
        top = subprocess.run(["git", "-C", cwd, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        root = top.stdout.strip() if top.returncode == 0 and top.stdout.strip() else cwd
    except (OSError, subprocess.SubprocessError):
        root = cwd
    absolute = os.path.realpath(os.path.abspath(path))
    for base in (os.path.realpath(root), os.path.realpath(cwd)):
        if os.path.commonpath([absolute, base]) == base:
            return os.path.relpath(absolute, base)
    return absolute


def _commit_from_environment() -> Tuple[Optional[str], Optional[bool]]:
    # A copy of the tree without .git (a remote machine) can say what it was copied from.
    commit = os.environ.get("KALMANNORM_GIT_COMMIT")
    return (commit, None) if commit else (None, None)


def versions() -> Dict[str, str]:
    """Versions of the package, torch, python and numpy (``None`` where numpy is absent)."""
    import torch

    try:
        import numpy
    except ImportError:  # the library needs torch only; the record still says numpy was absent
        numpy = None

    try:
        from kalmannorm import __version__ as package_version
    except ImportError:  # core package not importable (partial checkout)
        from importlib.metadata import version

        package_version = version("kalmannorm")
    return dict(kalmannorm=str(package_version), torch=str(torch.__version__),
                python=platform.python_version(),
                numpy=None if numpy is None else numpy.__version__)


def now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an exception, removed otherwise. So ``path`` holds the old file or the whole new
    one, never half of it (a killed run, a failed download).

    >>> with atomic_path("runs/x/checkpoint.pt") as tmp:  # doctest: +SKIP
    ...     torch.save(state, tmp)
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as indented JSON atomically (the old file survives a crash mid-write)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, allow_nan=True)
        f.write("\n")


def read_record(path: str) -> Dict[str, Any]:
    """Load a run record and check its schema and required fields."""
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a kalmannorm run record (expected schema {SCHEMA!r})")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{path} lacks record fields {missing}")
    return record


# Options that describe the layer's size or place, not the method.
_NOT_OPTIONS = ("self", "num_features", "num_channels", "device", "dtype", "module", "generator")
_SCALARS = (bool, int, float, str, type(None))


def _constructor_options(cls: type) -> Iterator[Tuple[str, inspect.Parameter]]:
    """``(name, parameter)`` of every named constructor option of ``cls`` and its bases, the
    most derived first, each name once."""
    seen = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name in _NOT_OPTIONS or name in seen or param.kind in (
                    param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            seen.add(name)
            yield name, param


def _json_option(value: Any) -> Tuple[bool, Any]:
    """``(storable, value)``: JSON scalars and lists of them are stored (tuples as lists)."""
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return True, list(value)
    return isinstance(value, _SCALARS), value


def _options(module: Any, defaults: bool = False) -> Dict[str, Any]:
    """The constructor options of ``module`` read back from its attributes of the same names
    (every class here stores its options so), defaults included; JSON scalars and lists. With
    ``defaults``: the constructor's default values of the same options instead."""
    options = {}
    for name, param in _constructor_options(type(module)):
        if not hasattr(module, name):
            continue
        storable, value = _json_option(param.default if defaults else getattr(module, name))
        if storable:
            options[name] = value
    return options


@functools.lru_cache(maxsize=None)
def _class_defaults(qualname: str) -> Dict[str, Any]:
    """The constructor defaults of the class a record names (``module.Qual.Name``); empty when
    this code has no such class. Cached: every record of a report names the same few classes
    (callers copy, never mutate, the result)."""
    import importlib

    module, _, rest = qualname.rpartition(".")
    while module:
        try:
            obj: Any = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            rest = f"{head}.{rest}"
    else:
        return {}
    for part in rest.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        return {}
    defaults = {}
    for name, param in _constructor_options(obj):
        storable, value = _json_option(param.default)
        if param.default is not param.empty and storable:
            defaults[name] = value
    return defaults


def normalization_with_defaults(normalization: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A record's :func:`describe_normalization` with every option it lacks filled in with the
    constructor's default: a layer option added after the record was written defaults to what
    the code did before it, so the record ran with that default. Options the record has are
    kept as they are."""
    if normalization is None:
        return None

    def fill(entry: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if entry is None:
            return None
        return dict(entry, options={**_class_defaults(entry["class"]), **entry["options"]})

    return dict(normalization, layers=[fill(layer) for layer in normalization["layers"]],
                predictor=fill(normalization.get("predictor")))


def changed_options(module: Any) -> Dict[str, Any]:
    """The options of ``module`` that differ from its constructor's defaults."""
    defaults = _options(module, defaults=True)
    return {k: v for k, v in _options(module).items()
            if k not in defaults or defaults[k] != v}


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _norm_classes() -> tuple:
    """The classes :func:`describe_normalization` reports: torch's and kalmannorm's norms."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase

    return (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def describe_normalization(model: Any, extra_classes: tuple = ()) -> Dict[str, Any]:
    """Every resolved option of every normalization layer of ``model``, as a record stores it.

    Layers with the same class and options are listed once with their ``count``, in order of
    first appearance; options come from the layer itself (defaults included), so a record says
    what ran even after the library's defaults change. The model's ``KalmanPredictor`` (a
    wrapper or attached, :func:`kalmannorm.predictor_of`) is described too.

    Args:
        model: the trained module (the predictor, or the bare model).
        extra_classes: further classes to report (e.g. the class a norm factory builds).

    Returns:
        ``{"layers": [{"class", "count", "options"}], "predictor": {"class", "options"} | None}``.
    """
    classes = _norm_classes() + tuple(extra_classes)
    layers: Dict[str, Dict[str, Any]] = {}
    seen = set()
    for module in model.modules():
        if id(module) in seen or not isinstance(module, classes):
            continue
        seen.add(id(module))
        entry = dict(cls=_qualname(module), options=_options(module))
        key = json.dumps(entry, sort_keys=True)
        layers.setdefault(key, dict(entry, count=0))["count"] += 1
    from kalmannorm import predictor_of

    found = predictor_of(model)
    predictor = None if found is None else {"class": _qualname(found), "options": _options(found)}
    return dict(layers=[{"class": e["cls"], "count": e["count"], "options": e["options"]}
                        for e in layers.values()], predictor=predictor)
