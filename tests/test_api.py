"""The public API: every exported name resolves, and nothing else is exported."""

import pytest

import tvlens


@pytest.mark.parametrize("name", [n for n in tvlens.__all__ if n != "__version__"])
def test_export_resolves(name):
    assert getattr(tvlens, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        tvlens.not_a_function
