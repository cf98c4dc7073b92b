"""Hooks of :func:`kalmannorm.harness.train.train`: what they see and the built-in loggers."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["RunState", "Callback", "LogLines", "ProgressBar"]

log = logging.getLogger("kalmannorm.harness.train")


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
