"""The ``kalmannorm`` command line: argparse subcommands mapped to functions.

Commands live in :data:`COMMANDS`, a table of :class:`Command` entries. A command may name a
module instead of functions; that module (with ``add_arguments(parser)`` and ``main(args)``) is
imported only when its command runs, e.g. ``bench``. A command lists the packages of the
``train`` extra it needs; a missing one stops it before any work with the install command.

Usage::

    kalmannorm demo                                   # micro-batch comparison, bundled photographs
    kalmannorm train --norm bkn --gain 0.9 --micro-batch 2 --epochs 10
    kalmannorm train --dataset cifar10 --data-dir data --arch preact_resnet32 --recipe paper \\
        --norm bkn --gain 0.9 --micro-batch 2 --device cuda
    torchrun --nproc_per_node=2 -m kalmannorm train ...   # DDP; --batch-size is per process
    kalmannorm report runs/demo --out runs/demo
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .extras import MissingExtraError, require_all
from .train import Terminated

__all__ = ["Command", "COMMANDS", "build_parser", "main", "demo_configs"]

log = logging.getLogger("kalmannorm")


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` and ``main(args) -> int | None``, or a ``module``
    holding both, imported only when the command runs."""

    name: str
    help: str
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    main: Optional[Callable[[argparse.Namespace], Optional[int]]] = None
    module: Optional[str] = None
    requires: Tuple[str, ...] = ()  # import names of train-extra packages (extras.TRAIN_EXTRA)
    in_checkout: bool = False  # ``module`` lives in the source repository, not in the package


# ------------------------------------------------------------------------------------------ train
def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``: help text shows it, never a copy."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _per_recipe(name: str) -> str:
    """``"short 10, paper 400"``: a recipe field's default in every recipe."""
    from .train import RECIPES

    return ", ".join(f"{key} {_field_default(recipe, name):g}" for key, recipe in RECIPES.items())


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``train``; each maps to a :class:`kalmannorm.harness.train.TrainConfig` field,
    and the defaults the help shows are read from those fields."""
    from .data import DATASETS, DEFAULT_DATA_DIR
    from .models import ARCHITECTURES, DEFAULT_WIDTH
    from .train import PREDICTIONS, RECIPES, TrainConfig

    def default(name: str) -> str:
        return f"default {_field_default(TrainConfig, name)}"

    # Flags default to None: only the ones given override --config and the dataclass defaults.
    p.add_argument("--config", metavar="JSON", help="JSON file of TrainConfig fields (unknown keys fail)")
    g = p.add_argument_group("method")
    g.add_argument("--norm", help="norm registry name: batchnorm, ghost_batchnorm, groupnorm, "
                   f"layernorm, instancenorm, batchrenorm, bkn ({default('norm')})")
    g.add_argument("--micro-batch", type=int, help="rows per statistics group (default: whole batch)")
    g.add_argument("--gain", type=float, help="BKN gain p, the weight on the prediction (e.g. 0.9)")
    g.add_argument("--prediction", choices=tuple(PREDICTIONS),
                   help="BKN layer-to-layer prediction: sampled shadow rows (the released code) or "
                   f"analytic moment propagation ({default('prediction')})")
    g.add_argument("--prediction-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="option of the sampled prediction (JSON value), repeatable: "
                   "rows_per_group=4 (shadow rows per statistics group), min_prior_values")
    g.add_argument("--norm-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="extra norm constructor option (JSON value), repeatable, e.g. num_groups=4")
    g.add_argument("--label", help="method name in reports (default from norm, gain, micro-batch)")
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", help=f"{', '.join(ARCHITECTURES)}; any preact_resnet6n+2 ({default('arch')})")
    g.add_argument("--width", type=int, help="base width (default " + ", ".join(
        f"{w} {family}" for family, w in DEFAULT_WIDTH.items()) + ")")
    g.add_argument("--model-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="resnet* option: stem=cifar, zero_init_residual=true")
    g.add_argument("--dataset", choices=DATASETS, help=f"{default('dataset')} (offline)")
    g.add_argument("--data-dir", help=f"CIFAR directory (default {DEFAULT_DATA_DIR}) or image-folder root")
    g.add_argument("--download", action="store_true", default=None, help="fetch CIFAR if missing")
    g.add_argument("--image-size", type=int, help="resize folder images to SIZE x SIZE")
    g.add_argument("--limit-train", type=int, help="train on a fixed random subset of this size")
    g.add_argument("--limit-test", type=int, help="test on a fixed random subset of this size")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    g = p.add_argument_group("optimization")
    g.add_argument("--recipe", choices=list(RECIPES), help=f"short or paper (released schedule); {default('recipe')}")
    g.add_argument("--epochs", type=int, help=f"default: the recipe's ({_per_recipe('epochs')})")
    g.add_argument("--lr", type=float, help=f"peak/main learning rate (default: the recipe's, {_per_recipe('lr')})")
    g.add_argument("--weight-decay", type=float,
                   help=f"on conv and linear weights (default: the recipe's, {_per_recipe('weight_decay')})")
    g.add_argument("--recipe-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="other recipe field, e.g. warmup_fraction=0.1")
    g.add_argument("--batch-size", type=int, help=f"SGD batch per process ({default('batch_size')})")
    g.add_argument("--eval-batch-size", type=int, help=f"test batch ({default('eval_batch_size')})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, nargs="+", help=f"one run per seed ({default('seed')})")
    g.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... ({default('device')})")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last weights and activations (same results up to rounding)")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay each training step's forward and backward as a CUDA graph")
    g.add_argument("--compile", action="store_true", default=None,
                   help="train through torch.compile (evaluation stays eager)")
    g.add_argument("--run-dir", help="default runs/<label>-seed<seed>; with several seeds, DIR/seed<seed>")
    g.add_argument("--resume", action="store_true", default=None, help="continue from the run's checkpoint")
    g.add_argument("--overwrite", action="store_true", default=None, help="start an existing run again")
    g.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop after the epoch past which another would not fit (record: incomplete)")
    g.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")


_OPTION_FLAGS = {"norm_option": "norm_options", "model_option": "model_options",
                 "recipe_option": "recipe_options", "prediction_option": "prediction_options"}


def config_from_args(args: argparse.Namespace) -> List[Any]:
    """TrainConfigs (one per seed) from ``--config`` and the flags given."""
    from .train import TrainConfig

    values: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            values = json.load(f)
        TrainConfig.from_dict(values)  # unknown keys fail before anything runs
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in vars(args).items():
        if value is None:
            continue
        if name in _OPTION_FLAGS:
            values[_OPTION_FLAGS[name]] = {**values.get(_OPTION_FLAGS[name], {}), **dict(value)}
        elif name in fields and name != "seed":
            values[name] = value
    if args.quiet:
        values["progress"] = False
    seeds = args.seed or [values.get("seed", 0)]
    configs = []
    for seed in seeds:
        v = dict(values, seed=seed)
        if len(seeds) > 1 and v.get("run_dir"):
            v["run_dir"] = os.path.join(v["run_dir"], f"seed{seed}")
        configs.append(TrainConfig.from_dict(v))
    return configs


def train_main(args: argparse.Namespace) -> int:
    from .data import DATASET_REQUIRES
    from .train import check_run_dir, train

    configs = config_from_args(args)  # every config validated before the first run starts
    for config in configs:
        require_all(DATASET_REQUIRES[config.dataset], f"kalmannorm train --dataset {config.dataset}")
        check_run_dir(config)
    for config in configs:
        record = train(config)
        if record["status"] not in ("complete", "incomplete"):
            return 1
    return 0


# ----------------------------------------------------------------------------------------- report
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("records", nargs="+", metavar="RECORD",
                   help="record files, or directories searched for them")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.md and test_error.png go")
    p.add_argument("--title", help="report title")


def report_main(args: argparse.Namespace) -> int:
    from .report import write_report

    result = write_report(args.records, args.out, args.title)
    print(result["markdown"])
    print(f"report: {result['report']}\nplot: {result['plot']}")
    return 0


# ------------------------------------------------------------------------------------------- demo
# Calibrated by measurement (docs/results/demo/, experiments/demo_calibration.py): the smallest
# model, subset and epoch count at which the micro-batch gap between BatchNorm with full-batch
# statistics and BatchNorm at micro-batch 2 is larger than the spread over seeds, within five
# minutes on 2 CPU cores for all methods.
DEMO = dict(dataset="cifar10_subset", arch="preact_resnet20", width=8, batch_size=64, lr=0.1,
            epochs=4, limit_train=None)
DEMO_BKN = "BKN, m=2"
DEMO_BN_FULL = "BN, full batch"
DEMO_BN_M2 = "BN, m=2"


def demo_methods(steps: int) -> List[Dict[str, Any]]:
    """The methods the demo compares; Batch Renorm's warm-up is scaled to ``steps``."""
    return [
        dict(label=DEMO_BN_FULL, norm="batchnorm"),
        dict(label=DEMO_BN_M2, norm="ghost_batchnorm", micro_batch=2),
        dict(label="GN (4 groups)", norm="groupnorm", norm_options=dict(num_groups=4)),
        dict(label="BRN, m=2", norm="batchrenorm", micro_batch=2,
             norm_options=dict(warmup_steps=steps // 10, ramp_steps=steps // 5)),
        dict(label=DEMO_BKN, norm="bkn", gain=0.9, micro_batch=2),
    ]


def demo_configs(epochs: Optional[int] = None, seeds: Sequence[int] = (0,),
                 out: str = os.path.join("runs", "demo"), dataset: Optional[str] = None,
                 **common: Any) -> List[Any]:
    """The demo's runs: the micro-batch comparison on real photographs, offline.

    The CIFAR-10 subset bundled with the repository (5,000 training and 1,000 test photographs,
    ``datasets/cifar10-subset``), a pre-activation ResNet-20 at width 8, SGD batch 64 with the
    short recipe; statistics over the whole batch (BN) or over micro-batches of 2: BN, GroupNorm
    (4 groups), Batch Renorm, BKN (p = 0.9). Batch Renorm's warm-up is scaled to the run (a tenth
    of the steps, then a ramp over another fifth) instead of its defaults, meant for far longer
    runs. ``dataset="cifar10"`` (with ``data_dir``/``download`` in ``common``) runs the same
    comparison on the full data set.
    """
    from .data import load_dataset  # noqa: F401  (fail early without the train extra)
    from .train import TrainConfig

    base = dict(DEMO)
    base["dataset"] = dataset or base["dataset"]
    base["epochs"] = epochs or base["epochs"]
    base.update(common)
    train_size = {"cifar10_subset": 5000, "digits": 1437}.get(base["dataset"], 50000)
    if base.get("limit_train"):
        train_size = min(train_size, base["limit_train"])
    steps = train_size // base["batch_size"] * base["epochs"]
    configs = []
    for seed in seeds:
        for m in demo_methods(steps):
            slug = m["label"].replace(" ", "").replace(",", "_").replace("(", "").replace(")", "")
            configs.append(TrainConfig(**base, **m, seed=seed,
                                       run_dir=os.path.join(out, f"{slug}-seed{seed}")))
    return configs


def micro_batch_gap(rows: Sequence[Dict[str, Any]]) -> str:
    """One honest paragraph from :func:`kalmannorm.report.summarize` rows: the gap between BN
    with full-batch statistics and BN at micro-batch 2, and how much of it BKN recovers."""
    by_label = {r["label"]: r for r in rows}
    full, m2, bkn = (by_label.get(k) for k in (DEMO_BN_FULL, DEMO_BN_M2, DEMO_BKN))
    if not (full and m2 and bkn) or None in (full["test_error_mean"], m2["test_error_mean"],
                                             bkn["test_error_mean"]):
        return "micro-batch gap: not all of BN (full batch), BN (m=2) and BKN have results"

    def pct(r):
        spread = "" if r["test_error_std"] is None else f" ± {100 * r['test_error_std']:.1f}"
        return f"{100 * r['test_error_mean']:.1f}%{spread}"

    gap = m2["test_error_mean"] - full["test_error_mean"]
    text = (f"Micro-batch gap: BN with full-batch statistics {pct(full)}, BN at micro-batch 2 "
            f"{pct(m2)} test error ({100 * gap:+.1f} points, n = {m2['seeds']} seed(s)). ")
    gained = m2["test_error_mean"] - bkn["test_error_mean"]
    if gap <= 0:
        return text + (f"BKN {pct(bkn)}. There is no gap to recover in this run; more epochs or "
                       "seeds would be needed to show one.")
    if gained <= 0:
        return text + (f"BKN {pct(bkn)}: it does NOT recover any of the gap here "
                       f"({100 * -gained:.1f} points worse than BN at micro-batch 2).")
    return text + (f"BKN {pct(bkn)} recovers {100 * gained / gap:.0f}% of the gap "
                   f"({100 * gained:.1f} of {100 * gap:.1f} points).")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    p.add_argument("--epochs", type=int, default=DEMO["epochs"],
                   help="epochs per run (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default %(default)s)")
    p.add_argument("--dataset", default=DEMO["dataset"], choices=["cifar10_subset", "cifar10", "digits"],
                   help="cifar10_subset (bundled, offline; default), cifar10 (full, with "
                   "--data-dir/--download) or digits (8x8, offline)")
    p.add_argument("--data-dir", help="data directory for --dataset cifar10")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="directory (default %(default)s)")
    p.add_argument("--device", default=_field_default(TrainConfig, "device"), help="(default %(default)s)")
    p.add_argument("--threads", type=int)
    p.add_argument("--fresh", action="store_true", help="start the runs again instead of resuming them")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")


def demo_main(args: argparse.Namespace) -> int:
    from .report import collect_records, summarize, write_report
    from .train import train

    configs = demo_configs(args.epochs, args.seeds, args.out, dataset=args.dataset,
                           data_dir=args.data_dir, download=args.download, device=args.device,
                           threads=args.threads, progress=not args.quiet, resume=not args.fresh,
                           overwrite=args.fresh)
    log.info("demo: %d runs on %s into %s", len(configs), args.dataset, args.out)
    for config in configs:
        train(config)
    dirs = [c.run_dir for c in configs]
    result = write_report(dirs, args.out, f"Micro-batch comparison on {args.dataset} "
                                          f"({args.epochs} epochs)")
    gap = micro_batch_gap(summarize(collect_records(dirs)))
    with open(result["report"], "a") as f:
        f.write(f"\n{gap}\n")
    print(result["markdown"])
    print(gap)
    print(f"report: {result['report']}\nplot: {result['plot']}")
    return 0


# ---------------------------------------------------------------------------------------- parsing
COMMANDS: List[Command] = [
    Command("train", "train one model (one run per seed), writing a record and checkpoints",
            add_train_arguments, train_main, requires=("numpy",)),
    Command("report", "markdown table and test-error plot from run records", add_report_arguments,
            report_main, requires=("matplotlib",)),
    Command("demo", "micro-batch comparison on bundled real photographs (CIFAR-10 subset, about "
            "5 CPU minutes)", add_demo_arguments, demo_main,
            requires=("numpy", "PIL", "matplotlib")),
    Command("statistics-error", "does BKN's premise hold on a trained run? Per layer, how far "
            "the group's own statistics, BKN's estimate, its prediction and the running "
            "statistics fall from the batch's", module="kalmannorm.harness.diagnose",
            requires=("numpy",)),
    Command("bench", "speed benchmarks of the norm layers (from a source checkout; same as "
            "`python -m benchmarks` at its root)", module="benchmarks.cli", in_checkout=True),
]


def _checkout_root() -> Optional[str]:
    """The repository root when this package runs from a source checkout (``src/`` layout)."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def _load_module(parser: argparse.ArgumentParser, command: Command):
    root = _checkout_root() if command.in_checkout else None
    top = command.module.split(".")[0]
    if root and os.path.isfile(os.path.join(root, top, "__init__.py")) and root not in sys.path:
        sys.path.append(root)  # an editable install of a checkout: its benchmarks/ folder
    try:
        module = importlib.import_module(command.module)
    except ImportError as err:
        if command.in_checkout and err.name is not None and err.name.split(".")[0] == top:
            parser.error(f"the '{command.name}' command runs {top}/ of a source checkout of "
                         f"kalmannorm, which is not installed with the package: in a clone of "
                         f"the repository run `python -m {top} --help` (or `make {command.name}`)")
        parser.error(f"the '{command.name}' command needs {command.module}, which is not "
                     f"available in this installation ({err})")
    for attr in ("add_arguments", "main"):
        if not callable(getattr(module, attr, None)):
            parser.error(f"{command.module} has no {attr}() for the '{command.name}' command")
    return module


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; a lazy command's module is imported only if ``argv`` selects it."""
    from kalmannorm import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="kalmannorm", description="Batch Kalman Normalization tools")
    parser.add_argument("--version", action="version", version=f"kalmannorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.module is None:
            command.add_arguments(p)
            p.set_defaults(_main=command.main, _requires=command.requires)
        elif command.name == chosen:
            module = _load_module(parser, command)
            module.add_arguments(p)
            p.set_defaults(_main=module.main, _requires=command.requires)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kalmannorm`` script and ``python -m kalmannorm``."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        require_all(args._requires, f"kalmannorm {args.command}")
        code = args._main(args)
    except (ValueError, FileNotFoundError, FileExistsError, MissingExtraError) as err:
        parser.exit(2, f"kalmannorm {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    except Terminated:
        parser.exit(143, "terminated (SIGTERM)\n")
    return int(code or 0)
