"""The ``tvlens`` command: argument parsing -> public API -> files.

Every subcommand parses its arguments, checks what can be checked before any work (the output
folder is writable, the tasks exist, the model loads, the layer is in range), calls the public
API, writes figures with :func:`tvlens.plot.save_figure`, and ends with one line saying where
the files are. Nothing here computes anything the library does not expose.

Bad arguments give one line ``tvlens: error: ...`` on stderr and exit code 2, never a
traceback (set ``TVLENS_DEBUG=1`` to see one). ``main(argv)`` returns the exit code, so it can
be called in-process: ``tvlens.cli.main(["taskness", "--tasks", "family:knowledge"])``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .vocabulary import FINAL, FINAL_POSITION

__all__ = ["main", "build_parser", "CliError", "DEFAULT_TASKS"]

#: Default task sets per command: small, one or two per family, sharing input domains so the
#: query alone does not reveal the task (the report's set is ``tvlens.report.DEFAULT_TASKS``).
DEFAULT_TASKS = {
    "taskness": "report",
    "lens": "country_capital,antonym,english_french,next_letter",
    "sweep": "country_capital,antonym,english_french,next_letter",
    "fv": "country_capital",
    "patch": "country_capital",
    "select": "country_capital",
    "report": "report",
    "weights": "country_capital,antonym,english_french,past_tense,next_letter",
    "info": None,
    "tasks": "all",
    "visual": "all",
    "xmodal": "image",
}

EXIT_USAGE = 2


class CliError(Exception):
    """A bad argument: reported as one line ``tvlens: error: <message>`` with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is raised (and printed by :func:`main` as one line), not printed with usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = f" (see `{self.prog} --help`)"
        raise CliError(message + hint)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw epilog (the examples keep their lines); ``(default: X)`` added where a default says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


# ----------------------------------------------------------------------------------------------
# argument types


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"int>={lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _example_sep(text: str) -> str:
    value = text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty example separator, e.g. '\\n'")
    return value


#: commands whose analyses take icl_prompts' options (the others build their prompts themselves)
_TAKES_PROMPT_KW = ("info", "taskness", "lens", "patch", "sweep", "fv", "select", "report")


def _prompt_kw(args: argparse.Namespace) -> dict[str, Any]:
    sep = getattr(args, "example_sep", "\n")
    if sep == "\n":
        return {}
    if args.command not in _TAKES_PROMPT_KW:
        raise CliError(f"--example-sep is not supported by `tvlens {args.command}` (its analysis builds prompts with the "
                       f"default newline); leave it out, or use {', '.join(_TAKES_PROMPT_KW)}")
    return {"example_sep": sep}


def _words(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("expected a comma-separated list of words, e.g. capital,city")
    return words


# ----------------------------------------------------------------------------------------------
# the parser

_MAIN_EPILOG = """\
examples:
  tvlens tasks                                   # the task suite: name, family, size, instruction
  tvlens info --model organism                   # model shape and ICL accuracy
  tvlens report                                  # everything, one page: figures/report.html
  tvlens taskness --tasks family:knowledge       # rho_token heatmap of every head
  tvlens sweep --tasks country_capital --model gpt2

--tasks takes task names (comma-separated), family:<name> (knowledge, linguistic, translation,
algorithmic) or all. --model takes organism (default), organism-natural, a local Hugging Face
checkpoint folder, or a hub name such as gpt2 when online.
"""

_COMMANDS: dict[str, tuple[str, str]] = {
    "tasks": ("list the shipped tasks (name, family, size, instruction)",
              "  tvlens tasks\n  tvlens tasks --tasks family:translation"),
    "info": ("show a model's shape, and its zero-shot / ICL accuracy on --tasks",
             "  tvlens info\n  tvlens info --model gpt2 --tasks country_capital,antonym"),
    "taskness": ("rho_token taskness of every head (Hojel et al. 2024): layers x heads heatmap",
                 "  tvlens taskness --tasks family:knowledge --n-prompts 100\n"
                 "  tvlens taskness --tasks all --transpose --out figs/"),
    "lens": ("logit lens at the separator, one summary page for all tasks (Luo et al. 2024)",
             "  tvlens lens --tasks country_capital,antonym\n"
             "  tvlens lens --tasks country_capital --task-words capital,city --top-k 5"),
    "sweep": ("task-vector layer sweep (Hendel et al. 2023): accuracy vs layer with 0-shot and ICL baselines",
              "  tvlens sweep --tasks country_capital,english_french\n  tvlens sweep --tasks family:algorithmic --n-prompts 50"),
    "fv": ("function vector (Todd et al. 2024): causal indirect effect per head, top-k heads summed",
           "  tvlens fv --tasks country_capital --k 10\n  tvlens fv --tasks antonym --layer 2"),
    "patch": ("head-patching sweep: task-mean (or ICL) head outputs patched into zero-shot or shuffled-label prompts",
              "  tvlens patch --tasks country_capital\n"
              "  tvlens patch --tasks antonym --source icl --target shuffled --positions all"),
    "select": ("find the task heads: REINFORCE (Hojel et al. 2024) and soft per-head weights, compared",
               "  tvlens select --tasks country_capital --steps 50\n"
               "  tvlens select --tasks antonym --method soft --steps 100"),
    "weights": ("weight-space task vectors (Ilharco et al. 2023): fine-tune, add, negate, analogies, vs activations, vs LoRA",
                "  tvlens weights addition --tasks country_capital,antonym,english_french,past_tense --merges task_arithmetic,ties\n"
                "  tvlens weights negation --tasks family:knowledge --cache runs/weights\n"
                "  tvlens weights peft --tasks antonym --ranks 1,2,4,8"),
    "visual": ("visual task vectors (Hojel et al. 2024) on a canvas model: rho over heads x positions, patching, "
               "REINFORCE vs CMA-ES vs GRS",
               "  tvlens visual                                  # organism-visual, all 8 tasks -> figures/visual.html\n"
               "  tvlens visual --tasks invert,gray,hflip --budget 160 --no-per-task"),
    "xmodal": ("cross-modal task vectors on a VLM (Luo et al. 2024): the table, text/image similarity, LLM -> VLM, lens",
               "  tvlens xmodal                                  # organism-vlm, its 13 image tasks -> figures/xmodal.html\n"
               "  tvlens xmodal --tasks country_capital,successor --parts table --renderings 1"),
    "report": ("taskness, logit lens, task-vector sweep and head patching: one standalone HTML page",
               "  tvlens report                                  # organism, default tasks -> figures/report.html\n"
               "  tvlens report --tasks family:knowledge --out report_knowledge/"),
}


def _common(p: argparse.ArgumentParser, command: str, *, model: bool = True, out: bool = True,
            n_prompts: int | None = None, n_shots: int | None = None) -> None:
    default_tasks = DEFAULT_TASKS.get(command)
    if default_tasks == "report":
        from .report import DEFAULT_TASKS as report_default

        default_tasks = ",".join(report_default)
    p.add_argument("--tasks", default=default_tasks, metavar="SPEC",
                   help="task names (comma-separated), family:<name>, or all")
    if model:
        p.add_argument("--model", default="organism", metavar="NAME_OR_DIR",
                       help="organism, organism-natural, a local checkpoint folder, or a hub name (gpt2) when online")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
        p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of every random draw (prompts, heads, masks)")
    if out:
        p.add_argument("--out", default="figures", metavar="DIR", help="output folder")
        p.add_argument("--no-png", action="store_true", help="write HTML figures only (no PNG export)")
    if n_prompts is not None:
        p.add_argument("--n-prompts", type=_int_at_least(2), default=n_prompts, help="prompts per task")
    if n_shots is not None:
        p.add_argument("--n-shots", type=_int_at_least(1), default=n_shots, help="demonstrations per ICL prompt")
        p.add_argument("--example-sep", type=_example_sep, default="\n", metavar="TEXT",
                       help="text between demonstrations, escapes allowed ('\\n', '\\n\\n', ' | '); default a newline")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tvlens",
        description="Find, measure and use task vectors in TransformerLens models.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tvlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str) -> argparse.ArgumentParser:
        help_, example = _COMMANDS[name]
        return sub.add_parser(name, help=help_, description=help_ + ".", epilog="example:\n" + example,
                              formatter_class=_Formatter)

    p = add("tasks")
    _common(p, "tasks", model=False, out=False)

    p = add("info")
    _common(p, "info", out=False, n_prompts=50, n_shots=5)

    p = add("taskness")
    _common(p, "taskness", n_prompts=50, n_shots=5)
    p.add_argument("--positions", default=FINAL,
                   help="final (the final separator ->), all (every token, right-aligned) or a token class (query_input, demo_sep, ...)")
    p.add_argument("--transpose", action="store_true", help="blocks on x and heads on y (Hojel et al.'s orientation)")
    p.add_argument("--top", type=_int_at_least(1), default=10, help="print this many top heads")

    p = add("lens")
    _common(p, "lens", n_prompts=50, n_shots=5)
    p.add_argument("--position", default=FINAL, help="final (the final separator ->), a token class (query_input, ...) or an int index")
    p.add_argument("--top-k", type=_int_at_least(1), default=10, help="decoded tokens kept per layer")
    p.add_argument("--task-words", type=_words, default=None, metavar="W1,W2",
                   help="words tracked as the task category (default: the words of each task's instruction)")

    p = add("sweep")
    _common(p, "sweep", n_prompts=50, n_shots=5)
    p.add_argument("--mode", choices=("replace", "add"), default="replace",
                   help="replace the separator's residual by the vector (Hendel) or add alpha x vector (Todd)")
    p.add_argument("--alpha", type=_float, default=1.0, help="scale of the vector in --mode add")
    p.add_argument("--center", action="store_true", help="subtract the mean vector over the tasks first (needs >= 2 tasks)")

    p = add("fv")
    _common(p, "fv", n_prompts=30, n_shots=10)
    p.add_argument("--k", type=_int_at_least(1), default=10, help="number of heads summed into the function vector")
    p.add_argument("--layer", type=_int, default=None,
                   help="layer where the vector is added (residual entering that block; default n_layers // 3, Todd et al.)")

    p = add("patch")
    _common(p, "patch", n_prompts=30, n_shots=5)
    p.add_argument("--source", choices=("means", "icl"), default="means",
                   help="means: task-mean head outputs over ICL prompts (Todd et al.); icl: the same prompts' ICL run")
    p.add_argument("--target", choices=("zero-shot", "shuffled"), default="zero-shot",
                   help="prompts patched into: zero-shot, or ICL prompts with shuffled labels")
    p.add_argument("--positions", choices=("final", "all"), default="final", help="patch the final position or every position")
    p.add_argument("--metric", choices=("logprob", "prob", "logit_diff", "accuracy"), default="logprob",
                   help="metric of the patched run")

    p = add("select")
    _common(p, "select", n_prompts=32, n_shots=5)
    p.add_argument("--methods", default="zero_shot,rho_topk,cie_topk,reinforce,soft,random_k,icl",
                   help="rows of the comparison: zero_shot, rho_topk, cie_topk, reinforce, soft, random_k, icl")
    p.add_argument("--per", choices=("family", "task", "all"), default="family", help="learn one selection per family, per task, or one for all")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="optimisation steps (REINFORCE and soft)")
    p.add_argument("--samples", type=_int_at_least(2), default=32, help="REINFORCE mask samples per step")
    p.add_argument("--lr", type=_positive_float, default=0.1, help="REINFORCE learning rate")
    p.add_argument("--k", type=_int_at_least(1), default=None,
                   help="heads in the top-k and random-k rows (default: as many as REINFORCE selected)")

    p = add("weights")
    _common(p, "weights", n_prompts=50, n_shots=5)
    p.add_argument("experiment", choices=("finetune", "addition", "negation", "analogy", "compare", "peft"),
                   help="finetune: one fine-tune per task; addition / negation / analogy: Ilharco et al. 2023 §4 / §3 / §5 "
                        "(analogy: --tasks names composed tasks); compare: weights vs activation vectors; peft: vs LoRA ranks")
    p.add_argument("--method", choices=("full", "lora"), default="full", help="fine-tune every weight, or peft LoRA adapters")
    p.add_argument("--steps", type=_int_at_least(1), default=150, help="fine-tuning steps per task")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default 3e-4 full, 3e-3 LoRA)")
    p.add_argument("--rank", type=_int_at_least(1), default=4, help="LoRA rank with --method lora")
    p.add_argument("--ranks", default="1,2,4,8", metavar="R1,R2", help="LoRA ranks compared by the peft experiment")
    p.add_argument("--merges", default="task_arithmetic,ties,dare_ties", metavar="M1,M2",
                   help="addition: merge methods (task_arithmetic, or peft's ties, dare_ties, dare_linear; with LoRA "
                        "vectors also cat, linear, ties_svd, dare_ties_svd, ...)")
    p.add_argument("--density", type=_positive_float, default=0.5, help="fraction of entries kept by TIES / DARE")
    p.add_argument("--cache", default=None, metavar="DIR", help="folder keeping fine-tuned vectors between runs")
    p.add_argument("--train-prompts", type=_int_at_least(1), default=64, help="training prompts per task (fine-tunes, soft heads)")

    p = add("visual")
    _common(p, "visual")
    p.set_defaults(model="organism-visual")
    p.add_argument("--n-means", type=_int_at_least(2), default=32, help="1-shot canvases per task for the task means")
    p.add_argument("--n-select", type=_int_at_least(1), default=6, help="no-example canvases per task the selectors train on")
    p.add_argument("--n-eval", type=_int_at_least(1), default=16, help="held-out canvases per task for every score")
    p.add_argument("--budget", type=_int_at_least(1), default=320, help="mask evaluations per selector (equal budgets)")
    p.add_argument("--task-budget", type=_int_at_least(1), default=None, help="the same for the per-task selections (default --budget)")
    p.add_argument("--lr", type=_positive_float, default=0.3, help="REINFORCE learning rate (Adam)")
    p.add_argument("--samples", type=_int_at_least(2), default=8, help="masks per step (REINFORCE, GRS) / CMA-ES population")
    p.add_argument("--candidates", type=_int_at_least(1), default=1024, help="selection searches the top pairs by rho")
    p.add_argument("--sparsity", type=_float, default=1e-3, help="size penalty per selected pair (reward units)")
    p.add_argument("--noise", type=_int_at_least(0), default=4, help="corrupted cells of the noisy-ICL example output (the model card's setting)")
    p.add_argument("--no-per-task", action="store_true", help="multi-task selection only (one mask for all tasks)")

    p = add("xmodal")
    _common(p, "xmodal", n_shots=5)
    p.set_defaults(model="organism-vlm")
    p.add_argument("--parts", default="table,similarity,llm,lens,examples", metavar="P1,P2",
                   help="subset of table,similarity,llm,lens,examples (--tasks image = the tasks organism-vlm's pictures draw)")
    p.add_argument("--renderings", type=_int_at_least(1), default=3, help="held-out renderings of every test item")
    p.add_argument("--contexts", type=_int_at_least(1), default=32, help="prompts each task vector is averaged over")
    p.add_argument("--llm", default=None, metavar="NAME_OR_DIR",
                   help="the language model the VLM was built on, for the llm part (default: organism for organism-vlm)")

    p = add("report")
    _common(p, "report", n_prompts=None, n_shots=5)
    p.add_argument("--n-prompts", type=_int_at_least(2), default=None,
                   help="prompts per task per section (default: the report's own, sized for a few minutes on 2 CPU cores)")
    p.add_argument("--sections", default=None, metavar="S1,S2",
                   help="subset of taskness,lens,sweep,patch (default: all)")
    return parser


# ----------------------------------------------------------------------------------------------
# helpers (no analysis: parsing, printing, file writing)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resolve_tasks(spec: str | None):
    from .tasks import resolve_tasks

    if spec is None or not str(spec).strip():
        raise CliError("--tasks is empty; give task names, family:<name> or all (list them with `tvlens tasks`)")
    return resolve_tasks(spec)


def _check_out(args: argparse.Namespace) -> Path:
    from .results import check_writable

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is a file, not a folder; choose another output folder")
    check_writable(out)
    return out


def _load(args: argparse.Namespace):
    from .models import load_model

    t0 = time.perf_counter()
    _say(f"loading model {args.model!r} ...")
    model = load_model(args.model, device=args.device)
    _say(f"loaded {args.model!r} in {time.perf_counter() - t0:.1f}s")
    return model


def _save(fig: Any, out: Path, name: str, args: argparse.Namespace, written: list[Path], *, html: bool = True) -> None:
    from .plot import save_figure

    png = not getattr(args, "no_png", False)
    if html or png:
        written.extend(save_figure(fig, out / name, png=png, html=html))


def _finish(written: Sequence[Path], out: Path | None = None) -> None:
    if not written:
        return
    names = ", ".join(Path(p).name for p in written)
    where = out if out is not None else Path(written[0]).parent
    print(f"wrote {len(written)} file(s) to {where}/: {names}")


def _need_two(tasks: Sequence[Any], what: str) -> None:
    if len(tasks) < 2:
        raise CliError(f"{what} compares tasks, so --tasks must name at least 2 (got {len(tasks)}); e.g. --tasks family:knowledge")


def _check_layer(model: Any, layer: int | None, *, allow_end: bool = False) -> int | None:
    if layer is None:
        return None
    from .hooks import check_layer

    return check_layer(model, layer, allow_end=allow_end, what="--layer")


# checks before the model loads: its config.json and tokenizer are read (fast), not its weights


def _source(args: argparse.Namespace) -> str | None:
    """What ``load_model(args.model)`` would load (a local folder or a hub name); a model that cannot
    be found is reported here, before any loading."""
    from .models import _resolve_source

    return _resolve_source(args.model)[0]


def _model_shape(args: argparse.Namespace) -> tuple[int, int] | None:
    """(n_layers, n_heads) from the checkpoint's config, without loading the weights; None if unreadable
    (the same checks then run after loading)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(_source(args))
        cfg = getattr(cfg, "text_config", None) or cfg  # vision-language models: the language model's shape
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    except (CliError, ValueError, FileNotFoundError):
        raise
    except Exception:
        return None


def _check_shape(args: argparse.Namespace, *, layer: int | None = None, k: int | None = None) -> None:
    shape = _model_shape(args)
    if shape is None:
        return
    n_layers, n_heads = shape
    if layer is not None and not -n_layers <= layer < n_layers:
        raise CliError(f"--layer {layer} is out of range: {args.model} has {n_layers} layers; use 0..{n_layers - 1} "
                       "(or a negative index from the end)")
    if k is not None and k > n_layers * n_heads:
        raise CliError(f"--k {k} is more heads than {args.model} has ({n_layers} layers x {n_heads} heads = "
                       f"{n_layers * n_heads}); use --k 1..{n_layers * n_heads}")


def _check_prompts(args: argparse.Namespace, tasks: Sequence[Any], n_shots: Sequence[int], *, position: Any = None,
                   n_prompts: int | None = None, **kw: Any) -> None:
    """Build each task's prompts with the tokenizer alone, so that too many shots or prompts, or a
    --position outside the prompts, fail here and not after the model has loaded."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_source(args))
    except (CliError, ValueError, FileNotFoundError):
        raise
    except Exception:  # no tokenizer to read here: the analysis checks the prompts itself
        return
    from .inputs.text import icl_prompts

    for t in tasks:
        for shots in n_shots:
            batch = icl_prompts(tok, t, n_prompts=n_prompts or args.n_prompts, n_shots=shots, seed=args.seed,
                                **{**_prompt_kw(args), **kw})
            if position is not None:
                from .analyses.lens import _positions

                try:
                    _positions(batch, position)
                except (ValueError, IndexError) as err:
                    raise CliError(f"--position {position}: {_one_line(err)}") from None


# ----------------------------------------------------------------------------------------------
# commands


def cmd_tasks(args: argparse.Namespace) -> None:
    tasks = _resolve_tasks(args.tasks)
    w = max(len(t.name) for t in tasks)
    fw = max(len(t.family) for t in tasks)
    print(f"{'task':<{w}}  {'family':<{fw}}  {'pairs':>5}  instruction")
    for t in tasks:
        print(f"{t.name:<{w}}  {t.family:<{fw}}  {len(t.pairs):>5}  {t.instruction}")
    print(f"{len(tasks)} task(s)")


def cmd_info(args: argparse.Namespace) -> None:
    from .models import ModelInfo
    from .inputs.text import evaluate_icl

    tasks = _resolve_tasks(args.tasks) if args.tasks else []
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0, args.n_shots))
    model = _load(args)
    info = ModelInfo.of(model)
    for key, value in info.to_dict().items():
        print(f"{key:>14}: {value}")
    if tasks:
        w = max(len(t.name) for t in tasks)
        print(f"\n{'task':<{w}}  {'0-shot':>7}  {f'{args.n_shots}-shot':>7}   (first-token accuracy, {args.n_prompts} prompts)")
        for t in tasks:
            zero = evaluate_icl(model, t, 0, n_prompts=args.n_prompts, seed=args.seed, **kw)
            icl = evaluate_icl(model, t, args.n_shots, n_prompts=args.n_prompts, seed=args.seed, **kw)
            print(f"{t.name:<{w}}  {zero.first_token:>7.2f}  {icl.first_token:>7.2f}")


def cmd_taskness(args: argparse.Namespace) -> None:
    from .analyses.taskness import _resolve_positions, head_means, taskness

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    _need_two(tasks, "taskness (rho_token)")
    _resolve_positions(args.positions)  # a bad --positions fails before the model loads
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (args.n_shots,))
    model = _load(args)
    stats = head_means(model, tasks, n_prompts=args.n_prompts, n_shots=args.n_shots, positions=args.positions,
                       seed=args.seed, progress=True, **kw)
    rho = taskness(stats)
    written: list[Path] = []
    _save(rho.plot(transpose=args.transpose), out, "taskness", args, written)
    if rho.per_position is not None:
        _save(rho.plot_positions(), out, "taskness_positions", args, written)
    written.append(rho.save(out / "taskness"))
    written.append(Path(out / "taskness.json"))
    print(f"top {args.top} heads by rho_token ({len(tasks)} tasks, {args.n_prompts} prompts each):")
    for layer, head, score in rho.top(args.top):
        print(f"  L{layer}H{head}  {score:.3f}")
    _finish(written, out)


def cmd_lens(args: argparse.Namespace) -> None:
    from .analyses.lens import lens_summary
    from .inputs.text import TokenClass

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    position = int(args.position) if args.position.lstrip("-").isdigit() else args.position
    if isinstance(position, str) and position.lower() not in FINAL_POSITION and position.upper() not in TokenClass.__members__:
        raise CliError(f"unknown --position {position!r}; use 'final' (the final separator), an integer index, or a token class: "
                       f"{', '.join(c.name.lower() for c in TokenClass if c.name != 'PAD')}")
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (args.n_shots,), position=position)
    model = _load(args)
    summary = lens_summary(model, tasks, out=out / "logit_lens.html", position=position, top_k=args.top_k,
                           task_words=args.task_words, n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed,
                           **kw)
    print(summary.text())
    _finish([summary.path], out)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .vectors.activation import layer_sweep

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    if args.center and len(tasks) < 2:
        raise CliError("--center subtracts the mean vector over tasks, so --tasks must name at least 2")
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0, args.n_shots))
    model = _load(args)
    sweep = layer_sweep(model, tasks, n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed, mode=args.mode,
                        alpha=args.alpha, center=args.center, **kw)
    written: list[Path] = [sweep.to_html(out / "task_vector_sweep.html")]
    _save(sweep.plot(), out, "task_vector_sweep", args, written, html=False)
    written += [sweep.save(out / "task_vector_sweep"), out / "task_vector_sweep.json"]
    print(sweep.table("family"))
    print()
    print(sweep.table("task"))
    _finish(written, out)


def cmd_fv(args: argparse.Namespace) -> None:
    from .inputs.text import evaluate_icl
    from .models import ModelInfo
    from .vectors.activation import evaluate_vector, function_vector

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    _check_shape(args, layer=args.layer, k=args.k)
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0, args.n_shots))
    model = _load(args)
    layer = _check_layer(model, args.layer)
    n_heads = ModelInfo.of(model).n_layers * ModelInfo.of(model).n_heads
    if args.k > n_heads:
        raise CliError(f"--k {args.k} is more heads than the model has ({n_heads}); use --k 1..{n_heads}")
    written: list[Path] = []
    for t in tasks:
        fv = function_vector(model, t, k=args.k, n_prompts=args.n_prompts, n_cie_prompts=args.n_prompts,
                             n_shots=args.n_shots, seed=args.seed, layer=layer, **kw)
        name = f"function_vector_{t.name}"
        _save(fv.plot(), out, name, args, written)
        written += [fv.save(out / name), out / f"{name}.json"]
        zero = evaluate_icl(model, t, 0, n_prompts=args.n_prompts, seed=args.seed, **kw).first_token
        with_fv = evaluate_vector(model, t, fv, n_prompts=args.n_prompts, seed=args.seed, **kw)
        heads = ", ".join(f"L{l}H{h}" for l, h in fv.top_heads)
        print(f"{t.name}: top {len(fv.top_heads)} heads by CIE: {heads}")
        print(f"{t.name}: zero-shot accuracy {zero:.3f} -> {with_fv:.3f} with the function vector added at layer {fv.layer}")
    _finish(written, out)


def cmd_patch(args: argparse.Namespace) -> None:
    from .analyses.patching import patch_heads
    from .inputs.text import icl_prompts
    from .analyses.taskness import head_means

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0 if args.target == "zero-shot" else args.n_shots, args.n_shots))
    model = _load(args)
    written: list[Path] = []
    for t in tasks:
        n_shots = 0 if args.target == "zero-shot" else args.n_shots
        target = icl_prompts(model, t, n_prompts=args.n_prompts, n_shots=n_shots, seed=args.seed,
                             shuffle_labels=args.target == "shuffled", **kw)
        if args.source == "means":
            source = head_means(model, [t], n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed, split="train",
                                **kw)
        else:
            # the same queries as the target, with n_shots clean demonstrations
            source = icl_prompts(model, t, n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed,
                                 queries=list(zip(target.queries, target.answers)), **kw)
        result = patch_heads(model, target, source, positions=args.positions, metric=args.metric)
        _save(result.plot(title=f"{t.name}: {args.source} -> {args.target}, {args.positions} position(s), "
                                f"{args.metric} (unpatched {result.target_value:.3f})"),
              out, f"patch_heads_{t.name}", args, written)
        top = ", ".join(f"L{l}H{h} {v:+.3f}" for l, h, v in
                        [(l, h, v - (0.0 if result.normalized else result.target_value)) for l, h, v in result.top(5)])
        print(f"{t.name}: unpatched {args.metric} {result.target_value:.3f}; top heads (change): {top}")
    _finish(written, out)


def cmd_select(args: argparse.Namespace) -> None:
    from .analyses.selection import METHOD_LABELS, compare_selections

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        raise CliError(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHOD_LABELS)}")
    _check_shape(args, k=args.k)
    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0, args.n_shots))
    model = _load(args)
    comparison = compare_selections(
        model, tasks, k=args.k, methods=methods, per=args.per, seed=args.seed, n_prompts=args.n_prompts,
        n_shots=args.n_shots, n_icl_prompts=args.n_prompts, n_mean_prompts=args.n_prompts,
        reinforce_kw=dict(steps=args.steps, samples_per_step=args.samples, lr=args.lr),
        soft_kw=dict(steps=args.steps), cie_kw=dict(n_prompts=args.n_prompts, n_cie_prompts=args.n_prompts), progress=True,
        **kw,
    )
    written: list[Path] = [comparison.to_html(out / "selection.html")]
    _save(comparison.plot(), out, "selection_comparison", args, written, html=False)
    for method, groups in comparison.selections.items():
        if method not in ("reinforce", "soft"):
            continue
        for group, sel in groups.items():
            name = f"selection_{method}_{group}".replace(":", "_").replace("/", "_")
            _save(sel.plot(), out, name, args, written, html=False)
            written.append(sel.save(out / name))
            written.append(out / f"{name}.json")
    print(comparison.table())
    for note in comparison.notes:
        print(f"note: {note}")
    _finish(written, out)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import SECTIONS, build_report

    out = _check_out(args)
    tasks = _resolve_tasks(args.tasks)
    sections = None
    if args.sections:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise CliError(f"unknown report section(s) {', '.join(unknown) or '(none)'}; use a subset of {','.join(SECTIONS)}")
    if sections is None or "taskness" in sections:
        _need_two(tasks, "the report's taskness section")
    from .report import DEFAULT_N_PROMPTS

    kw = _prompt_kw(args)
    _check_prompts(args, tasks, (0, args.n_shots), n_prompts=args.n_prompts or max(DEFAULT_N_PROMPTS.values()))
    model = _load(args)
    command = "tvlens " + " ".join(shlex.quote(a) for a in getattr(args, "argv", ["report"]))
    report = build_report(model, tasks, out, n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed,
                          sections=sections, png=not args.no_png, progress=True, command=command, **kw)
    print(report.text())
    print(f"report: {report.path}  ({len(report.files)} files in {out}/, {report.seconds:.0f}s)")


def cmd_weights(args: argparse.Namespace) -> None:
    from .analyses import weights as W

    out = _check_out(args)
    ranks = [_int_at_least(1)(r) for r in _words(args.ranks)]
    merges = _words(args.merges)
    fkw = dict(method=args.method, steps=args.steps, rank=args.rank, seed=args.seed, **({"lr": args.lr} if args.lr else {}),
               **({"n_prompts": args.train_prompts} if args.train_prompts != 64 else {}))
    common = dict(cache=args.cache, finetune_kw=fkw, seed=args.seed)
    if args.experiment == "analogy":
        names = [t.strip() for t in args.tasks.split(",")] if args.tasks != DEFAULT_TASKS["weights"] else list(W.COMPOSED_TASKS)
        unknown = [n for n in names if n not in W.COMPOSED_TASKS]
        if unknown:
            raise CliError(f"--tasks {', '.join(unknown)} are not composed tasks; use some of {', '.join(W.COMPOSED_TASKS)}")
    else:
        tasks = _resolve_tasks(args.tasks)
        if args.experiment in ("addition", "negation"):
            _need_two(tasks, f"task {args.experiment}")
    model = _load(args)
    if args.experiment == "finetune":
        vecs = W.weight_vectors(model, tasks, cache=args.cache, **fkw)
        for name, v in vecs.items():
            print(f"{name}: {v!r}")
        return
    if args.experiment == "addition":
        res = W.weight_addition(model, tasks, methods=merges, density=args.density, n_prompts=args.n_prompts, **common)
    elif args.experiment == "negation":
        res = W.weight_negation(model, tasks, n_shots=args.n_shots, n_prompts=args.n_prompts, **common)
    elif args.experiment == "analogy":
        res = W.weight_analogy(model, names, n_prompts=args.n_prompts, **common)
    elif args.experiment == "compare":
        res = W.weights_vs_activations(model, tasks, n_prompts=args.n_prompts, n_shots=args.n_shots, **common)
    else:
        res = W.peft_comparison(model, tasks, ranks=ranks, steps=args.steps, n_train_prompts=args.train_prompts,
                                n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed)
    name = f"weights_{args.experiment}"
    written: list[Path] = [res.to_html(out / f"{name}.html")]
    _save(res.plot(), out, name, args, written, html=False)
    written += [res.save(out / name), out / f"{name}.json"]
    print(res.to_frame().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    _finish(written, out)


def cmd_visual(args: argparse.Namespace) -> None:
    from .analyses.visual import _resolve_visual_tasks, visual_study

    out = _check_out(args)
    tasks = _resolve_visual_tasks(args.tasks)
    for flag, value in (("--budget", args.budget), ("--task-budget", args.task_budget or args.budget)):
        if value < args.samples:
            raise CliError(f"{flag} {value} is less than one step of --samples {args.samples}; give {flag} >= --samples")
    _check_shape(args)
    model = _load(args)
    study = visual_study(model, tasks, n_means=args.n_means, n_select=args.n_select, n_eval=args.n_eval, budget=args.budget,
                         task_budget=args.task_budget, samples=args.samples, lr=args.lr, candidates=args.candidates,
                         sparsity=args.sparsity, noise=args.noise, per_task=not args.no_per_task, seed=args.seed, progress=True)
    written = [study.to_html(out / "visual.html"), *study.save_figures(out, png=not args.no_png)]
    print(study.text())
    _finish(written, out)


def cmd_xmodal(args: argparse.Namespace) -> None:
    from .analyses import crossmodal as xm
    from .inputs.multimodal import vision_spec

    out = _check_out(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - {"table", "similarity", "llm", "lens", "examples"})
    if bad or not parts:
        raise CliError(f"--parts {args.parts!r}: unknown {bad or 'empty'}; use a subset of table,similarity,llm,lens,examples")
    tasks = list(xm.IMAGE_TASKS) if args.tasks == "image" else [t.name for t in _resolve_tasks(args.tasks)]
    llm_name = args.llm or ("organism" if args.model == "organism-vlm" else None)
    if "llm" in parts and llm_name is None:
        raise CliError("--parts llm needs --llm, the language model the VLM was built on")
    model = _load(args)
    vision_spec(model)  # a text-only model is refused here, before any work
    kw = dict(seed=args.seed, n_shots=args.n_shots)
    res: dict[str, Any] = {}
    if "table" in parts:
        res["table"] = xm.crossmodal_table(model, tasks, renderings=args.renderings, n_contexts=args.contexts, **kw)
    if "similarity" in parts:
        layer = res["table"].layers["Text ICL xPatch"] if "table" in res else None
        res["similarity"] = xm.task_similarity(model, tasks, layer=layer, n_contexts=args.contexts, **kw)
    if "llm" in parts:
        from .models import load_model

        res["llm"] = xm.llm_to_vlm(model, load_model(llm_name, device=args.device), tasks, n_contexts=args.contexts,
                                   renderings=args.renderings, **kw)
    if "lens" in parts:
        res["lens"] = xm.crossmodal_lens(model, tasks, n_prompts=args.contexts, **kw)
    if "examples" in parts:
        layer = res["table"].layers["Text ICL xPatch"] if "table" in res else None
        res["examples"] = xm.crossmodal_examples(model, tasks[::3] if len(tasks) > 4 else tasks, layer=layer,
                                                 n_contexts=args.contexts, seed=args.seed)
    written = [xm.crossmodal_page(out / "xmodal.html", **res)]
    for name, r in res.items():
        written.append(r.save(out / f"xmodal_{name}"))
        _save(r.plot(), out, f"xmodal_{name}", args, written, html=False)
        print(r.markdown() + "\n")
    _finish(written, out)


_HANDLERS = {
    "tasks": cmd_tasks,
    "info": cmd_info,
    "taskness": cmd_taskness,
    "lens": cmd_lens,
    "sweep": cmd_sweep,
    "fv": cmd_fv,
    "patch": cmd_patch,
    "select": cmd_select,
    "report": cmd_report,
    "weights": cmd_weights,
    "visual": cmd_visual,
    "xmodal": cmd_xmodal,
}


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and not isinstance(err, CliError) and len(err.args) == 1 and type(err).__str__ is KeyError.__str__:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so the error starts a line of its own."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # pragma: no cover - a bar half torn down
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tvlens`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    debug = os.environ.get("TVLENS_DEBUG", "") not in ("", "0")
    parser = build_parser()
    try:
        try:
            argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
            args = parser.parse_args(argv)
            args.argv = argv
        except SystemExit as stop:  # --help / --version
            return int(stop.code or 0)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _prompt_kw(args)  # --example-sep on a command that cannot pass it on: refused before any work
        _HANDLERS[args.command](args)
        sys.stdout.flush()  # a closed pipe (`tvlens tasks | head`) shows up here, inside the try
        return 0
    except BrokenPipeError:
        # the reader went away: stop quietly (no traceback, and no second error when Python flushes at exit)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except (CliError, ValueError, KeyError, FileNotFoundError, PermissionError, NotADirectoryError) as err:
        if debug:
            raise
        _close_progress_bars()
        print(f"tvlens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tvlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
