"""benchmarks/bench_peers.py --quick on the organism: every nnsight / pyvene way agrees with tvlens.

Runs only where the benchmark extra (``pip install -e ".[bench]"``) is installed; CI installs
``.[dev]`` only, so there it is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

MISSING = [name for name in ("nnsight", "pyvene") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"benchmark extra not installed ({', '.join(MISSING)}): "
                                                      'pip install -e ".[bench]"')

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


def test_quick_organism_all_ways_agree():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = bench  # nnsight reads each trace's source back from the module's file
    spec.loader.exec_module(bench)
    [(case, ways)] = bench.main(["--quick", "--cases", "organism"])
    assert case.name == "organism"
    sweeps = {w.sweep for w in ways}
    assert sweeps == set(bench.SWEEPS.values())
    for sweep in sweeps:
        group = [w for w in ways if w.sweep == sweep]
        assert group[0].name.startswith("tvlens") and group[0].diff is None
        assert {w.name.split(":")[0] for w in group[1:]} == {"nnsight", "pyvene"}
        for w in group[1:]:  # main() already exits on a mismatch; say which way it was here
            assert w.diff is not None and w.diff <= bench.TOL, (sweep, w.name, w.diff)
            assert w.wall > 0 and w.peak >= 0
