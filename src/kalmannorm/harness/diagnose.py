"""``kalmannorm statistics-error``: does BKN's premise hold on a trained run's weights and data?

Loads a run's checkpoint (one trained with BatchNorm-family layers: BatchNorm, per-group BN,
Batch Renorm, BKN), converts it to BKN at a micro-batch, and measures
:func:`kalmannorm.statistics_error` on batches of the run's test split (no augmentation),
averaged per layer::

    kalmannorm statistics-error runs/cifar/bn-m2-seed0 --micro-batch 2
    kalmannorm statistics-error runs/cifar/bn-m2-seed0 --prediction analytic --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import kalmannorm as kn
from kalmannorm.diagnostics import average_fields

from .config import TrainConfig
from .data import ImageData, load_dataset
from .models import build_model
from .records import read_record

__all__ = ["model_from_run", "average_statistics_error", "with_prediction", "closer",
           "add_arguments", "main"]


def model_from_run(run_dir: str, data_dir: Optional[str] = None
                   ) -> Tuple[TrainConfig, ImageData, nn.Module]:
    """A run's configuration, its data set (from ``data_dir``, default the run's) and its trained
    model with plain BatchNorm layers.

    The checkpoint's BatchNorm-family layers (per-group BN, Batch Renorm, BKN) keep BatchNorm's
    parameters and running buffers under the same names, so the weights load into the
    architecture built with ``nn.BatchNorm2d``; a run with other layers (GroupNorm, FRN, ...)
    is refused by name.
    """
    record_path = os.path.join(run_dir, "record.json")
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    for path in (record_path, checkpoint):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass the folder of a training run "
                                    "(kalmannorm train --run-dir ...) that saved a checkpoint")
    config = TrainConfig.from_dict(read_record(record_path)["config"])
    data = load_dataset(config.dataset, data_dir or config.data_dir, image_size=config.image_size)
    model = build_model(config.arch, data.num_classes, kn.get_norm_layer("batchnorm"),
                        data.in_channels, width=config.width, **config.model_options)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ValueError(
            f"{run_dir} was trained with --norm {config.norm}, whose layers do not carry "
            f"BatchNorm's parameters and buffers (missing {missing[:2]}); statistics-error "
            "measures runs of BatchNorm, per-group BN, Batch Renorm or BKN")
    return config, data, model


def average_statistics_error(net: nn.Module, data: ImageData, batches: int, batch_size: int,
                             seed: int = 0) -> List[Dict[str, Any]]:
    """:func:`kalmannorm.statistics_error` over ``batches`` test batches, averaged per layer.

    The batches are drawn without replacement in an order fixed by ``seed`` (also the seed of
    the shadow rows' samples). A value missing in every batch (a layer without a prediction) is
    ``None``, so the result is plain JSON.
    """
    if batches * batch_size > data.test_x.shape[0]:
        raise ValueError(f"{batches} batches of {batch_size} need {batches * batch_size} test "
                         f"images; the test split has {data.test_x.shape[0]}: ask for fewer")
    order = torch.randperm(data.test_x.shape[0], generator=torch.Generator().manual_seed(seed))
    per_batch = []
    for b in range(batches):
        x = data.normalize(data.test_x[order[b * batch_size:(b + 1) * batch_size]])
        torch.manual_seed(seed + b)
        per_batch.append([asdict(r) for r in kn.statistics_error(net, x)])
    return [{key: None if isinstance(value, float) and math.isnan(value) else value
             for key, value in average_fields(calls).items()} for calls in zip(*per_batch)]


def with_prediction(layers: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The layers of :func:`average_statistics_error` whose groups had a prediction to use."""
    return [la for la in layers if la["prior_used"] > 0]


def closer(layers: Sequence[Dict[str, Any]]) -> int:
    """How many of ``layers`` have BKN's variance estimate closer to the batch's than the
    group's own statistics (log-variance error)."""
    return sum(la["estimate_log_var_error"] < la["observed_log_var_error"] for la in layers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="folder of a training run with record.json and checkpoint.pt")
    p.add_argument("--micro-batch", type=int,
                   help="rows per statistics group (default: the run's --micro-batch)")
    p.add_argument("--prediction", choices=["sampled", "analytic"], default="sampled",
                   help="BKN's prediction (default sampled, the library's default)")
    p.add_argument("--rows-per-group", type=int,
                   help="shadow rows per group of the sampled prediction (default: the library's)")
    p.add_argument("--batches", type=int, default=8, help="test batches (default 8)")
    p.add_argument("--batch-size", type=int, default=128, help="rows per batch (default 128)")
    p.add_argument("--data-dir", help="the data set's folder (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="order of the batches, samples")
    p.add_argument("--json", help="also write the per-layer results to this JSON file")


def table(layers: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of :func:`average_statistics_error`'s layers, and the count of layers
    where BKN's variance estimate comes closer to the batch's than the group's own."""

    def fmt(value: Optional[float], digits: int = 3, sign: str = "") -> str:
        return "-" if value is None else f"{value:{sign}.{digits}f}"

    lines = ["| layer | after | prior used | log-var error: observed / estimate / prediction "
             "/ running | bias: observed / estimate / prediction / running |",
             "|---|---|---:|---|---|"]
    for la in layers:
        errs = " / ".join(fmt(la[f"{s}_log_var_error"])
                          for s in ("observed", "estimate", "prediction", "running"))
        bias = " / ".join(fmt(la[f"{s}_log_var_bias"], sign="+")
                          for s in ("observed", "estimate", "prediction", "running"))
        lines.append(f"| {la['layer']} | {la['after']} | {la['prior_used']:.2f} | {errs} | "
                     f"{bias} |")
    predicted = with_prediction(layers)
    lines += ["", f"BKN's variance estimate is closer to the batch's than the group's own in "
              f"{closer(predicted)} of {len(predicted)} layers with a prediction."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.batches < 1 or args.batch_size < 2:
        raise ValueError("--batches must be at least 1 and --batch-size at least 2")
    config, data, model = model_from_run(args.run_dir, args.data_dir)
    micro_batch = args.micro_batch or config.micro_batch
    if micro_batch is None:
        raise ValueError(f"{args.run_dir} trained on whole batches; pass --micro-batch M")
    options: Dict[str, Any] = dict(micro_batch=micro_batch, prediction=args.prediction)
    if args.rows_per_group is not None:
        options["rows_per_group"] = args.rows_per_group
    net = kn.convert_batchnorm(model, **options)
    layers = average_statistics_error(net, data, args.batches, args.batch_size, args.seed)
    print(table(layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run_dir=args.run_dir, convert_options=options, batches=args.batches,
                           batch_size=args.batch_size, seed=args.seed, layers=layers), f,
                      indent=2, allow_nan=False)
    return 0
