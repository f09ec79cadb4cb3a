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


#: parameters of the shared names that mean something else, each with the reason its function gives
_OTHER_MEANINGS = {
    ("finetune", "batch_size"): "the training minibatch (examples per AdamW step)",
    ("finetune", "n_prompts"): "the training examples per task",
    ("soft_select", "batch_size"): "the training minibatch (None: every prompt each step)",
    ("soft_select", "n_prompts"): "the zero-shot prompts the weights are trained on",
    
    ("reinforce_select", "n_prompts"): "the zero-shot prompts each REINFORCE step scores",
    ("icl_prompts", "n_prompts"): "None: one prompt per query of the split",
    ("multimodal_prompts", "n_prompts"): "None: one prompt per query of the split, as icl_prompts",
    ("evaluate_heads", "n_prompts"): "None: every test query",
    ("Selection.evaluate", "n_prompts"): "None: every test query",
    ("compare_selections", "n_prompts"): "None: every test query",
    ("build_report", "n_prompts"): "None: each section's own count (tvlens.report.DEFAULT_N_PROMPTS)",
}


def _public_callables():
    """Every public function and public method of a public class in the analyses' modules (the
    engine, runs and organisms take what the analyses resolved)."""
    import importlib
    import inspect
    import pkgutil

    out = {}
    for info in pkgutil.walk_packages(tvlens.__path__, "tvlens."):
        if any(part in info.name for part in (".organisms", ".engine", ".runs", "__main__", ".cli")):
            continue
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                out[name] = obj
            elif inspect.isclass(obj):
                out.update({f"{name}.{m}": f for m, f in vars(obj).items()
                            if inspect.isfunction(f) and not m.startswith("_")})
    return out


def test_one_vocabulary_of_shared_parameters():
    """positions, n_prompts, batch_size and progress: one default each wherever they are taken
    (tvlens.vocabulary), and every exception is listed above with what it means there instead."""
    import inspect

    from tvlens import vocabulary as V

    want = {"positions": V.FINAL, "position": V.FINAL, "n_prompts": V.N_PROMPTS, "batch_size": V.BATCH_SIZE,
            "progress": V.PROGRESS}
    seen, odd, excused = 0, [], set()
    for name, fn in _public_callables().items():
        for p in inspect.signature(fn).parameters.values():
            if p.name not in want or p.default is inspect.Parameter.empty:
                continue
            seen += 1
            if (name, p.name) in _OTHER_MEANINGS:
                excused.add((name, p.name))
            elif p.default != want[p.name]:
                odd.append(f"{name}({p.name}={p.default!r})")
    assert seen >= 60 and not odd, odd
    assert excused == set(_OTHER_MEANINGS), f"listed but not found: {sorted(set(_OTHER_MEANINGS) - excused)}"


def test_the_last_position_has_one_name(tiny_llama, tmp_path):
    """Every word for the last position is read as "final", and results name it so (a file written
    with the old word loads with the new one)."""
    import json

    from tvlens.vocabulary import FINAL, final_alias

    assert [final_alias(w) for w in ("final", "separator", "LAST", "all", 3)] == [FINAL, FINAL, FINAL, "all", 3]
    stats = tvlens.head_means(tiny_llama, ["country_capital"], n_prompts=2, n_shots=1, positions="separator",
                              progress=False)
    assert stats.positions == FINAL
    lens = tvlens.logit_lens(tiny_llama, "country_capital", n_prompts=2, n_shots=1, position="last")
    assert lens.position == FINAL
    path = stats.save(tmp_path / "stats")
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "positions": "separator"}))  # as files written before "final"
    assert tvlens.HeadStats.load(path).positions == FINAL


def test_every_result_carries_one_meta_type():
    """Every result's ``meta`` is a ResultMeta (typed so, and so by default where it has one)."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    from tvlens.results import ResultMeta

    found, odd = 0, []
    for info in pkgutil.walk_packages(tvlens.__path__, "tvlens."):
        if ".organisms." in info.name or info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for c in vars(mod).values():
            if not (inspect.isclass(c) and c.__module__ == info.name and dataclasses.is_dataclass(c)):
                continue
            meta = {f.name: f for f in dataclasses.fields(c)}.get("meta")
            if meta is None:
                continue
            found += 1
            typed = meta.type in ("ResultMeta", ResultMeta)
            default = meta.default_factory if meta.default_factory is not dataclasses.MISSING else None
            if not typed or (meta.default is not dataclasses.MISSING) or default not in (None, ResultMeta):
                odd.append(c.__name__)
    assert found >= 25 and not odd, odd


def test_a_parameter_names_one_role():
    """The model comes in as ``model`` (or the statistics computed from it, where a function takes
    either) and prompts as ``task`` / ``tasks`` (a name, a Task, or a ready batch), never under a
    name that lists alternatives (``prompts_or_task``, ``model_or_stats``). ``load_model``'s
    ``name_or_path`` is Hugging Face's word for what it takes."""
    import inspect

    odd = [f"{name}({p})" for name, fn in _public_callables().items()
           for p in inspect.signature(fn).parameters if "_or_" in p and (name, p) != ("load_model", "name_or_path")]
    assert not odd, odd


def _saved_examples():
    import torch

    from tvlens.analyses.attention import AttentionPatterns
    from tvlens.analyses.selection import Comparison, Selection
    from tvlens.analyses.taskness import Taskness, TasknessValidation
    from tvlens.analyses.visual import PairSelection, TopkCurve, VisualTaskness
    from tvlens.results import ResultMeta
    from tvlens.vectors.weights import WeightGeometry

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    p = r(2, 3).sigmoid()
    meta = ResultMeta(model="m", config_hash="abc", tasks=("a", "b"), seed=3, extra={"k": 2})
    return [
        TasknessValidation(ks=(1, 2), tasks=("a", "b"), top_acc=r(2, 2), random_acc=r(2, 2, 3), zero_shot=r(2), icl=r(2),
                           meta=meta),
        WeightGeometry(vectors=("a", "b"), groups=("embed", "0"), by="layer", norms=r(2, 2), cosines=r(2, 2, 2), meta=meta),
        TopkCurve(ks=(1, 4), tasks=("a", "mean"), values={kind: {"accuracy": r(2, 2), "exact": r(2, 2)}
                                                          for kind in ("top", "random", "wrong")},
                  base={"accuracy": r(2), "exact": r(2)}, icl_scores=None, meta=meta),
        PairSelection(method="reinforce", weights=r(2, 3, 4), probabilities=r(2, 3, 4).sigmoid(), curve=r(5),
                      evaluations=80, tasks=("a", "b"), seconds=1.5, meta=meta),
        AttentionPatterns(patterns=r(2, 3, 3).softmax(-1), heads=((0, 1), (1, 2)), tokens=("<bos>", "x", "→"), meta=meta),
        Comparison(tasks=("a", "b"), families=("f", "f"), methods=("zero_shot", "reinforce"), accuracy=r(2, 2),
                   random_std=r(2), n_selected=r(2, 2), k={"f": 3}, per="family", notes=("a note",), meta=meta,
                   selections={"reinforce": {"f": Selection(probabilities=p, mask=p > 0.5, rewards=r(4), method="reinforce",
                                                            meta=meta, tasks=("a", "b"), head_means=r(2, 2, 3, 5))}}),
        VisualTaskness(per_position=r(2, 3, 6), scores=r(2, 3), tasks=("a", "b"), layout_key="grid", rows=2, cell_side=3,
                       taskness=Taskness(r(2, 3), ("a", "b"), (0, 1), "all", r(2, 3), r(2, 3), r(2, 3) > 1, r(2, 3, 6),
                                         (-6, -5, -4, -3, -2, -1), meta=meta), meta=meta),
    ]


@pytest.mark.parametrize("result", _saved_examples(), ids=lambda r: type(r).__name__)
def test_results_save_and_load_back_every_field(result, tmp_path):
    """Results made of tensors and plain values save through one protocol (tvlens.results.Saved) and
    load back equal in every field, tuples as tuples, nested mappings of tensors as mappings; a file
    of another class is refused."""
    import dataclasses

    import torch

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if dataclasses.is_dataclass(a):
            return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
        return type(a) is type(b) and a == b

    cls = type(result)
    back = cls.load(result.save(tmp_path / "r"))
    diff = [f.name for f in dataclasses.fields(cls) if not same(getattr(result, f.name), getattr(back, f.name))]
    assert not diff, diff
    assert back.meta.to_dict() == result.meta.to_dict()
    other = next(type(x) for x in _saved_examples() if type(x) is not cls)
    with pytest.raises(ValueError, match=f"not a {other.__name__}"):
        other.load(tmp_path / "r")


def test_the_results_saved_above_read_as_tables_and_pages(tmp_path):
    """Each of them also gives its table (``records()``, checked against its own tensors) and, where it
    draws a figure, a standalone page (``to_html``)."""
    for result in _saved_examples():
        rows = result.records()
        assert rows and all(isinstance(r, dict) for r in rows), type(result).__name__
        name = type(result).__name__
        if name == "TasknessValidation":
            assert [r["top_acc"] for r in rows] == pytest.approx(result.top_acc.flatten().tolist())
            assert rows[3]["random_acc"] == pytest.approx(float(result.random_acc[1, 1].mean()))
        elif name == "AttentionPatterns":
            assert [r["weight"] for r in rows] == pytest.approx(result.patterns.flatten().tolist())
        elif name == "PairSelection":
            assert len(rows) == int(result.mask.sum())
        elif name == "Comparison":
            assert [r["accuracy"] for r in rows] == pytest.approx(result.accuracy.flatten().tolist())
        elif name == "TopkCurve":
            assert len(rows) == 3 * 2 * len(result.tasks) * len(result.ks)
            assert rows[5]["value"] == pytest.approx(float(result.values["top"]["exact"][0, 1]))
        if callable(getattr(result, "plot", None)) and callable(getattr(result, "to_html", None)):
            page = result.to_html(tmp_path / f"{name}.html")
            assert page.exists() and page.stat().st_size > 1000
    sel = _saved_examples()[5].selections["reinforce"]["f"]
    assert sum(r["selected"] for r in sel.records()) == int(sel.mask.sum())
    assert [r["probability"] for r in sel.records()] == pytest.approx(sel.probabilities.flatten().tolist())


#: results without some of the shared methods, and why
_METHODS_THAT_MAKE_NO_SENSE = {
    "Report": {"plot", "to_html", "save", "load", "to_frame"},  # it is the written page itself
    "FineTuned": {"save", "load"},  # it holds the fine-tuned model; its .vector saves
}


def test_every_result_has_the_same_methods():
    """plot, to_html, save, load and to_frame on every result dataclass (one with a ``meta``), but
    where listed above."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    seen, odd = set(), {}
    for info in pkgutil.walk_packages(tvlens.__path__, "tvlens."):
        if ".organisms." in info.name or info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for c in vars(mod).values():
            if not (inspect.isclass(c) and c.__module__ == info.name and dataclasses.is_dataclass(c)
                    and "meta" in {f.name for f in dataclasses.fields(c)}):
                continue
            seen.add(c.__name__)
            missing = {m for m in ("plot", "to_html", "save", "load", "to_frame") if not callable(getattr(c, m, None))}
            if missing != _METHODS_THAT_MAKE_NO_SENSE.get(c.__name__, set()):
                odd[c.__name__] = sorted(missing)
    assert len(seen) >= 25 and not odd, odd
