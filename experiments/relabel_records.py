"""Give committed run records that predate ``normalization`` the options they actually ran.

Records written before run records stored every resolved option of their norm layers
(``kalmannorm.harness.records.describe_normalization``) carry only the config's explicit options,
so their labels ("BKN p=0.9, m=2") hide the defaults of the code they ran with. For each such
record this script checks out the record's own commit (``git worktree``, temporary), builds one
norm layer from the record's config with that code, and reads back every option the layer holds
(defaults included). Options the code of that time did not have yet are filled with what it did
(``IMPLIED``: decisions were layer-wide, running statistics averaged over the groups). The
record gets ``normalization`` (marked ``reconstructed``), its old label as ``label_original``,
and a label derived from the configuration: the options that differ from today's defaults.

    python experiments/relabel_records.py docs/results/records/*.json docs/results/demo/runs/*/record.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

# What the code did before an option existed (the option's name -> the behaviour it had then).
IMPLIED = {
    "kalmannorm.modules.BatchKalmanNorm2d": {"decisions": "layer", "running_stats": "all",
                                             "gain_rule": "fixed", "guard": "upper"},
    "kalmannorm.batchrenorm.BatchRenorm2d": {"running_stats": "all"},
}
# Options that act only through a prior: not part of a label when the gain is 0.
PRIOR_OPTIONS = ("guard_threshold", "detach_prior", "propagate", "guard", "gain_rule",
                 "gain_warmup", "decisions")

# Run with the record's own code (PYTHONPATH = its src): one layer, its options read back.
_PROBE = r"""
import inspect, json, sys
import kalmannorm as kn
config = json.loads(sys.argv[1])
kw = dict(config.get("norm_options") or {})
if config.get("micro_batch") is not None:
    kw["micro_batch"] = config["micro_batch"]
if config.get("gain") is not None:
    kw["gain"] = config["gain"]
layer = kn.get_norm_layer(config["norm"], **kw)(16)
options = {}
for cls in type(layer).__mro__:
    if cls is object or "__init__" not in vars(cls):
        continue
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "num_features", "num_channels", "device", "dtype") or name in options \
                or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(layer, name):
            continue
        value = getattr(layer, name)
        if isinstance(value, (bool, int, float, str, type(None))):
            options[name] = value
print(json.dumps({"class": f"{type(layer).__module__}.{type(layer).__qualname__}",
                  "options": options}))
"""


def probe(commit: str, config: Dict[str, Any], trees: Dict[str, str]) -> Dict[str, Any]:
    if commit not in trees:
        path = tempfile.mkdtemp(prefix=f"kn-{commit[:8]}-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", path, commit],
                       check=True)
        trees[commit] = path
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(config)], check=True,
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.join(trees[commit], "src")))
    return json.loads(out.stdout.strip().splitlines()[-1])


def today_layer(cls_name: str, options: Dict[str, Any]):
    """The layer today's code builds with ``options`` (whose labels the harness derives)."""
    import importlib

    module, _, name = cls_name.rpartition(".")
    return getattr(importlib.import_module(module), name)(16, **options)


def relabel(path: str, trees: Dict[str, str]) -> bool:
    from kalmannorm.harness.config import default_label
    from kalmannorm.harness.records import changed_options

    with open(path) as f:
        record = json.load(f)
    if record.get("schema") != "kalmannorm.run/1" or "normalization" in record:
        return False
    config = record["config"]
    known = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{record['git_commit']}^{{commit}}"],
                           capture_output=True).returncode == 0
    if not known:
        print(f"{os.path.relpath(path, ROOT)}: commit {record['git_commit'][:10]} is not in this "
              "repository's history; left as it is")
        return False
    layer = probe(record["git_commit"], config, trees)
    implied = {k: v for k, v in IMPLIED.get(layer["class"], {}).items()
               if k not in layer["options"]}
    options = {**layer["options"], **implied}
    hidden = ("micro_batch", "gain") + (PRIOR_OPTIONS if options.get("gain") == 0 else ())
    changed = [f"{k}={v}" for k, v in changed_options(today_layer(layer["class"], options)).items()
               if k not in hidden]
    if config.get("prediction", "sampled") != "sampled" and "KalmanNorm" in layer["class"]:
        changed.append(f"{config['prediction']} prediction")
    base = default_label(config["norm"], config.get("micro_batch"), config.get("gain"),
                         config["batch_size"])
    record["label_original"] = record["label"]
    record["label"] = ", ".join([base] + changed)
    record["normalization"] = {
        "layers": [{"class": layer["class"], "count": None, "options": options}],
        "predictor": None,
        "reconstructed": (f"one layer built from the config with the code at the record's "
                          f"commit; count unknown; implied by that code: {sorted(implied)}"),
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2, allow_nan=True)
        f.write("\n")
    print(f"{os.path.relpath(path, ROOT)}: {record['label_original']!r} -> {record['label']!r}")
    return True


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+")
    args = p.parse_args(argv)
    trees: Dict[str, str] = {}
    try:
        for path in args.records:
            relabel(path, trees)
    finally:
        for path in trees.values():
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path])


if __name__ == "__main__":
    main()
