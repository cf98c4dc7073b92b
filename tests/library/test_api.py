"""The public surface: README's API table, ``__all__`` and the renamed names agree."""
import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF
from kalmannorm import norms

ROOT = Path(__file__).resolve().parents[2]


def readme_api_table(text):
    """``{name: description}`` for the rows of README's "Public API:" table.

    A first column such as ```BatchRenorm1d/2d/3d``` names three classes; ```f(x, **kw)``` names
    ``f``.
    """
    block = text.split("Public API:", 1)[1].lstrip().split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:  # after the header and the --- row
        first, description = line.strip().strip("|").split("|", 1)
        description = description.strip()
        for entry in re.findall(r"`([^`]+)`", first):
            name = entry.split("(", 1)[0]
            base, *ranks = name.split("/")
            if ranks:
                stem = base[:-2]
                rows.update({stem + r: description for r in [base[-2:], *ranks]})
            else:
                rows[name] = description
    return rows


def test_readme_table_parser():
    text = ("Public API:\n\n| name | what |\n| --- | --- |\n| `Foo1d/2d` | layers |\n"
            "| `bar(x, **kw)`, `baz()` | functions |\n\nafter")
    assert readme_api_table(text) == {"Foo1d": "layers", "Foo2d": "layers",
                                      "bar": "functions", "baz": "functions"}


def test_all_is_the_readme_api_table():
    table = readme_api_table((ROOT / "README.md").read_text())
    assert sorted(table) == sorted(kn.__all__)
    assert len(set(kn.__all__)) == len(kn.__all__)
    for name in kn.__all__:
        assert getattr(kn, name) is not None


def test_readme_functional_row_lists_functional_all():
    description = readme_api_table((ROOT / "README.md").read_text())["functional"]
    assert sorted(re.findall(r"`(\w+)`", description)) == sorted(KF.__all__)


def test_star_import_gives_exactly_all():
    namespace = {}
    exec("from kalmannorm import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(kn.__all__)


def test_no_public_class_shadows_a_different_torch_class():
    # kn.GroupNorm is nn.GroupNorm with the channel count first; no other name of torch.nn.
    for name in kn.__all__:
        torch_class = getattr(nn, name, None)
        if isinstance(torch_class, type):
            assert issubclass(getattr(kn, name), torch_class), name


@pytest.mark.parametrize("module", [kn, norms])
@pytest.mark.parametrize("old, new", [("LayerNorm", kn.GroupNorm1),
                                      ("InstanceNorm", kn.InstanceGroupNorm)])
def test_old_norm_names_import_with_a_deprecation_warning(module, old, new):
    with pytest.warns(DeprecationWarning, match=rf"kalmannorm.{old} is deprecated.*"
                      rf"kalmannorm.{new.__name__}") as record:
        assert getattr(module, old) is new
    assert record[0].filename == __file__  # points at the caller
    assert old not in kn.__all__ and old not in norms.__all__


def test_from_import_of_an_old_name_warns():
    with pytest.warns(DeprecationWarning, match="GroupNorm1"):
        from kalmannorm import LayerNorm  # noqa: F401


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'kalmannorm' has no attribute 'Nope'"):
        kn.Nope
    with pytest.raises(AttributeError, match="module 'kalmannorm.norms' has no attribute 'Nope'"):
        norms.Nope
    assert not hasattr(kn, "InstanceNorm2d")


def test_guard_counts_is_a_deprecated_alias_of_guard_report():
    model = kn.convert_batchnorm(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
        micro_batch=2)
    model(torch.randn(4, 3, 8, 8))
    report = kn.guard_report(model)
    # the second layer had a prior, accepted by each of the 2 groups (one decision per group)
    assert report == {"fallbacks": 0, "priors": 2}
    with pytest.warns(DeprecationWarning, match=r"use kalmannorm.guard_report\(model\)") as rec:
        assert kn.guard_counts(model) == report
    assert rec[0].filename == __file__
    assert "guard_counts" not in kn.__all__


def test_norm_registry_is_a_literal_dict_of_its_names():
    # Every built-in name is greppable: a key of the literal dict _NORM_MAP in norms.py.
    tree = ast.parse(Path(norms.__file__).read_text())
    literal = next(node.value for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                   and getattr(node.target, "id", None) == "_NORM_MAP")
    assert isinstance(literal, ast.Dict)
    keys = [ast.literal_eval(k) for k in literal.keys]
    assert len(set(keys)) == len(keys)
    assert set(keys) <= set(kn.norm_names())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kn.get_norm_layer("layernorm") is kn.GroupNorm1
        assert kn.get_norm_layer("instancenorm") is kn.InstanceGroupNorm
