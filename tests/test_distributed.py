"""Beyond one process: executors (local, Ray), checkpoints with several writers, models split over devices.

The Ray tests start a local cluster on the loopback interface (``ray.init(num_cpus=2)``, no
dashboard) and shut it down afterwards; they are skipped where Ray is not installed. Every
executor-enabled analysis is compared with the single-process run on the shipped organism loaded
in float64, so that the comparison measures the decomposition and the merge (exact) rather than
the float32 rounding of differently shaped batches (~1e-6 on logits). The fault test kills a
worker by its process id in the middle of a sweep; it runs last, as it leaves one worker.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
import torch

import tvlens
from tvlens.runs import devices as D
from tvlens.runs.checkpoint import SweepCheckpoint
from tvlens.runs.executors import LocalExecutor, RayExecutor, Unit

try:
    import ray

    HAVE_RAY = True
except ImportError:  # the optional extra is not installed
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'tvlens[ray]')")

TASKS = ["antonym", "country_capital"]
ATOL = 1e-6


def _close(a, b, what, atol=ATOL):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    diff = (a - b).nan_to_num().abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"{what}: max difference {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def m64():
    return tvlens.load_model("organism", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def prompts(m64):
    return dict(
        zs=tvlens.icl_prompts(m64, "antonym", n_prompts=6, n_shots=0, seed=1),
        icl=tvlens.icl_prompts(m64, "antonym", n_prompts=6, n_shots=2, seed=1),
        shuf=tvlens.icl_prompts(m64, "antonym", n_prompts=6, n_shots=2, seed=1, shuffle_labels=True),
    )


# ----------------------------------------------------------------------------------------------
# checkpoints with several writers; the local executor


def test_checkpoint_takes_several_writers(m64, tmp_path):
    path = tmp_path / "ck.safetensors"
    cfg = {"what": "demo"}
    a = SweepCheckpoint(path, model=m64, config=cfg)
    b = SweepCheckpoint(path, model=m64, config=cfg)  # opened before a wrote anything
    a.record(0, torch.zeros(2), by="worker-a")
    b.record(1, torch.ones(2), by="worker-b")  # must keep a's unit 0
    a.record(2, torch.full((2,), 2.0), by="worker-a")  # must keep b's unit 1
    b.record(0, torch.full((2,), 9.0), by="worker-b")  # a unit both computed: stored once
    again = SweepCheckpoint(path, model=m64, config=cfg)
    assert sorted(again.done) == [0, 1, 2] and len(again) == 3
    assert again.by(1) == "worker-b" and again.by(2) == "worker-a"
    assert torch.equal(again[2]["value"], torch.full((2,), 2.0))
    assert a.refresh() == 0 and 1 in a  # a already folded b's unit in while writing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # no lock or temp file left


def test_local_split_equals_local_loop(m64, prompts):
    """The units and merges of a distributed run, in this process: the same numbers."""
    ex = LocalExecutor(split=True)
    for positions in ("separator", "all"):  # 3 blocks per task (24 prompts, batches of 8): Chan's merge
        a = tvlens.head_means(m64, TASKS, n_prompts=24, batch_size=8, positions=positions, include_output=True)
        b = tvlens.head_means(m64, TASKS, n_prompts=24, batch_size=8, positions=positions, include_output=True,
                              executor=ex)
        assert ex.last_run.units == 2 * 3 and b.tasks == a.tasks
        for k in ("z_mean", "z_var", "count", "out_mean", "out_var"):
            _close(getattr(a, k), getattr(b, k), f"{positions} {k}", atol=1e-12)
    assert a.meta["executor"] == {"name": "local", "workers": 1}
    r = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], positions="each", metric="logprob", progress=False)
    s = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], positions="each", metric="logprob", progress=False,
                           executor=ex)
    _close(r.values, s.values, "patch_heads each")
    _close(r.per_prompt, s.per_prompt, "patch_heads per prompt")


def test_a_unit_without_tensors_is_refused(m64):
    bad = Unit("x", _returns_number)
    with pytest.raises(TypeError, match="returns a tensor|returned"):
        LocalExecutor(split=True).run(m64, [bad], progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        LocalExecutor(split=True).run(m64, [Unit(1, _returns_tensor), Unit(1, _returns_tensor)], progress=False)


def _returns_number(model):
    return 3.0


def _returns_tensor(model):
    return torch.ones(1)


# ----------------------------------------------------------------------------------------------
# models split over devices (CPU-only here: a hand-written map over the CPU and the disk)


def test_device_map_errors_come_before_any_loading(monkeypatch):
    import tvlens.models as models_mod

    def must_not_load(*a, **k):
        raise AssertionError("load_model ran although the device map was wrong")

    monkeypatch.setattr(models_mod, "load_model", must_not_load)
    good = D.layer_map("organism", ["cpu", "cpu"])
    for bad, match in (({**good, "model.layers.1": "cuda:7"}, "does not exist here"),
                       ({**good, "model.layers.1": 7}, "does not exist here"),
                       ({**good, "model.layers.1": "meta"}, "holds no values"),
                       ({**good, "model.layerz.1": "cpu"}, "does not have"),
                       ("everywhere", "not a strategy")):
        with pytest.raises(ValueError, match=match) as err:
            D.load_model("organism", device_map=bad)
        assert ";" in str(err.value) or "use one of" in str(err.value)  # what was wrong; how to fix it
    with pytest.raises(ValueError, match="does not exist here"):
        D.load_model("organism", device_map="auto", max_memory={9: "1GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match="offload_folder"):
        D.load_model("organism", device_map=D.layer_map("organism", ["cpu", "disk"]))


def test_layer_map_puts_blocks_in_order():
    from transformers import GPT2Config

    m = D.layer_map("organism", ["cpu", "disk"])
    assert [m[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    assert m["model.embed_tokens"] == "cpu" and m["model.norm"] == "disk" and m["lm_head"] == "disk"
    g = D.layer_map(GPT2Config(n_layer=6), ["cpu", "disk"], weights=[2, 1])
    assert [g[f"transformer.h.{i}"] for i in range(6)] == ["cpu"] * 4 + ["disk"] * 2
    assert g["lm_head"] == g["transformer.wte"] == "cpu"  # tied to the embedding: kept with it
    assert g["transformer.ln_f"] == "disk"


def test_plan_for_a_70b_model_on_meta():
    """A 70 B Llama shape over 80 GB GPUs, planned on an empty model: whole layers, within budget."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000)
    plan = D.plan_device_map(cfg, {i: "60GiB" for i in range(4)}, dtype=torch.bfloat16)
    layers = [j for dev in plan.layers for j in plan.layers[dev]]
    assert sorted(layers) == list(range(80)) and layers == sorted(layers)  # each once, contiguous
    assert len(plan.layers) == 3 and all(b <= 60 * 2**30 for b in plan.weight_bytes.values())
    assert 125 * 2**30 < plan.total_bytes < 135 * 2**30  # ~69 B parameters in bf16


def test_every_analysis_is_unchanged_when_layers_live_apart(tmp_path):
    """Blocks 2-3 offloaded to disk (their weights are not in memory): the same numbers as one device.
    (The unembedding stays in memory: the model's fingerprint reads a sample of ``W_U``.)"""
    one = tvlens.load_model("organism", device="cpu")
    dm = {**D.layer_map("organism", ["cpu", "disk"]), "lm_head": "cpu"}
    split = D.load_model("organism", device_map=dm, offload_folder=tmp_path)
    assert tvlens.models.ModelInfo.of(split).config_hash == tvlens.models.ModelInfo.of(one).config_hash
    assert all(p.device.type == "meta" for p in split.blocks[3].parameters())  # really elsewhere
    assert all(p.device.type == "cpu" for p in split.blocks[0].parameters())
    assert [d.type for d in D.layer_devices(split)] == ["cpu"] * 4
    zs = tvlens.icl_prompts(one, "antonym", n_prompts=4, n_shots=0, seed=1)
    icl = tvlens.icl_prompts(one, "antonym", n_prompts=4, n_shots=2, seed=1)
    shuf = tvlens.icl_prompts(one, "antonym", n_prompts=4, n_shots=2, seed=1, shuffle_labels=True)
    st = [tvlens.head_means(m, TASKS, n_prompts=8, positions="all") for m in (one, split)]
    _close(st[0].z_mean, st[1].z_mean, "head_means")
    _close(tvlens.taskness(st[0]).scores, tvlens.taskness(st[1]).scores, "taskness", atol=1e-5)
    means = st[0].at_position(-1).select(["antonym"])
    a, b = (tvlens.patch_heads(m, zs, means, progress=False) for m in (one, split))
    _close(a.values, b.values, "patch_heads")
    a, b = (tvlens.patch_positions(m, shuf, icl, progress=False) for m in (one, split))
    _close(a.values, b.values, "patch_positions")
    a, b = (tvlens.layer_sweep(m, ["antonym"], n_prompts=4, n_shots=2) for m in (one, split))
    _close(a.logprob, b.logprob, "layer_sweep")
    # function vectors read W_O itself, which must be in memory: a map over the CPU alone
    mapped = D.load_model("organism", device_map=D.layer_map("organism", ["cpu", "cpu"]))
    a, b = (tvlens.function_vector(m, "antonym", n_prompts=6, n_cie_prompts=3, n_shots=2) for m in (one, mapped))
    _close(a.vector, b.vector, "function_vector")
    assert mapped._tvlens_load["device_map"]["model.layers.3"] == "cpu"  # what Ray workers would load


# ----------------------------------------------------------------------------------------------
# Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
def test_no_reachable_cluster_fails_before_work(m64, prompts, tmp_path):
    ex = RayExecutor(2, address=f"127.0.0.1:{_free_port()}")  # nothing listens there
    path = tmp_path / "sweep.safetensors"
    with pytest.raises(ConnectionError, match="no Ray cluster is reachable") as err:
        tvlens.patch_heads(m64, prompts["zs"], prompts["zs"], progress=False, executor=ex, checkpoint=path)
    assert "ray start --head" in str(err.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not host:port"):
        RayExecutor(address="nowhere").prepare(m64)


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'tvlens[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@needs_ray
def test_workers_that_cannot_load_fail_before_work(cluster, m64, prompts, tmp_path):
    path = tmp_path / "sweep.safetensors"
    with pytest.raises(ValueError, match="free CPUs"):  # more workers than the cluster has room for
        RayExecutor(3).prepare(m64)
    ex = RayExecutor(1, cpus_per_worker=0, load={"name_or_path": str(tmp_path / "no-such-checkpoint")})
    with pytest.raises(RuntimeError, match="could not load the model") as err:
        tvlens.layer_sweep(m64, TASKS, n_prompts=2, n_shots=1, executor=ex, checkpoint=path)
    assert "no-such-checkpoint" in str(err.value) and "load=dict" in str(err.value)
    assert not path.exists() and ex.worker_pids == []


@pytest.fixture(scope="module")
def pool(cluster, m64):
    ex = RayExecutor(2, max_restarts=0)
    ex.prepare(m64)
    yield ex
    ex.close()


@needs_ray
def test_ray_head_means_and_taskness(pool, m64):
    a = tvlens.head_means(m64, TASKS, n_prompts=40, batch_size=8, positions="all")
    b = tvlens.head_means(m64, TASKS, n_prompts=40, batch_size=8, positions="all", executor=pool)
    for k in ("z_mean", "z_var", "count"):
        _close(getattr(a, k), getattr(b, k), f"head_means {k}")
    assert b.meta["executor"] == {"name": "ray", "workers": 2}
    assert len(pool.last_run.per_worker) == 2  # both workers took units
    ra, rb = tvlens.taskness(m64, TASKS, n_prompts=12), tvlens.taskness(m64, TASKS, n_prompts=12, executor=pool)
    _close(ra.scores, rb.scores, "taskness")
    assert rb.meta["executor"]["name"] == "ray"


@needs_ray
def test_ray_patching(pool, m64, prompts, capsys):
    means = tvlens.head_means(m64, TASKS, n_prompts=8).select(["antonym"])
    for target, source, kw in ((prompts["zs"], means, dict(positions="final")),
                               (prompts["shuf"], prompts["icl"], dict(positions="each", normalize=True)),
                               (prompts["shuf"], prompts["icl"], dict(positions="all", layers=[1, 3], heads=[0, 5]))):
        a = tvlens.patch_heads(m64, target, source, metric="logprob", progress=False, **kw)
        b = tvlens.patch_heads(m64, target, source, metric="logprob", progress=True, executor=pool, **kw)
        _close(a.values, b.values, f"patch_heads {kw}")
        _close(a.per_prompt, b.per_prompt, f"patch_heads per prompt {kw}")
        assert a.target_value == pytest.approx(b.target_value, abs=ATOL) and b.meta["executor"]["workers"] == 2
    bar = capsys.readouterr().err
    assert "[ray x2]" in bar and "4/4" in bar  # one bar over the units of both workers
    a = tvlens.patch_positions(m64, prompts["shuf"], prompts["icl"], progress=False)
    b = tvlens.patch_positions(m64, prompts["shuf"], prompts["icl"], progress=False, executor=pool)
    _close(a.values, b.values, "patch_positions")


@needs_ray
def test_ray_vectors_and_selection(pool, m64):
    a = tvlens.layer_sweep(m64, TASKS, n_prompts=4, n_shots=2, center=True)
    b = tvlens.layer_sweep(m64, TASKS, n_prompts=4, n_shots=2, center=True, executor=pool)
    for k in ("accuracy", "zero_shot", "icl", "vectors", "logprob", "zero_shot_logprob", "icl_logprob", "n_eval"):
        _close(getattr(a, k), getattr(b, k), f"layer_sweep {k}")
    assert b.meta.extra["executor"] == {"name": "ray", "workers": 2}
    a = tvlens.function_vector(m64, "antonym", n_prompts=8, n_cie_prompts=4, n_shots=2)
    b = tvlens.function_vector(m64, "antonym", n_prompts=8, n_cie_prompts=4, n_shots=2, executor=pool)
    _close(a.vector, b.vector, "function_vector")
    _close(a.cie, b.cie, "CIE")
    assert a.top_heads == b.top_heads
    from tvlens.analyses.selection import select_restarts

    kw = dict(n_restarts=2, steps=2, samples_per_step=4, n_prompts=3, n_mean_prompts=4, n_shots=2, patience=None,
              progress=False)
    a, b = select_restarts(m64, TASKS, **kw), select_restarts(m64, TASKS, executor=pool, **kw)
    _close(a.probabilities, b.probabilities, "restarts")
    ra, rb = a.meta.extra["restarts"], b.meta.extra["restarts"]
    assert [r["seed"] for r in ra] == [r["seed"] for r in rb] == [0, 1]
    _close([r["final_reward"] for r in ra], [r["final_reward"] for r in rb], "restart rewards")
    assert b.meta.extra["executor"]["name"] == "ray"


@needs_ray
def test_ray_resumes_from_checkpoint(pool, m64, prompts, tmp_path):
    path = tmp_path / "sweep.safetensors"
    full = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], metric="prob", progress=False)
    seen = []

    def stop_after_two(key, who):
        seen.append(key)
        if len(seen) == 2:
            raise KeyboardInterrupt("driver stopped")

    pool.on_result = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], metric="prob", progress=False, executor=pool,
                               checkpoint=path)
    finally:
        pool.on_result = None
    resumed = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], metric="prob", progress=False, executor=pool,
                                 checkpoint=path)
    rep = pool.last_run
    assert rep.from_checkpoint == 2 and rep.computed == 2, rep  # the finished layers were not recomputed
    _close(full.values, resumed.values, "resumed")
    with pytest.raises(ValueError, match="different configuration"):
        tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], metric="logprob", progress=False, executor=pool,
                           checkpoint=path)


@needs_ray
def test_worker_killed_mid_sweep(pool, m64, prompts, tmp_path):
    """SIGKILL one worker while it holds units: the other finishes them; every unit merged once."""
    path = tmp_path / "sweep.safetensors"
    full = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], positions="each", metric="logprob", progress=False)
    killed = []

    def kill_the_other(key, who):
        if not killed:
            pid = next(p for p in pool.worker_pids if not who.endswith(f":{p}"))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    pool.on_result = kill_the_other
    try:
        got = tvlens.patch_heads(m64, prompts["shuf"], prompts["icl"], positions="each", metric="logprob",
                                 progress=False, executor=pool, checkpoint=path)
    finally:
        pool.on_result = None
    rep = pool.last_run
    assert killed and rep.worker_deaths == 1 and rep.resubmitted, rep
    assert rep.computed == rep.units == 4 and sum(rep.per_worker.values()) == 4, rep  # no unit twice, none lost
    _close(full.values, got.values, "after the kill")
    import json

    from tvlens.runs.checkpoint import _read_header

    units = json.loads(_read_header(path)["__metadata__"]["tvlens"])["units"]
    keys = [tuple(u["unit"][1:]) for u in units]
    assert sorted(keys) == [(0,), (1,), (2,), (3,)]  # every layer on file exactly once
    assert all(u["by"].startswith("ray:") for u in units)
    assert killed[0] not in pool.worker_pids
