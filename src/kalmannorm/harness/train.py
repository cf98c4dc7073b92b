"""Training harness: dataclass configs, learning-rate recipes and an importable :func:`train`.

Follows the released BKN CIFAR protocol (``docs/method.md`` section 6) as the ``paper`` recipe
and offers a ``short`` recipe that fits a CPU. The statistics group size (``micro_batch``) is a
property of the norm layers and independent of the SGD batch (``batch_size``): the paper's "batch
size 2" is ``batch_size=128, micro_batch=2``; a true SGD batch of 2 is ``batch_size=2,
micro_batch=None``. Incomplete training batches are dropped, so every batch splits into groups.

Every run lives in a directory holding ``record.json`` (see :mod:`kalmannorm.harness.records`), rewritten
after every epoch, and ``checkpoint.pt``, written after every epoch; ``resume=True`` continues
from the checkpoint. The random state is re-derived from ``(seed, epoch, rank)`` at the start of
every epoch, so a resumed run repeats the uninterrupted one bit for bit on the same machine.

Multi-process: run the same command under ``torchrun --nproc_per_node=N``; each rank trains a
DistributedDataParallel replica on its own shard of every epoch (gloo on CPU, nccl on CUDA) with
its own micro-batch statistics. ``batch_size`` is per rank (the global SGD batch is
``N * batch_size``); rank 0 writes the record and checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kalmannorm import AnalyticKalmanPredictor, KalmanPredictor

from .data import DATASETS, ImageData, epoch_batches, eval_batches, load_dataset
from .models import build_model
from .records import SCHEMA, atomic_path, git_info, now, repo_relative, versions, write_json

__all__ = [
    "PaperRecipe",
    "ShortRecipe",
    "RECIPES",
    "TrainConfig",
    "Callback",
    "LogLines",
    "ProgressBar",
    "RunState",
    "train",
    "check_run_dir",
    "Terminated",
    "weight_decay_groups",
    "default_label",
]

log = logging.getLogger(__name__)


def _from_dict(cls, values: Dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; valid keys: {', '.join(sorted(names))}")
    return cls(**values)


def _check(condition: bool, name: str, value: Any, allowed: str) -> None:
    """``ValueError("lr must be > 0 (got -0.1)")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{name} must be {allowed} (got {value!r})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer_fields(recipe: Any) -> None:
    """Fields every recipe shares: a positive number of epochs, a positive rate, momentum in
    [0, 1) and a non-negative weight decay."""
    _check(isinstance(recipe.epochs, int) and recipe.epochs >= 1, "epochs", recipe.epochs, "an integer >= 1")
    _check(_is_number(recipe.lr) and recipe.lr > 0, "lr", recipe.lr, "a finite number > 0")
    _check(_is_number(recipe.momentum) and 0 <= recipe.momentum < 1, "momentum", recipe.momentum, "in [0, 1)")
    _check(_is_number(recipe.weight_decay) and recipe.weight_decay >= 0, "weight_decay",
           recipe.weight_decay, "a finite number >= 0")


# ---------------------------------------------------------------------------------------- recipes
@dataclass
class PaperRecipe:
    """The released code's full CIFAR schedule (``docs/method.md`` section 6).

    SGD with momentum 0.9 (no Nesterov), weight decay 2e-4 on convolution and linear weights
    only; learning rate (constant within an epoch, epochs counted from 0)::

        0.01 for epoch 0, 0.1 until epoch 82, 0.01 until 123, 0.001 until 300, 0.0002 until 400

    Args:
        epochs: 400.
        lr: the main rate, 0.1; ``warmup_lr`` 0.01 for the first ``warmup_epochs`` (1).
        milestones / milestone_lrs: the rate from each milestone epoch on.
    """

    name: ClassVar[str] = "paper"
    epochs: int = 400
    lr: float = 0.1
    warmup_lr: float = 0.01
    warmup_epochs: int = 1
    milestones: Tuple[int, ...] = (82, 123, 300)
    milestone_lrs: Tuple[float, ...] = (0.01, 0.001, 0.0002)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4

    def __post_init__(self) -> None:
        self.milestones, self.milestone_lrs = tuple(self.milestones), tuple(self.milestone_lrs)
        if len(self.milestones) != len(self.milestone_lrs) or list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones must be increasing and match milestone_lrs one to one")
        _check_optimizer_fields(self)
        for name in ("warmup_lr", "milestone_lrs"):
            values = getattr(self, name)
            _check(all(_is_number(v) and v >= 0 for v in (values if isinstance(values, tuple) else (values,))),
                   name, values, "finite and >= 0")
        _check(isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0, "warmup_epochs",
               self.warmup_epochs, "an integer >= 0")

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        lr = self.lr
        for milestone, value in zip(self.milestones, self.milestone_lrs):
            if epoch >= milestone:
                lr = value
        return lr


@dataclass
class ShortRecipe:
    """A schedule that fits a CPU: SGD Nesterov 0.9, linear warm-up then cosine, per step.

    The rate rises linearly from ``lr * start_factor`` to the peak ``lr`` over the first
    ``warmup_fraction`` of all steps, then follows a half cosine down to ``final_lr`` (a
    one-cycle shape, as the prototype of ``docs/method.md`` section 7). Weight decay 5e-4 on
    convolution and linear weights only.

    Args:
        epochs: 10 (set with ``--epochs``).
        lr: peak rate, 0.2.
        warmup_fraction: 0.15. start_factor: 0.04. final_lr: 0.
        momentum: 0.9. nesterov: True. weight_decay: 5e-4.
    """

    name: ClassVar[str] = "short"
    epochs: int = 10
    lr: float = 0.2
    warmup_fraction: float = 0.15
    start_factor: float = 0.04
    final_lr: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        _check_optimizer_fields(self)
        _check(_is_number(self.start_factor) and self.start_factor >= 0, "start_factor",
               self.start_factor, "a finite number >= 0")
        _check(_is_number(self.final_lr) and 0 <= self.final_lr <= self.lr, "final_lr", self.final_lr,
               f"in [0, lr={self.lr}]")

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        t = (epoch * steps_per_epoch + step) / max(1, self.epochs * steps_per_epoch)
        w = self.warmup_fraction
        if t < w:
            start = self.lr * self.start_factor
            return start + (self.lr - start) * t / w
        progress = (t - w) / (1.0 - w)
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


RECIPES = {"paper": PaperRecipe, "short": ShortRecipe}
PREDICTIONS = {"sampled": KalmanPredictor, "analytic": AnalyticKalmanPredictor}


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: decay on convolution and linear weights, none elsewhere.

    Selected by module type (``nn.modules.conv._ConvNd``, ``nn.Linear``), never by name; norm
    weights and all biases get no decay.
    """
    decay, seen = [], set()
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.weight is not None:
            if id(module.weight) not in seen and module.weight.requires_grad:
                decay.append(module.weight)
                seen.add(id(module.weight))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


# ----------------------------------------------------------------------------------------- config
_SHORT_NAMES = {"batchnorm": "BN", "ghost_batchnorm": "BN", "groupnorm": "GN", "layernorm": "LN",
                "instancenorm": "IN", "batchrenorm": "BRN", "bkn": "BKN", "batchkalmannorm": "BKN"}


def default_label(norm: str, micro_batch: Optional[int], gain: Optional[float], batch_size: int) -> str:
    """Human label of a method, e.g. ``"BKN (p=0.9), m=2"`` or ``"BN, batch 128"``."""
    base = re.sub(r"(1d|2d|3d)$", "", norm.lower())
    label = _SHORT_NAMES.get(base, norm)
    if gain is not None:
        label += f" (p={gain:g})"
    if micro_batch is not None:
        return f"{label}, m={micro_batch}"
    return f"{label}, batch {batch_size}"


# Fields that do not change the numbers a run produces; they may differ on resume.
_RUNTIME_FIELDS = ("label", "device", "threads", "eval_batch_size", "run_dir", "resume", "overwrite",
                   "time_limit", "progress", "data_dir", "download")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Unknown keys fail loudly (:meth:`from_dict`).

    Method: ``norm`` is a registry name of :func:`kalmannorm.get_norm_layer` (``batchnorm``,
    ``ghost_batchnorm``, ``groupnorm``, ``batchrenorm``, ``bkn``, ...); ``micro_batch`` (rows per
    statistics group, ``None`` = the whole batch) and ``gain`` (BKN's ``p``) are passed to it when
    set, with ``norm_options``; ``prediction`` (``sampled`` or ``analytic``) picks how a model with
    BKN layers predicts their statistics. ``label`` names the method in reports (default from
    those fields).

    Data: ``dataset`` is ``digits`` (offline default), ``cifar10``, ``cifar100`` or ``folder``
    (``data_dir`` with one sub-folder per class); ``limit_train`` / ``limit_test`` keep a fixed
    random subset for quick checks.

    Optimization: ``recipe`` is ``short`` or ``paper`` (:class:`ShortRecipe`,
    :class:`PaperRecipe`); ``epochs``, ``lr`` and ``weight_decay`` override the recipe's values,
    ``recipe_options`` any other recipe field. ``batch_size`` is per process.

    Run: ``device`` ``"auto"`` picks CUDA when available; ``run_dir`` defaults to
    ``runs/<label>-seed<seed>``; ``resume`` continues from its checkpoint; ``overwrite`` replaces
    an existing run; ``time_limit`` (seconds) stops after the epoch past which another epoch would
    not fit; ``amp`` trains under bfloat16 autocast (BKN statistics stay float32).
    """

    label: Optional[str] = None
    arch: str = "preact_resnet20"
    width: Optional[int] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    norm: str = "batchnorm"
    micro_batch: Optional[int] = None
    gain: Optional[float] = None
    prediction: str = "sampled"
    norm_options: Dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    augment: bool = True
    recipe: str = "short"
    epochs: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    recipe_options: Dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    amp: bool = False
    run_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    time_limit: Optional[float] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field before any work starts; ``ValueError`` names the field and what is
        allowed. Also resolves the recipe and builds the model on the ``meta`` device (no memory,
        no data), so that a bad architecture, model or norm option fails here, not after an epoch.
        """
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {', '.join(DATASETS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of "
                             f"{', '.join(PREDICTIONS)}")
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in ("width", "image_size", "limit_train", "limit_test", "threads"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1), name, value,
                   "an integer >= 1 or None")
        if self.micro_batch is not None:
            if not isinstance(self.micro_batch, int) or self.micro_batch < 1 \
                    or self.batch_size % self.micro_batch:
                raise ValueError(
                    f"batch_size {self.batch_size} does not split into groups of micro_batch="
                    f"{self.micro_batch}; use a batch size that is a multiple of it"
                )
        _check(self.gain is None or (_is_number(self.gain) and 0 <= self.gain <= 1), "gain", self.gain,
               "in [0, 1] or None")
        _check(self.time_limit is None or (_is_number(self.time_limit) and self.time_limit >= 0),
               "time_limit", self.time_limit, "a number of seconds >= 0 or None")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset 'folder' needs a data directory (data_dir / --data-dir)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"unknown device {self.device!r}; expected auto, cpu, cuda, "
                                 "cuda:1, ...") from None
        self.resolved_recipe()  # epochs, lr, weight_decay and recipe options
        self._check_model()

    def _check_model(self) -> None:
        # Shapes do not depend on the data's classes and channels: 10 and 3 stand in for them.
        try:
            with torch.device("meta"):
                build_model(self.arch, 10, self.norm_layer(), 3, width=self.width, **self.model_options)
        except TypeError as err:
            raise ValueError(
                f"norm {self.norm!r} or architecture {self.arch!r} does not take these options "
                f"({err}); for BatchNorm over micro-batches use norm='ghost_batchnorm'"
            ) from None

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. parsed JSON); unknown keys raise ``ValueError``."""
        return _from_dict(cls, dict(values), "config")

    def resolved_recipe(self):
        """The recipe dataclass with ``epochs``, ``lr``, ``weight_decay`` and options applied."""
        options = dict(self.recipe_options)
        for key in ("epochs", "lr", "weight_decay"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return _from_dict(RECIPES[self.recipe], options, f"{self.recipe!r} recipe")

    def resolved_label(self) -> str:
        return self.label or default_label(self.norm, self.micro_batch, self.gain, self.batch_size)

    def resolved_run_dir(self) -> str:
        if self.run_dir:
            return self.run_dir
        slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", self.resolved_label()).strip("_")
        return os.path.join("runs", f"{slug}-seed{self.seed}")

    def norm_layer(self) -> Callable[[int], nn.Module]:
        """``norm_layer(num_channels)`` from ``norm``, ``micro_batch``, ``gain``, ``norm_options``."""
        from kalmannorm import get_norm_layer

        if self.gain is not None and self.norm.lower().startswith("ghost_batchnorm"):
            raise ValueError("ghost_batchnorm is BKN with gain 0 and takes no gain; use norm='bkn' to set one")
        kw = dict(self.norm_options)
        if self.micro_batch is not None:
            kw["micro_batch"] = self.micro_batch
        if self.gain is not None:
            kw["gain"] = self.gain
        return get_norm_layer(self.norm, **kw)


# -------------------------------------------------------------------------------------- callbacks
@dataclass
class RunState:
    """What callbacks see: the config, progress counters, the record being written, the model
    (unwrapped: no KalmanPredictor or DDP) and the optimizer."""

    config: TrainConfig
    record: Dict[str, Any]
    epochs: int
    steps_per_epoch: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    step: int = 0
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Callback:
    """Hooks of :func:`train`; override any. Built-in ones run on rank 0 only, yours on every rank.

    ``on_step_end`` gets the step's mean loss and error count as tensors (reading them with
    ``.item()`` synchronizes the device, so do it sparingly).
    """

    def on_train_start(self, state: RunState) -> None: ...

    def on_step_end(self, state: RunState, loss: Tensor, errors: Tensor, batch_size: int) -> None: ...

    def on_epoch_end(self, state: RunState, entry: Dict[str, Any]) -> None: ...

    def on_train_end(self, state: RunState, record: Dict[str, Any]) -> None: ...


def _epoch_line(state: RunState, e: Dict[str, Any]) -> str:
    test = "" if e["test_error"] is None else f" test_loss {e['test_loss']:.4f} test_err {100 * e['test_error']:.2f}%"
    return (f"{state.record['label']} epoch {e['epoch'] + 1}/{state.epochs} lr {e['lr']:.4g} "
            f"loss {e['train_loss']:.4f} err {100 * e['train_error']:.2f}%{test} ({e['epoch_time']:.1f}s)")


class LogLines(Callback):
    """One ``logging`` line per epoch and at the end (``--quiet``)."""

    def on_train_start(self, state: RunState) -> None:
        log.info("run %s: %d epochs x %d steps, record %s", state.record["label"], state.epochs,
                 state.steps_per_epoch, state.record["run_dir"])

    def on_epoch_end(self, state: RunState, entry: Dict[str, Any]) -> None:
        log.info("%s", _epoch_line(state, entry))

    def on_train_end(self, state: RunState, record: Dict[str, Any]) -> None:
        log.info("run %s %s after %d epochs: test error %s", record["label"], record["status"],
                 record["epochs_done"], _pct(record["final"].get("test_error")))


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


class ProgressBar(Callback):
    """A tqdm bar over all steps with live loss and error; falls back to :class:`LogLines`."""

    def __init__(self, refresh_every: int = 10) -> None:
        self.refresh_every = refresh_every
        self.bar = None
        self.fallback: Optional[LogLines] = None

    def on_train_start(self, state: RunState) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.fallback = LogLines()
            return self.fallback.on_train_start(state)
        total = state.epochs * state.steps_per_epoch
        self.bar = tqdm(total=total, initial=state.epoch * state.steps_per_epoch, desc=state.record["label"],
                        dynamic_ncols=True, mininterval=0.5, unit="step")
        self._loss = self._err = self._n = 0.0

    def on_step_end(self, state: RunState, loss: Tensor, errors: Tensor, batch_size: int) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if state.step % self.refresh_every == 0 or state.step == state.steps_per_epoch:
            self.bar.set_postfix(epoch=f"{state.epoch + 1}/{state.epochs}", loss=f"{loss.item():.3f}",
                                 err=f"{100 * errors.item() / batch_size:.1f}%", refresh=False)

    def on_epoch_end(self, state: RunState, entry: Dict[str, Any]) -> None:
        if self.fallback is not None:
            return self.fallback.on_epoch_end(state, entry)
        self.bar.write(_epoch_line(state, entry))

    def on_train_end(self, state: RunState, record: Dict[str, Any]) -> None:
        if self.fallback is not None:
            return self.fallback.on_train_end(state, record)
        self.bar.close()
        log.info("run %s %s after %d epochs: test error %s", record["label"], record["status"],
                 record["epochs_done"], _pct(record["final"].get("test_error")))


# ---------------------------------------------------------------------------------------- helpers
def _derive_seed(*parts: int) -> int:
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return seed


def _setup_device(config: TrainConfig) -> Tuple[torch.device, int, int, bool]:
    """``(device, rank, world_size, we_initialized_process_group)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = config.device
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
    initialized = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        world, rank = 1, 0
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank, world, initialized


def _all_reduce(values: Sequence[float], device: torch.device, world: int) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _load_data(config: TrainConfig, rank: int, world: int) -> ImageData:
    # With download, rank 0 fetches first and the others read what it wrote.
    if config.download and world > 1 and rank != 0:
        dist.barrier()
    data = load_dataset(config.dataset, config.data_dir, download=config.download and rank == 0,
                        image_size=config.image_size)
    if config.download and world > 1 and rank == 0:
        dist.barrier()
    return data


def _build(config: TrainConfig, data: ImageData, device: torch.device):
    from kalmannorm import has_kalman_layers

    torch.manual_seed(config.seed)
    model = build_model(config.arch, data.num_classes, config.norm_layer(), data.in_channels,
                        width=config.width, **config.model_options).to(device)
    net = PREDICTIONS[config.prediction](model) if has_kalman_layers(model) else model
    return model, net


def _guard(model: nn.Module) -> Tuple[int, int]:
    from kalmannorm import guard_counts

    counts = guard_counts(model)
    return counts["fallbacks"], counts["priors"]


def _new_record(config: TrainConfig, data: ImageData, model: nn.Module, recipe, device, world, steps) -> Dict[str, Any]:
    commit, dirty = git_info()
    return dict(
        schema=SCHEMA, label=config.resolved_label(), status="running", complete=False,
        config=asdict(config), recipe=dict(name=recipe.name, **asdict(recipe)), seed=config.seed,
        device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        world_size=world, global_batch_size=config.batch_size * world, git_commit=commit, git_dirty=dirty,
        versions=versions(), dataset=data.describe(),
        model=dict(arch=config.arch, num_parameters=sum(p.numel() for p in model.parameters())),
        run_dir=repo_relative(config.resolved_run_dir()), epochs_planned=recipe.epochs, epochs_done=0,
        steps_per_epoch=steps, started_at=now(), updated_at=now(), wall_time=0.0, resumed_at=[],
        stop_reason=None, history=[], final={},
    )


CHECKPOINT_FORMAT = "kalmannorm.checkpoint/1"


def check_run_dir(config: TrainConfig) -> Tuple[str, str]:
    """``(record path, checkpoint path)`` of the run; ``FileExistsError`` if a run is there and
    ``config`` says neither to resume nor to overwrite it."""
    run_dir = config.resolved_run_dir()
    record_path, ckpt_path = os.path.join(run_dir, "record.json"), os.path.join(run_dir, "checkpoint.pt")
    if os.path.exists(record_path) and not (config.resume or config.overwrite):
        raise FileExistsError(f"{record_path} exists; pass resume=True (--resume) to continue it "
                              "or overwrite=True (--overwrite) to start again")
    return record_path, ckpt_path


def _load_checkpoint(path: str, device: torch.device) -> Dict[str, Any]:
    """The checkpoint of a run, or a ``ValueError`` naming the file and how to start over."""
    start_over = ("restore the file, or start the run again with overwrite=True (--overwrite) "
                  "instead of resume=True (--resume)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated zip, corrupted pickle, EOF, ...
        raise ValueError(f"cannot resume from {path}: the checkpoint is unreadable, truncated or "
                         f"corrupted ({type(err).__name__}: {err}); {start_over}") from None
    keys = ("model", "optimizer", "record")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or \
            any(k not in ckpt for k in keys) or "config" not in ckpt["record"]:
        raise ValueError(f"cannot resume from {path}: not a {CHECKPOINT_FORMAT} checkpoint with "
                         f"{', '.join(keys)}; {start_over}")
    return ckpt


class Terminated(BaseException):
    """Raised in :func:`train` when the process receives SIGTERM; like ``KeyboardInterrupt``
    (not an ``Exception``), so that the run records how it stopped and then ends."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` while training, where the process would otherwise
    die without a word (batch schedulers, ``timeout``, ``kill``). Only from the main thread and
    only when no one else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"received signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_resumable(config: TrainConfig, saved: Dict[str, Any], path: str) -> None:
    current = asdict(config)
    diffs = [k for k in current if k not in _RUNTIME_FIELDS and saved.get(k) != current[k]]
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in diffs)
        raise ValueError(f"cannot resume {path}: the config differs ({detail}); use another run_dir")


@dataclass
class _Session:
    """What one call of :func:`train` works with once everything is built: the network as called
    (``net``: with its predictor and DDP wrappers) and unwrapped (``model``), the optimizer, the
    data on the device, the resolved recipe, the state callbacks see, and where it writes."""

    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: ImageData
    config: TrainConfig
    recipe: Any
    state: RunState
    callbacks: Sequence[Callback]
    device: torch.device
    record_path: str
    ckpt_path: str
    started: float  # time.perf_counter() at the start of this session


def _train_epoch(session: _Session) -> Tuple[float, float, float]:
    """One epoch on this rank's shard; returns global ``(mean loss, error rate, last lr)``."""
    net, optimizer, data, config = session.net, session.optimizer, session.data, session.config
    recipe, state, callbacks, device = session.recipe, session.state, session.callbacks, session.device
    epoch = state.epoch
    order = torch.Generator().manual_seed(_derive_seed(config.seed, epoch, 1))  # same on all ranks
    augment = torch.Generator().manual_seed(_derive_seed(config.seed, epoch, 2, state.rank))
    torch.manual_seed(_derive_seed(config.seed, epoch, 3, state.rank))  # BKN samples, etc.
    batches = epoch_batches(data.train_x.shape[0], config.batch_size, order, rank=state.rank,
                            world_size=state.world_size)
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    err_sum = torch.zeros((), dtype=torch.float64, device=device)
    lr = 0.0
    for step, index in enumerate(batches):
        lr = recipe.lr_at(epoch, step, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.train_batch(index, augment, augment=config.augment)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        errors = (logits.detach().argmax(1) != y).sum()
        loss_sum += loss.detach() * len(y)
        err_sum += errors
        state.step = step + 1
        for cb in callbacks:
            cb.on_step_end(state, loss.detach(), errors, len(y))
    total_loss, total_err, n = _all_reduce(
        [loss_sum.item(), err_sum.item(), len(batches) * config.batch_size], device, state.world_size)
    return total_loss / n, total_err / n, lr


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 500, *, rank: int = 0,
             world_size: int = 1, amp: bool = False) -> Tuple[float, float]:
    """Test ``(mean loss, error rate)`` in eval mode; ranks split the test set and all-reduce."""
    was_training = model.training
    model.eval()
    device = data.test_x.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    err_sum = torch.zeros((), dtype=torch.float64, device=device)
    for index in eval_batches(data.test_x.shape[0], batch_size, rank=rank, world_size=world_size):
        x, y = data.test_batch(index)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        err_sum += (logits.argmax(1) != y).sum()
    model.train(was_training)
    total_loss, total_err = _all_reduce([loss_sum.item(), err_sum.item()], device, world_size)
    n = data.test_x.shape[0]
    return total_loss / n, total_err / n


def _finish(record: Dict[str, Any], status: str, reason: Optional[str]) -> None:
    record.update(status=status, complete=status == "complete", stop_reason=reason, updated_at=now())


# ------------------------------------------------------------------------------------------ train
def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Train one run as ``config`` says; return its record (also written to ``record.json``).

    Writes ``record.json`` and ``checkpoint.pt`` into the run directory after every epoch (rank 0
    only). The status ends as ``"complete"``, ``"incomplete"`` (``time_limit`` reached, or
    interrupted; resume with ``resume=True``) or ``"diverged"`` (non-finite training loss).

    >>> record = train(TrainConfig(norm="bkn", gain=0.9, micro_batch=2, epochs=2))  # doctest: +SKIP
    >>> record["final"]["test_error"]  # doctest: +SKIP
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()  # fields may have been changed since construction
    session_start = time.perf_counter()
    record_path, ckpt_path = check_run_dir(config)
    resuming = config.resume and os.path.exists(ckpt_path)
    if config.threads:
        torch.set_num_threads(config.threads)
    device, rank, world, own_group = _setup_device(config)
    try:
        recipe = config.resolved_recipe()
        ckpt = _load_checkpoint(ckpt_path, device) if resuming else None
        if ckpt is not None:
            _check_resumable(config, ckpt["record"]["config"], ckpt_path)
        data = _load_data(config, rank, world)
        # The subset is fixed (seed 0) so that runs with different seeds see the same examples.
        data = data.subset(config.limit_train, config.limit_test, seed=0).to(device)
        model, net = _build(config, data, device)
        steps = data.train_x.shape[0] // world // config.batch_size
        optimizer = torch.optim.SGD(weight_decay_groups(model, recipe.weight_decay), lr=0.0,
                                    momentum=recipe.momentum, nesterov=recipe.nesterov)
        record = _new_record(config, data, model, recipe, device, world, steps)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            record = ckpt["record"]
            record["resumed_at"].append(record["epochs_done"])
            record.update(status="running", complete=False, stop_reason=None)
        if world > 1:
            ddp_kw = dict(device_ids=[device.index]) if device.type == "cuda" else {}
            net = nn.parallel.DistributedDataParallel(net, **ddp_kw)
        state = RunState(config, record, recipe.epochs, steps, rank, world, epoch=record["epochs_done"],
                         model=model, optimizer=optimizer)
        if rank != 0:
            callbacks = list(callbacks)
        elif not callbacks or not any(isinstance(c, (LogLines, ProgressBar)) for c in callbacks):
            callbacks = [ProgressBar() if config.progress else LogLines(), *callbacks]
        with _sigterm_raises():
            return _run(_Session(net, model, optimizer, data, config, recipe, state, callbacks,
                                 device, record_path, ckpt_path, session_start))
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(session: _Session) -> Dict[str, Any]:
    model, optimizer, data, config = session.model, session.optimizer, session.data, session.config
    recipe, state, callbacks, device = session.recipe, session.state, session.callbacks, session.device
    record_path, ckpt_path, session_start = session.record_path, session.ckpt_path, session.started
    record, main = state.record, state.rank == 0
    wall_before = record["wall_time"]

    def save(with_checkpoint: bool) -> None:
        record["wall_time"] = wall_before + time.perf_counter() - session_start
        record["updated_at"] = now()
        if main:
            if with_checkpoint:
                with atomic_path(ckpt_path) as tmp:
                    torch.save(dict(format=CHECKPOINT_FORMAT, model=model.state_dict(),
                                    optimizer=optimizer.state_dict(), record=record), tmp)
            write_json(record_path, record)

    for cb in callbacks:
        cb.on_train_start(state)
    if state.epoch >= recipe.epochs:
        _finish(record, "complete", "finished")
    try:
        save(False)
        while state.epoch < recipe.epochs:
            epoch_start = time.perf_counter()
            guard_before = _guard(model)
            train_loss, train_err, lr = _train_epoch(session)
            _sync_buffers(model, state.world_size)
            test_loss, test_err = evaluate(model, data, config.eval_batch_size, rank=state.rank,
                                           world_size=state.world_size, amp=config.amp)
            guard_after = _guard(model)
            entry = dict(
                epoch=state.epoch, lr=lr, steps=state.steps_per_epoch, train_loss=train_loss,
                train_error=train_err, test_loss=test_loss, test_error=test_err,
                epoch_time=time.perf_counter() - epoch_start,
                wall_time=wall_before + time.perf_counter() - session_start,
                guard_fallbacks=guard_after[0] - guard_before[0], guard_priors=guard_after[1] - guard_before[1],
            )
            record["history"].append(entry)
            state.epoch += 1
            record["epochs_done"] = state.epoch
            record["final"] = dict(train_loss=train_loss, train_error=train_err, test_loss=test_loss, test_error=test_err)
            diverged = not math.isfinite(train_loss)
            if diverged:
                _finish(record, "diverged", "non-finite training loss")
            elif state.epoch >= recipe.epochs:
                _finish(record, "complete", "finished")
            elif _out_of_time(config, session_start, entry["epoch_time"], device, state.world_size):
                _finish(record, "incomplete", "time_limit")
            save(True)
            for cb in callbacks:
                cb.on_epoch_end(state, entry)
            if record["status"] != "running":
                break
    except BaseException as err:
        if record["status"] == "running":
            reason = ("interrupted" if isinstance(err, KeyboardInterrupt) else
                      "terminated (SIGTERM)" if isinstance(err, Terminated) else f"error: {err!r}")
            _finish(record, "incomplete", reason)
            save(False)
        raise
    for cb in callbacks:
        cb.on_train_end(state, record)
    return record


def _sync_buffers(model: nn.Module, world: int) -> None:
    # DDP broadcasts rank 0's buffers at the start of each forward, so after the last step each
    # rank's running statistics moved on its own shard; make them rank 0's before eval and saving.
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def _out_of_time(config: TrainConfig, start: float, last_epoch: float, device, world: int) -> bool:
    """Whether another epoch would overrun ``time_limit`` (rank 0 decides for all ranks)."""
    if config.time_limit is None:
        return False
    stop = float(time.perf_counter() - start + last_epoch > config.time_limit)
    if world > 1:
        t = torch.tensor([stop], device=device)
        dist.broadcast(t, 0)
        stop = t.item()
    return bool(stop)
