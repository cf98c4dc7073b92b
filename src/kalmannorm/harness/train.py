"""Training harness: the importable :func:`train` (config in :mod:`.config`, learning-rate
recipes in :mod:`.recipes`, callbacks in :mod:`.callbacks`; all importable from here).

Follows the released BKN CIFAR protocol (``docs/method.md`` section 6) as the ``paper`` recipe
and offers a ``short`` recipe that fits a CPU. The statistics group size (``micro_batch``) is a
property of the norm layers and independent of the SGD batch (``batch_size``): the paper's "batch
size 2" is ``batch_size=128, micro_batch=2``; a true SGD batch of 2 is ``batch_size=2,
micro_batch=None``. Incomplete training batches are dropped, so every batch splits into groups.

Every run lives in a directory holding ``record.json`` (see :mod:`kalmannorm.harness.records`),
rewritten after every epoch, and ``checkpoint.pt``, written after every epoch; ``resume=True`` continues
from the checkpoint. The random state is re-derived from ``(seed, epoch, rank)`` at the start of
every epoch, so a resumed run repeats the uninterrupted one bit for bit on the same machine.

Multi-process: run the same command under ``torchrun --nproc_per_node=N``; each rank trains a
DistributedDataParallel replica on its own shard of every epoch (gloo on CPU, nccl on CUDA) with
its own micro-batch statistics. ``batch_size`` is per rank (the global SGD batch is
``N * batch_size``); rank 0 writes the record and checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .callbacks import Callback, LogLines, ProgressBar, RunState
from .config import PREDICTIONS, RUNTIME_FIELDS, TrainConfig, config_defaults, default_label
from .data import ImageData, epoch_batches, eval_batches, load_dataset
from .models import build_model
from .recipes import RECIPES, PaperRecipe, ShortRecipe, weight_decay_groups
from .records import (SCHEMA, atomic_path, describe_normalization, git_info,
                      normalization_with_defaults, now, repo_relative, versions, write_json)

# The run's building blocks live in recipes, config and callbacks; they are importable from here.
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
    "evaluate",
    "check_run_dir",
    "Terminated",
    "weight_decay_groups",
    "default_label",
]

log = logging.getLogger(__name__)


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
    from kalmannorm.prediction import has_kalman_layers

    torch.manual_seed(config.seed)
    model = build_model(config.arch, data.num_classes, config.norm_layer(), data.in_channels,
                        width=config.width, **config.model_options).to(device)
    if config.channels_last:  # 4-D weights only; a convolution's output follows its weight's layout
        model = model.to(memory_format=torch.channels_last)
    net = (PREDICTIONS[config.prediction](model, **config.prediction_options)
           if has_kalman_layers(model) else model)
    return model, net


def _peak_memory(device: torch.device) -> Dict[str, Any]:
    """The epoch's peak memory: CUDA bytes allocated by tensors (reset each epoch), or on the
    CPU the process's peak resident set so far (the OS keeps no per-epoch peak)."""
    if device.type == "cuda":
        return dict(kind="cuda_allocated", bytes=torch.cuda.max_memory_allocated(device))
    import resource

    return dict(kind="cpu_max_rss", bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _resumed_record(record: Dict[str, Any], fresh: Dict[str, Any], ckpt_path: str) -> Dict[str, Any]:
    """The checkpoint's record, continued by this session: refused if this code resolves the
    norm layers' options differently from the session that started the run (the run would mix
    two configurations under one label; an option that session's code lacked counts as its
    default); otherwise the epoch and the code this session resumes
    with are appended to ``resumed_at`` and ``resumed_code``."""
    if record.get("normalization") is not None and (normalization_with_defaults(
            record["normalization"]) != normalization_with_defaults(fresh["normalization"])):
        raise ValueError(
            f"cannot resume {ckpt_path}: this code resolves the norm layers' options to "
            f"{json.dumps(fresh['normalization'], sort_keys=True)}, the run started with "
            f"{json.dumps(record['normalization'], sort_keys=True)}; resume with the code of "
            f"commit {record.get('git_commit')}, or start again with --overwrite")
    record["resumed_at"].append(record["epochs_done"])
    record.setdefault("resumed_code", []).append(
        dict(epoch=record["epochs_done"], git_commit=fresh["git_commit"],
             git_dirty=fresh["git_dirty"], kalmannorm=fresh["versions"].get("kalmannorm")))
    return record


def _guard(model: nn.Module) -> Tuple[int, int]:
    from kalmannorm import guard_report

    counts = guard_report(model)
    return counts["fallbacks"], counts["priors"]


def _new_record(config: TrainConfig, data: ImageData, model: nn.Module, net: nn.Module, recipe, device, world,
                steps) -> Dict[str, Any]:
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
        normalization=describe_normalization(net, (type(config.norm_layer()(8)),)),
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
    saved = {**config_defaults(), **saved}  # a field the saving code lacked ran as its default
    diffs = [k for k in current if k not in RUNTIME_FIELDS and saved.get(k) != current[k]]
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
    graphed: Optional["GraphedStep"] = None  # with config.cuda_graphs, once captured


def forward_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool,
                     cache: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A training step's forward (bfloat16 autocast with ``amp``), cross-entropy and backward:
    ``(logits, loss)``. ``cache``: autocast's cast cache (off inside a CUDA graph capture)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=cache):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return logits, loss


class GraphedStep:
    """A training step's forward, loss and backward captured once in a CUDA graph.

    Each call copies the batch into the graph's static inputs and replays it: the gradients land
    in the parameters' ``.grad`` (static tensors, overwritten each replay), and the caller runs
    the optimizer eagerly. Capture needs a few warm-up passes (on a side stream, as torch
    requires); the model's buffers (running statistics, step counters) are restored afterwards,
    so warm-up and capture leave no trace in the run. Everything the step does must be free of
    host synchronisation and of host-side state that changes between steps (the kalmannorm
    layers are; a layer that is not makes the capture fail, and the run falls back to eager
    steps, saying so in its record).
    """

    def __init__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool,
                 warmup: int = 3) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        self.amp = amp
        buffers = list(net.buffers())
        saved = [b.clone() for b in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                net.zero_grad(set_to_none=True)
                self._forward_backward(net)
        torch.cuda.current_stream().wait_stream(side)
        net.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.loss = self._forward_backward(net)
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)

    def _forward_backward(self, net: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        # autocast's cast cache must be off under capture (torch.cuda.graphs' documentation)
        return forward_backward(net, self.static_x, self.static_y, self.amp, cache=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.logits, self.loss


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
        if config.cuda_graphs and session.graphed is None and len(index) == config.batch_size:
            session.graphed = _capture(session, x, y)
        if session.graphed:
            logits, loss = session.graphed(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            logits, loss = forward_backward(net, x, y, config.amp)
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


def _capture(session: _Session, x: torch.Tensor, y: torch.Tensor):
    """The :class:`GraphedStep` of this run, or ``False`` (eager steps from here on) when the
    step cannot be captured; the record says which (``record["cuda_graphs"]``)."""
    record = session.state.record
    try:
        graphed = GraphedStep(session.net, x, y, session.config.amp)
        record["cuda_graphs"] = "captured"
        return graphed
    except Exception as err:  # capture refused: any op with a host sync, say
        logging.getLogger(__name__).warning("CUDA graph capture failed, training eagerly: %r", err)
        record["cuda_graphs"] = f"capture failed, eager steps: {err!r}"[:500]
        torch.cuda.synchronize()
        session.net.zero_grad(set_to_none=True)
        return False


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
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device (device {config.device!r} is "
                         f"{device.type} here); drop --cuda-graphs")
    net = None
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
        record = _new_record(config, data, model, net, recipe, device, world, steps)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            record = _resumed_record(ckpt["record"], record, ckpt_path)
            record.update(status="running", complete=False, stop_reason=None)
        if world > 1:
            ddp_kw = dict(device_ids=[device.index]) if device.type == "cuda" else {}
            net = nn.parallel.DistributedDataParallel(net, **ddp_kw)
        if config.compile:
            net = torch.compile(net)
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
            # Drop the DDP wrapper while the group is still registered: were its reducer the last
            # owner of a gloo group, freeing it would join gloo's worker thread with the GIL held
            # while that thread waits for the GIL to free the last collective's tensors (a hang
            # at exit seen under torchrun with torch 2.13).
            net = None
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
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
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
                peak_memory=_peak_memory(device),
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
