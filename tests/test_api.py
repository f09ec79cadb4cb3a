"""The public API: every exported name resolves, and nothing else is exported."""

import pytest

import tvlens


@pytest.mark.parametrize("name", [n for n in tvlens.__all__ if n != "__version__"])
def test_export_resolves(name):
    """Each export is the very object its module defines, and that module says it exports it."""
    import importlib

    module = importlib.import_module(f"tvlens.{tvlens._EXPORTS[name]}")
    assert getattr(tvlens, name) is getattr(module, name)
    assert name in getattr(module, "__all__", ()), f"tvlens.{tvlens._EXPORTS[name]}.__all__ does not list {name}"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        tvlens.not_a_function


def test_type_checkers_see_every_export():
    """The TYPE_CHECKING block imports exactly the exported names, from the modules the table names."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(tvlens.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {(a.asname or a.name, node.module) for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert seen == {(name, module) for name, module in tvlens._EXPORTS.items()}


def test_every_table_comes_from_records():
    """A result that reads as a table gives it one way: ``records()`` (plain dicts, one per row), of which
    ``to_frame()`` is the DataFrame (``tvlens.results.Tabular``); a ``to_frame`` of its own is only for a
    table with options (``Comparison.to_frame(by=...)``)."""
    import importlib
    import inspect
    import pkgutil

    from tvlens.results import Tabular

    classes = set()
    for info in pkgutil.walk_packages(tvlens.__path__, "tvlens."):
        if ".organisms." in info.name or info.name.endswith("__main__"):
            continue  # training scripts and entry points hold no results
        mod = importlib.import_module(info.name)
        classes |= {c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == info.name}
    framed = [c for c in classes if callable(getattr(c, "to_frame", None))]
    # (the bases: Tabular itself and the private ones results share)
    plain = [c for c in framed if list(inspect.signature(c.to_frame).parameters) == ["self"]
             and c is not Tabular and not c.__name__.startswith("_")]
    odd = sorted(c.__name__ for c in plain
                 if not issubclass(c, Tabular) or getattr(c, "records", Tabular.records) is Tabular.records)
    assert len(plain) >= 20 and not odd, odd
