"""The ``tvlens`` command: every subcommand on tiny models, --help, bad arguments, the report page.

Commands are run in-process through ``tvlens.cli.main(argv)`` (fast: imports and the tiny
checkpoints are shared); one subprocess test runs ``python -m tvlens`` for real.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tvlens.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("tasks", "info", "taskness", "lens", "sweep", "fv", "patch", "select", "report")
SMALL = ["--n-prompts", "4", "--no-png"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def written_files(out: str) -> list[Path]:
    """The files named by the final ``wrote N file(s) to DIR/: a, b`` line, which must be the last line."""
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"wrote (\d+) file\(s\) to (.+)/: (.+)", last)
    assert m, f"last line does not say where files were written: {last!r}"
    folder = Path(m.group(2))
    names = m.group(3).split(", ")
    assert int(m.group(1)) == len(names)
    return [folder / n for n in names]


def assert_written(out: str, *expected: str) -> list[Path]:
    files = written_files(out)
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f"{f} was announced but not written"
    names = {f.name for f in files}
    for e in expected:
        assert e in names, f"{e} not among the written files {sorted(names)}"
    return files


def assert_usage_error(code: int, out: str, err: str, *, mentions: str | None = None) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    # progress lines ("loading model ...") may precede the error, the error itself is one line
    assert lines and lines[-1].startswith("tvlens: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    if mentions is not None:
        assert mentions in lines[-1], lines[-1]


# ----------------------------------------------------------------------------------------------
# help


def test_main_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in COMMANDS:
        assert cmd in out
    assert "examples:" in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_subcommand_help_has_an_example(capsys, cmd):
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0
    assert "example:" in out and f"tvlens {cmd}" in out
    assert "--tasks" in out
    if cmd not in ("tasks",):
        assert "--model" in out and "--device" in out and "--seed" in out
    if cmd not in ("tasks", "info"):
        assert "--out" in out and "--n-prompts" in out


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "COMMAND" in out


def test_version(capsys):
    import tvlens

    code, out, _ = run(capsys, "--version")
    assert code == 0 and tvlens.__version__ in out


# ----------------------------------------------------------------------------------------------
# every subcommand on a tiny model


def test_tasks_lists_family_size_instruction(capsys):
    from tvlens.tasks import load_task

    code, out, _ = run(capsys, "tasks", "--tasks", "family:knowledge")
    assert code == 0
    t = load_task("country_capital")
    row = next(line for line in out.splitlines() if line.startswith("country_capital "))
    assert "knowledge" in row and str(len(t.pairs)) in row and t.instruction in row
    assert "antonym" not in out


def test_info_shows_shape_and_accuracy(capsys, tiny_dirs):
    code, out, _ = run(capsys, "info", "--model", tiny_dirs["llama"], "--tasks", "country_capital", "--n-prompts", "4")
    assert code == 0
    assert re.search(r"n_layers: 2\b", out) and re.search(r"n_kv_heads: 2\b", out)
    assert re.search(r"country_capital\s+\d\.\d\d\s+\d\.\d\d", out)


def test_taskness_writes_heatmap_and_scores(capsys, tiny_dirs, tmp_path):
    out_dir = tmp_path / "figs"
    code, out, _ = run(capsys, "taskness", "--model", tiny_dirs["gpt2"], "--tasks", "country_capital,antonym",
                       "--n-prompts", "4", "--out", out_dir)
    assert code == 0
    files = assert_written(out, "taskness.html", "taskness.safetensors", "taskness.json")
    assert all(f.parent == out_dir for f in files)
    assert re.search(r"L\dH\d\s+\d", out)  # top heads printed
    from tvlens.analyses.taskness import Taskness

    rho = Taskness.load(out_dir / "taskness")
    assert tuple(rho.scores.shape) == (2, 4)


def test_taskness_png(capsys, tiny_dirs, tmp_path):
    pytest.importorskip("kaleido")
    code, out, _ = run(capsys, "taskness", "--model", tiny_dirs["gpt2"], "--tasks", "country_capital,antonym",
                       "--n-prompts", "4", "--out", tmp_path)
    assert code == 0
    png = tmp_path / "taskness.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lens_writes_summary_page(capsys, tiny_dirs, tmp_path):
    code, out, _ = run(capsys, "lens", "--model", tiny_dirs["llama"], "--tasks", "country_capital,antonym", *SMALL,
                       "--out", tmp_path, "--top-k", "3")
    assert code == 0
    (page,) = assert_written(out, "logit_lens.html")
    text = page.read_text()
    assert "country_capital" in text and "antonym" in text
    assert "| country_capital |" in out  # the summary table


def test_sweep_writes_curve_and_result(capsys, tiny_dirs, tmp_path):
    code, out, _ = run(capsys, "sweep", "--model", tiny_dirs["gpt2"], "--tasks", "country_capital,next_letter", *SMALL,
                       "--out", tmp_path)
    assert code == 0
    assert_written(out, "task_vector_sweep.html", "task_vector_sweep.safetensors")
    from tvlens.vectors.activation import SweepResult

    sweep = SweepResult.load(tmp_path / "task_vector_sweep")
    assert sweep.tasks == ("country_capital", "next_letter")
    assert "zero-shot" in out and "ICL" in out


def test_fv_writes_cie_map_and_vector(capsys, tiny_dirs, tmp_path):
    code, out, _ = run(capsys, "fv", "--model", tiny_dirs["llama"], "--tasks", "antonym", "--k", "3", "--n-shots", "3",
                       "--layer", "1", *SMALL, "--out", tmp_path)
    assert code == 0
    assert_written(out, "function_vector_antonym.html", "function_vector_antonym.safetensors")
    assert "added at layer 1" in out


@pytest.mark.parametrize("source,target,positions", [("means", "zero-shot", "final"), ("icl", "shuffled", "final")])
def test_patch_writes_head_map(capsys, tiny_dirs, tmp_path, source, target, positions):
    code, out, _ = run(capsys, "patch", "--model", tiny_dirs["llama"], "--tasks", "antonym", "--source", source,
                       "--target", target, "--positions", positions, *SMALL, "--out", tmp_path)
    assert code == 0
    assert_written(out, "patch_heads_antonym.html")
    assert "antonym: unpatched logprob" in out


def test_select_writes_comparison_and_selections(capsys, tiny_dirs, tmp_path):
    code, out, _ = run(capsys, "select", "--model", tiny_dirs["gpt2"], "--tasks", "country_capital,antonym",
                       "--methods", "zero_shot,rho_topk,reinforce,soft,random_k", "--per", "all",
                       "--steps", "2", "--samples", "4", "--k", "2", *SMALL, "--out", tmp_path)
    assert code == 0
    assert_written(out, "selection.html", "selection_reinforce_all.safetensors", "selection_soft_all.safetensors")
    assert "REINFORCE" in out and "zero-shot" in out


def test_report_has_every_section_and_embeds_plotly_once(capsys, tiny_dirs, tmp_path):
    out_dir = tmp_path / "report"
    code, out, err = run(capsys, "report", "--model", tiny_dirs["llama"], "--tasks", "country_capital,antonym,next_letter",
                         *SMALL, "--out", out_dir)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("report: ") and str(out_dir / "report.html") in last
    page = (out_dir / "report.html").read_text()
    for section in ("taskness", "lens", "sweep", "patch"):
        assert f"<section id='{section}'>" in page
    # plotly.js once, as a file beside the page, nothing fetched from the network; every link resolves
    from plotly.offline import get_plotlyjs

    assert page.count("src='plotly.min.js'") == 1 and "cdn.plot.ly" not in page and len(page) < 2_000_000
    assert (out_dir / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    assert page.count("Plotly.newPlot") >= 4  # one interactive figure per section at least
    for name in ("taskness.html", "logit_lens.html", "logit_lens_answer.html", "task_vector_sweep.html", "patch_heads.html"):
        assert (out_dir / name).is_file(), name
        assert 'plotly.min.js' in (out_dir / name).read_text() and (out_dir / name).stat().st_size < 2_000_000, name
    for link in re.findall(r"href='([^'#]+)'", page):
        assert (out_dir / link).is_file(), f"report.html links to {link}, which was not written"
    # the summaries carry numbers
    assert re.search(r"Top heads: L\dH\d \d", page)
    assert re.search(r"Best layer L\d", page)
    assert "Regenerate with <code>tvlens report --model " in page


def test_report_sections_subset(capsys, tiny_dirs, tmp_path):
    code, out, err = run(capsys, "report", "--model", tiny_dirs["gpt2"], "--tasks", "country_capital",
                         "--sections", "lens,patch", *SMALL, "--out", tmp_path)
    assert code == 0, err
    page = (tmp_path / "report.html").read_text()
    assert "<section id='lens'>" in page and "<section id='patch'>" in page
    assert "<section id='taskness'>" not in page


def test_build_report_api(tiny_gpt2, tmp_path):
    from tvlens.report import build_report

    report = build_report(tiny_gpt2, ["country_capital", "antonym"], tmp_path, n_prompts=4, sections=["taskness", "patch"],
                          png=False, progress=False)
    assert report.path == tmp_path / "report.html" and report.path.is_file()
    assert [s.key for s in report.sections] == ["taskness", "patch"]
    assert all(p.is_file() for p in report.files)
    assert "Taskness" in report.text()
    assert report["patch"].table[0][0] == "task"


# ----------------------------------------------------------------------------------------------
# bad arguments: one line, exit 2, no traceback, nothing written


def test_unknown_task(capsys, tmp_path):
    out_dir = tmp_path / "never"
    code, out, err = run(capsys, "taskness", "--tasks", "capitol,antonym", "--out", out_dir)
    assert_usage_error(code, out, err, mentions="capitol")
    assert "country_capital" in err  # the suggestion
    assert not out_dir.exists()


def test_unknown_family(capsys):
    code, out, err = run(capsys, "tasks", "--tasks", "family:nope")
    assert_usage_error(code, out, err, mentions="nope")


def test_bad_layer(capsys, tiny_dirs, tmp_path):
    out_dir = tmp_path / "never"
    code, out, err = run(capsys, "fv", "--model", tiny_dirs["gpt2"], "--tasks", "antonym", "--layer", "7", "--out", out_dir)
    assert_usage_error(code, out, err, mentions="7")
    assert not out_dir.exists()


def test_unwritable_out_before_loading(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # the model does not even exist: --out is checked first
    code, out, err = run(capsys, "taskness", "--model", tmp_path / "no_such_model", "--out", blocker / "sub")
    assert_usage_error(code, out, err, mentions="a_file")
    assert "loading model" not in err
    code, out, err = run(capsys, "report", "--out", blocker)
    assert_usage_error(code, out, err, mentions="a_file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_out(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out, err = run(capsys, "taskness", "--out", ro / "figs")
        assert_usage_error(code, out, err, mentions="not writable")
    finally:
        ro.chmod(0o700)


def test_unknown_model(capsys, tmp_path):
    code, out, err = run(capsys, "info", "--model", tmp_path / "missing_checkpoint")
    assert_usage_error(code, out, err, mentions="missing_checkpoint")
    code, out, err = run(capsys, "taskness", "--model", "./nope/", "--out", tmp_path / "never")
    assert_usage_error(code, out, err)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "argv,mentions",
    [
        (["taskness", "--n-prompts", "0"], "--n-prompts"),
        (["taskness", "--n-prompts", "many"], "--n-prompts"),
        (["patch", "--positions", "middle"], "--positions"),
        (["frobnicate"], "frobnicate"),
        (["taskness", "--bogus"], "--bogus"),
        (["report", "--sections", "taskness,bogus"], "bogus"),
        (["taskness", "--tasks", "antonym"], "at least 2"),
        (["lens", "--task-words", ","], "--task-words"),
    ],
)
def test_bad_arguments(capsys, tmp_path, argv, mentions):
    out_dir = tmp_path / "never"
    code, out, err = run(capsys, *argv, *(["--out", out_dir] if argv[0] in ("taskness", "report", "lens") else []))
    assert_usage_error(code, out, err, mentions=mentions)
    assert not out_dir.exists()


def test_parser_defaults_are_small():
    parser = build_parser()
    args = parser.parse_args(["report"])
    from tvlens.report import DEFAULT_TASKS

    assert args.model == "organism" and args.out == "figures" and args.seed == 0
    assert args.tasks.split(",") == list(DEFAULT_TASKS)
    assert parser.parse_args(["fv"]).tasks == "country_capital"


# ----------------------------------------------------------------------------------------------
# the real command


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_subprocess_smoke(tiny_dirs, tmp_path):
    out_dir = tmp_path / "figs"
    proc = subprocess.run(
        [sys.executable, "-m", "tvlens", "taskness", "--model", str(tiny_dirs["gpt2"]), "--tasks", "antonym,past_tense",
         "--n-prompts", "4", "--no-png", "--out", str(out_dir)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert_written(proc.stdout, "taskness.html")

    bad = subprocess.run([sys.executable, "-m", "tvlens", "taskness", "--tasks", "capitol", "--out", str(out_dir)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("tvlens: error: ")
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------
# before the model loads: --help, and one bad argument per subcommand

#: one argument per subcommand that is wrong only in a way the model's config, tokenizer or the task
#: suite shows — each must exit 2 without loading the model
BAD_BEFORE_LOADING = {
    "tasks": (["--tasks", "capitol"], "capitol"),
    "info": (["--tasks", "antonym", "--n-shots", "100"], "n_shots"),
    "taskness": (["--tasks", "antonym"], "at least 2"),
    "lens": (["--position", "99"], "--position 99"),
    "sweep": (["--n-shots", "100"], "n_shots"),
    "fv": (["--layer", "99"], "--layer 99"),
    "patch": (["--target", "shuffled", "--n-shots", "100"], "n_shots"),
    "select": (["--k", "100"], "--k 100"),
    "report": (["--sections", "taskness,bogus"], "bogus"),
}


def _subcommands() -> list[str]:
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.fixture
def no_model_loading(monkeypatch):
    import tvlens.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(tvlens.models, "load_model", refuse)


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_subcommand_help_and_a_bad_argument_exit_before_loading(capsys, tmp_path, cmd, no_model_loading):
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0 and f"tvlens {cmd}" in out
    argv, mentions = BAD_BEFORE_LOADING.get(cmd, (["--no-such-option"], "--no-such-option"))
    if cmd == "weights":  # its positional experiment comes first
        argv, mentions = ["no_such_experiment"], "no_such_experiment"
    out_dir = tmp_path / "never"
    extra = ["--out", str(out_dir)] if "--out" in run(capsys, cmd, "--help")[1] else []
    code, out, err = run(capsys, cmd, *argv, *extra)
    assert_usage_error(code, out, err, mentions=mentions)
    assert "loading model" not in err
    assert not out_dir.exists()


def test_fv_k_larger_than_the_model_before_loading(capsys, no_model_loading):
    code, out, err = run(capsys, "fv", "--k", "100")
    assert_usage_error(code, out, err, mentions="--k 100")
    assert "32" in err  # the organism's 4 layers x 8 heads


def test_an_error_after_a_progress_bar_starts_its_own_line(capsys, monkeypatch):
    import tvlens.cli as cli
    from tqdm import tqdm

    def failing(args):
        bar = tqdm(total=10, desc="head_means", file=sys.stderr, mininterval=0)
        bar.update(3)  # left open, as an exception inside a library loop leaves it
        raise ValueError("n_shots=100 is too many")

    monkeypatch.setitem(cli._HANDLERS, "tasks", failing)
    code, out, err = run(capsys, "tasks")
    assert code == 2
    last = err.rstrip("\n").split("\n")[-1]
    assert last == "tvlens: error: n_shots=100 is too many", repr(err[-200:])


def test_closed_pipe_is_quiet(tmp_path):
    # `true` exits without reading, so tvlens writes into a pipe already closed (as `| head` does with long output)
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m tvlens tasks | true; echo ${{PIPESTATUS[0]}}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, env=_env(), timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "0"
