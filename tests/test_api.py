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
