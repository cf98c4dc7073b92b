"""The configuration of a training run: :class:`TrainConfig`, checked in full before any work."""
from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from kalmannorm import AnalyticKalmanPredictor, KalmanPredictor

from .data import DATASETS
from .models import build_model
from .recipes import RECIPES, check_field, dataclass_from_dict, is_finite_number

__all__ = ["TrainConfig", "PREDICTIONS", "config_defaults", "default_label"]

PREDICTIONS = {"sampled": KalmanPredictor, "analytic": AnalyticKalmanPredictor}
# What ``prediction_options`` may set (the harness's models take one input tensor, so
# ``batch_input`` never needs setting).
_PREDICTION_OPTIONS = {"sampled": ("rows_per_group", "min_prior_values"), "analytic": ()}


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
# ``channels_last`` is one: it changes the memory layout, not the arithmetic (equal to rounding,
# as a thread count is), so a run may go on in either layout.
RUNTIME_FIELDS = ("label", "device", "threads", "eval_batch_size", "run_dir", "resume", "overwrite",
                  "time_limit", "progress", "data_dir", "download", "channels_last")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Unknown keys fail loudly (:meth:`from_dict`).

    Method: ``norm`` is a registry name of :func:`kalmannorm.get_norm_layer` (``batchnorm``,
    ``ghost_batchnorm``, ``groupnorm``, ``batchrenorm``, ``bkn``, ...); ``micro_batch`` (rows per
    statistics group, ``None`` = the whole batch) and ``gain`` (BKN's ``p``) are passed to it when
    set, with ``norm_options``; ``prediction`` (``sampled`` or ``analytic``) picks how a model with
    BKN layers predicts their statistics, and ``prediction_options`` configure the sampled one
    (``rows_per_group``, ``min_prior_values`` of :class:`kalmannorm.KalmanPredictor`).
    ``label`` names the method in reports (default from those fields).

    Data: ``dataset`` is ``digits`` (offline default), ``cifar10``, ``cifar100`` or ``folder``
    (``data_dir`` with one sub-folder per class); ``limit_train`` / ``limit_test`` keep a fixed
    random subset for quick checks.

    Optimization: ``recipe`` is ``short`` or ``paper`` (:class:`ShortRecipe`,
    :class:`PaperRecipe`); ``epochs``, ``lr`` and ``weight_decay`` override the recipe's values,
    ``recipe_options`` any other recipe field. ``batch_size`` is per process.

    Run: ``device`` ``"auto"`` picks CUDA when available; ``run_dir`` defaults to
    ``runs/<label>-seed<seed>``; ``resume`` continues from its checkpoint; ``overwrite`` replaces
    an existing run; ``time_limit`` (seconds) stops after the epoch past which another epoch would
    not fit; ``amp`` trains under bfloat16 autocast (BKN statistics stay float32);
    ``cuda_graphs`` captures each training step's forward and backward in a CUDA graph and
    replays it (CUDA only; the optimizer step stays eager, so the learning-rate schedule is
    unchanged); the per-launch host time of small layers then disappears. Not yet run on a GPU
    (written in a session without one): a capture that fails falls back to eager steps and the
    record's ``cuda_graphs`` field says so.
    ``compile`` trains through ``torch.compile`` (on CUDA the BKN layers' Triton kernels are
    traced as custom ops, one graph per model). ``channels_last`` keeps the model's 4-D weights,
    and so its activations, in the channels-last layout: the same arithmetic up to rounding,
    often faster (convolutions on the CPU's oneDNN and on GPUs' tensor cores).
    """

    label: Optional[str] = None
    arch: str = "preact_resnet20"
    width: Optional[int] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    norm: str = "batchnorm"
    micro_batch: Optional[int] = None
    gain: Optional[float] = None
    prediction: str = "sampled"
    prediction_options: Dict[str, Any] = field(default_factory=dict)
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
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
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
            check_field(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in ("width", "image_size", "limit_train", "limit_test", "threads"):
            value = getattr(self, name)
            check_field(value is None or (isinstance(value, int) and value >= 1), name, value,
                   "an integer >= 1 or None")
        if self.cuda_graphs and (self.compile or self.device == "cpu"):
            raise ValueError("cuda_graphs needs a CUDA device and excludes compile")
        if self.micro_batch is not None:
            if not isinstance(self.micro_batch, int) or self.micro_batch < 1 \
                    or self.batch_size % self.micro_batch:
                raise ValueError(
                    f"batch_size {self.batch_size} does not split into groups of micro_batch="
                    f"{self.micro_batch}; use a batch size that is a multiple of it"
                )
        check_field(self.gain is None or (is_finite_number(self.gain) and 0 <= self.gain <= 1), "gain", self.gain,
               "in [0, 1] or None")
        check_field(self.time_limit is None or (is_finite_number(self.time_limit) and self.time_limit >= 0),
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
                model = build_model(self.arch, 10, self.norm_layer(), 3, width=self.width,
                                    **self.model_options)
        except TypeError as err:
            raise ValueError(
                f"norm {self.norm!r} or architecture {self.arch!r} does not take these options "
                f"({err}); for BatchNorm over micro-batches use norm='ghost_batchnorm'"
            ) from None
        check_field(isinstance(self.prediction_options, dict), "prediction_options",
                    self.prediction_options, "a dict")
        if self.prediction_options:
            self._check_prediction_options(model)

    def _check_prediction_options(self, model: torch.nn.Module) -> None:
        from kalmannorm.prediction import has_kalman_layers

        if not has_kalman_layers(model):
            raise ValueError(
                f"prediction_options {self.prediction_options} configure the prediction of BKN "
                f"layers, and norm {self.norm!r} builds none; drop them or use norm='bkn'")
        allowed = _PREDICTION_OPTIONS[self.prediction]
        unknown = sorted(set(self.prediction_options) - set(allowed))
        if unknown:
            raise ValueError(
                f"prediction {self.prediction!r} does not take the options {unknown}"
                + (f"; it takes {list(allowed)}" if allowed else "; it takes none"))
        if self.prediction == "sampled":
            import inspect

            from kalmannorm.prediction import check_rows_options

            defaults = inspect.signature(KalmanPredictor).parameters
            try:
                check_rows_options(
                    self.prediction_options.get("rows_per_group"),
                    self.prediction_options.get("min_prior_values",
                                                defaults["min_prior_values"].default))
            except (TypeError, ValueError) as err:
                raise ValueError(f"prediction_options: {err}") from None

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. parsed JSON); unknown keys raise ``ValueError``."""
        return dataclass_from_dict(cls, dict(values), "config")

    def resolved_recipe(self):
        """The recipe dataclass with ``epochs``, ``lr``, ``weight_decay`` and options applied."""
        options = dict(self.recipe_options)
        for key in ("epochs", "lr", "weight_decay"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return dataclass_from_dict(RECIPES[self.recipe], options, f"{self.recipe!r} recipe")

    def resolved_label(self) -> str:
        """``label``, or one derived from the configuration: :func:`default_label` and every
        option of the norm layer that differs from its default, the prediction when it is not
        the sampled one, and ``bf16`` under ``amp``; so different methods get different
        labels."""
        if self.label:
            return self.label
        from .records import changed_options

        layer = self.norm_layer()(8)
        shown = ("micro_batch", "gain")
        parts = [f"{k}={v}" for k, v in changed_options(layer).items() if k not in shown]
        if self.prediction != "sampled" and hasattr(layer, "gain_rule"):
            parts.append(f"{self.prediction} prediction")
        parts += [f"{k}={v}" for k, v in sorted(self.prediction_options.items())]
        if self.amp:
            parts.append("bf16")
        base = default_label(self.norm, self.micro_batch, self.gain, self.batch_size)
        return ", ".join([base] + parts)

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


def config_defaults() -> Dict[str, Any]:
    """Every :class:`TrainConfig` field's default: what a record written before a field existed
    ran with."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default
            for f in fields(TrainConfig)}
