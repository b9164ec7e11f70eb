"""`seqpg` command line: train, sft, eval, explain, export, lab, demo, bench, config.

    seqpg train [-c CONFIG.yaml] [key=value ...]      # fine-tune as configured
    seqpg train --resume RUN [key=value ...]          # continue a run exactly where it stopped
    seqpg train -c CONFIG --init RUN_OR_MODEL         # RL from an SFT run's (or any) model
    seqpg sft -c CONFIG [--resume RUN] [key=value ...] # supervised fine-tuning on demonstrations (sft.data)
    seqpg eval RUN_OR_MODEL [--k 1 4] [key=value ...] # held-out reward, accuracy, pass@k
    seqpg explain RUN --prompt TEXT [--completion TEXT] [--html PAGE]
    seqpg export RUN_OR_CHECKPOINT OUT [--format hf|gguf] # a model other tools load (HF dir, GGUF file)
    seqpg lab -c CONFIG.yaml [--checkpoint RUN]       # which advantage estimator the task needs
    seqpg demo                                        # what `make demo` runs
    seqpg config [-c CONFIG.yaml] [key=value ...]     # print the resolved configuration

Options and key=value overrides may come in any order.  A failure is one line on stderr
(``seqpg: <problem>; <fix>``); ``--debug`` (anywhere on the line) also prints the traceback.

exit status: 0 done (all steps, or max_minutes reached); 1 the run failed; 2 configuration error; 3
stopped early with a checkpoint (SIGTERM or Ctrl-C): continue with `seqpg train --resume RUN`; 130
aborted (a second Ctrl-C). SIGUSR1 saves a checkpoint after the current step and training goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import yaml

from ..config import ConfigError, TrainConfig, describe_config, load_config, to_dict
from ..rundir.runlock import RunInUse
from ..rundir.signals import EXIT_STOPPED


def _config_help() -> str:
    lines = ["configuration keys (YAML file and/or key=value overrides; defaults shown):", ""]
    for key, default, doc in describe_config(TrainConfig):
        lines.append(f"  {key} = {default}")
        lines += textwrap.wrap(doc, 92, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "examples:", "  seqpg train -c examples/demo.yaml steps=20",
              "  seqpg train model.name=./my-hf-model algo.name=rloo 'rewards=[{kind: vader}]'"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="seqpg", description="Policy-gradient RL fine-tuning of language models.",
                                formatter_class=fmt, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with RL", formatter_class=fmt, epilog=_config_help(),
                       description="Sample -> score -> advantages -> update, as configured. Writes a run directory "
                                   "(config.yaml, metrics.jsonl, samples.jsonl, TensorBoard events, plots, "
                                   "checkpoints).")
    t.add_argument("-c", "--config", help="YAML configuration file (see examples/)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint (its config.yaml is "
                                                   "used; overrides such as steps=200 still apply)")
    t.add_argument("--init", metavar="RUN_OR_MODEL",
                   help="start from this model instead of model.name: a run directory (e.g. of `seqpg sft`; its "
                        "latest checkpoint, LoRA merged, is exported to RUN/init_model) or a model directory; the "
                        "KL reference is this starting model")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides (keys below)")

    f = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (the update with advantage 1)",
                       formatter_class=fmt, epilog=_config_help(),
                       description="Maximum likelihood of the assistant's tokens of sft.data (JSONL: `messages` "
                                   "with tool calls, or `prompt`/`completion`), run as the RL update with the "
                                   "advantage fixed at 1: same model, LoRA, checkpoints, resume, export and "
                                   "torchrun. Continue with RL: seqpg train -c RL.yaml --init RUN.")
    f.add_argument("-c", "--config", help="YAML configuration file with an `sft` section (see examples/)")
    f.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    f.add_argument("--no-progress", action="store_true", help="no live progress bar")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides (keys below)")

    e = sub.add_parser("eval", help="evaluate a run or a model on held-out prompts", formatter_class=fmt,
                       description="Held-out mean reward (greedy), accuracy where the task has one, with standard "
                                   "errors, and pass@k with sampling. The held-out prompts are the run's (or the "
                                   "config's) eval split, never seen in training.")
    e.add_argument("target", metavar="RUN_OR_MODEL", help="a run directory (its latest checkpoint), a model "
                                                          "directory, or a model alias such as smollm2-135m-instruct")
    e.add_argument("-c", "--config", help="configuration for task and rewards (default: the run's, or the defaults)")
    e.add_argument("--prompts", type=int, default=0, help="evaluate on the first N held-out prompts (0: all)")
    e.add_argument("--k", type=int, nargs="*", default=[], help="also report pass@k for these k (sampled)")
    e.add_argument("--samples", type=int, default=0,
                   help="also draw this many samples per prompt with the run's sampling settings: their mean "
                        "reward, distinct-2 and pass@k (default with --k: max k)")
    e.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")

    x = sub.add_parser("explain", help="per-token view of one prompt and completion under a checkpoint",
                       formatter_class=fmt,
                       description="For one prompt and completion: log pi of each token, its advantage, their "
                                   "product (the token's share of U) and whether the update raises or lowers its "
                                   "probability. The advantage is estimated the run's way, against a fresh group "
                                   "of samples for the same prompt.")
    x.add_argument("run", metavar="RUN", help="a run directory (or a model directory / alias)")
    x.add_argument("--prompt", required=True, help="the prompt text")
    x.add_argument("--completion", help="the completion to explain (default: sample one)")
    x.add_argument("--reward", type=float, help="use this reward for the completion instead of scoring it")
    x.add_argument("--html", metavar="PAGE", help="where to write the HTML page (default: RUN/explain.html)")
    x.add_argument("--seed", type=int, default=0, help="seed of the comparison samples")

    o = sub.add_parser("export", help="write a run's model as a Hugging Face directory or a GGUF file",
                       formatter_class=fmt,
                       description="Rebuilds the run's model, loads its checkpoint and writes it in a standard "
                                   "format: hf, a directory AutoModelForCausalLM.from_pretrained loads (LoRA merged, "
                                   "or a PEFT adapter directory with --lora adapter); gguf, one file for "
                                   "llama.cpp-style runtimes (Llama-family models).")
    o.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a "
                                                                "checkpoint directory RUN/checkpoints/step-N")
    o.add_argument("out", metavar="OUT", help="the directory (hf) or .gguf file (gguf) to write")
    o.add_argument("--format", default="hf", choices=["hf", "gguf"], help="output format (default: hf)")
    o.add_argument("--lora", default="merged", choices=["merged", "adapter"],
                   help="LoRA runs: merge the adapters into the weights (default) or write a PEFT adapter directory")
    o.add_argument("--dtype", choices=["f32", "f16", "bf16"],
                   help="weight type (default: the run's for hf, f16 for gguf; gguf takes f32 or f16)")
    o.add_argument("-c", "--config", help="the run's configuration, when the checkpoint is not inside its run")
    o.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export or an empty directory")
    lb = sub.add_parser("lab", help="measure which advantage estimator a task needs (gradient SNR, bias, cosine)",
                        formatter_class=fmt,
                        description="Draws units of one training step's prompts x samples, scores them once and "
                                    "compares every advantage estimator's gradient on the same samples: bias along a "
                                    "reference gradient, variance relative to REINFORCE, SNR, samples to reach a "
                                    "cosine. Writes OUT/lab.md, lab.json and plots/.")
    lb.add_argument("-c", "--config", help="task, rewards, sampling and model (default: the run's, or the defaults)")
    lb.add_argument("--checkpoint", metavar="RUN", help="measure at RUN's latest checkpoint instead of the model")
    lb.add_argument("--groups", type=int, default=32, help="prompt groups compared (in units of prompts_per_step)")
    lb.add_argument("--reference-groups", type=int, default=32, help="held-apart groups for the reference gradient")
    lb.add_argument("--estimators", nargs="*", help="advantage estimators (default: all the task can use)")
    lb.add_argument("--directions", type=int, default=128, help="random directions of the gradient sketch")
    lb.add_argument("--cosine", type=float, default=0.5, help="target cosine of 'samples to reach cosine c'")
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--out", default="lab", help="output directory")
    lb.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")

    d = sub.add_parser("demo", help="the README's demo: evaluate, fine-tune, evaluate again", formatter_class=fmt,
                       description="Fine-tunes SmolLM2-135M-Instruct on the default task (examples/demo.yaml) and "
                                   "prints held-out reward and accuracy before -> after.")
    d.add_argument("-c", "--config", default=None, help="demo configuration (default: the packaged demo config)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")

    b = sub.add_parser("bench", help="side-by-side benchmark against TRL's GRPOTrainer", formatter_class=fmt,
                       description="See `make bench`. Needs the bench extra: pip install -e '.[bench]'.")
    b.add_argument("--steps", type=int, default=None, help="measured steps per library (after warm-up; default 6)")
    b.add_argument("--warmup", type=int, default=None,
                   help="unmeasured steps per library first (default 3; steady state: seqpg's heap grows for ~3 "
                        "steps; see docs/bench.md)")
    b.add_argument("--out", default="bench", help="output directory (latest.json, latest.md)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where both libraries train (cuda: on the GPU; the MFU is then against the GPU's matmul peak)")
    b.add_argument("--dtypes", nargs="*", default=None, help="which precisions to run (default: fp32 bf16)")
    b.add_argument("--threads", type=int, nargs="*", default=None,
                   help="torch thread counts to run at (default: 1 2; the same for both libraries; the headline "
                        "takes the one where TRL is fastest; with --learning: one count, default 1)")
    b.add_argument("--learning", action="store_true",
                   help="instead: train both libraries --learning-steps steps (fp32) and compare reward per step and "
                        "held-out reward against wall-clock time (bench/learning.md; ~15 min on 2 cores); "
                        "--steps, --warmup and --dtypes do not apply")
    b.add_argument("--learning-steps", type=int, default=20, help="steps per library with --learning")
    b.add_argument("-c", "--config", default="examples/demo.yaml",
                   help="task, rewards, sampling settings and learning rate of both libraries (default: the demo's)")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")

    g = sub.add_parser("config", help="print the resolved configuration (checks it)", formatter_class=fmt,
                       epilog=_config_help())
    g.add_argument("-c", "--config")
    g.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _record(fn):
    """torchrun's @record: its failure summary then shows the failing rank's traceback."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover - torch without elastic
        return fn
    return record(fn)


@_record
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parse_args([a for a in argv if a != "--debug"])
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("seqpg: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (the traceback with --debug)
        return report_failure(e, debug=debug)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, options and ``key=value`` overrides in any order.

    argparse takes the overrides given before the first option after them as its positional list; the
    rest come back unrecognised and are appended in order (a later override of the same key wins)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


EXIT_CONFIG, EXIT_FAILED = 2, 1
"""Exit statuses: a configuration (or a path in it) that cannot run; a run that failed."""


def report_failure(e: BaseException, *, debug: bool = False) -> int:
    """Print ``e`` as one line ``seqpg: <problem>; <fix>`` (after its traceback with ``debug``); its exit status."""
    import errno
    import traceback

    from ..rewards.scorers import ScorerError
    from ..training.update import NonFiniteError

    if debug:
        traceback.print_exception(e, file=sys.stderr)
    text = " ".join(str(e).split()) or type(e).__name__
    hint = "" if debug else " (run again with --debug for the traceback)"
    if isinstance(e, ConfigError):
        line, code = f"configuration error: {text}", EXIT_CONFIG
    elif isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        line, code = text, EXIT_CONFIG
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        line = (f"disk full{where}; free space (or choose another run_dir) and continue with --resume: "
                "the last complete checkpoint is intact")
        code = EXIT_FAILED
    elif isinstance(e, ScorerError):
        line, code = (f"reward failed: {text}; fix the scorer, or set on_scorer_error=zero to score such "
                      "samples 0 (counted)"), EXIT_FAILED
    elif isinstance(e, (NonFiniteError, RunInUse)):
        line, code = text, EXIT_FAILED
    else:
        line, code = f"{type(e).__name__}: {text}{hint}", EXIT_FAILED
    print(f"seqpg: {line}", file=sys.stderr)
    return code


def _cmd_config(args) -> int:
    from ..training.step import StepSettings

    cfg = load_config(args.config, args.overrides)
    StepSettings.from_config(cfg)  # the step's settings: the environment and tools load (and are checked) here
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _resolve_config(args):
    """The run's configuration: the run's own config.yaml with ``--resume`` (a used run_dir refused otherwise)."""
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop -c (overrides still apply)")
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a seqpg run directory?")
        return load_config(cfg_path, args.overrides + [f"run_dir={args.resume}"])
    cfg = load_config(args.config, args.overrides)
    _refuse_used_run_dir(Path(cfg.run_dir))
    return cfg


def _cmd_train(args) -> int:
    from ..training.trainer import train
    if args.init and args.resume:
        raise ConfigError("--init starts a new run; a resumed run continues from its own checkpoint (drop --init)")
    cfg = _resolve_config(args)
    if args.init:
        from .warm_start import init_model
        cfg = load_config(args.config, args.overrides + [f"model.name={init_model(args.init, Path(cfg.run_dir))}"])
    result = train(cfg, resume=bool(args.resume), progress=not args.no_progress)
    if result.steps_done and int(os.environ.get("RANK", "0")) == 0:
        print(f"seqpg: {result.steps_done} steps done; run in {result.run_dir}"
              + (f" (max_minutes={cfg.max_minutes} reached; continue with --resume)" if result.out_of_time
                 else " (stopped early; continue with --resume)" if result.stopped_early else ""))
    return EXIT_STOPPED if result.stopped_early and not result.out_of_time else 0


def _cmd_sft(args) -> int:
    from ..sft.trainer import print_summary, sft
    cfg = _resolve_config(args)
    result = sft(cfg, resume=bool(args.resume), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(result)
    return EXIT_STOPPED if result.stopped_early and not result.out_of_time else 0


def _refuse_used_run_dir(run_dir: Path) -> None:
    """A new run must not write over an earlier one's checkpoints or logs (checked before any model loads)."""
    from ..rundir.runfiles import METRICS_FILE, SAMPLES_FILE
    from ..rundir.runlock import check_free

    check_free(run_dir)  # a run writing there now is named first (RunInUse)
    ckpts = run_dir / "checkpoints"
    used = (ckpts.is_dir() and any(ckpts.iterdir())) or any(
        (run_dir / f).is_file() and (run_dir / f).stat().st_size > 0 for f in (METRICS_FILE, SAMPLES_FILE))
    if used:
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds a run (checkpoints or logs); continue it with "
                          f"`seqpg train --resume {run_dir}` or give another run_dir=...")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {str(run_dir)!r} is a file; give a directory path")


def _check_target(target: str) -> None:
    """``RUN_OR_MODEL`` must be a run directory, a model directory or .gguf file, or an alias."""
    from ..model.loading import MODEL_ALIASES
    from .session import is_run_dir

    if is_run_dir(target) or target in MODEL_ALIASES or target == "tiny" or Path(target).exists():
        return
    raise ConfigError(f"{target!r} does not exist; give a run directory, a model directory, a .gguf file or an "
                      f"alias ({', '.join(sorted(MODEL_ALIASES))})")


def _cmd_eval(args) -> int:
    from .session import eval_target
    _check_target(args.target)
    res = eval_target(args.target, config=args.config, overrides=args.overrides, n_prompts=args.prompts,
                      ks=tuple(args.k), samples=args.samples)
    print(res.table())
    if args.json:
        Path(args.json).write_text(json.dumps(res.result.as_dict(), indent=2))
    return 0


def _cmd_explain(args) -> int:
    from .explain import explain_cli
    _check_target(args.run)
    return explain_cli(args)


def _cmd_export(args) -> int:
    from .export import ExportError, export
    try:
        out = export(args.target, args.out, format=args.format, lora=args.lora, dtype=args.dtype,
                     config=args.config, overwrite=args.overwrite)
    except ExportError as e:
        print(f"seqpg export: {e}", file=sys.stderr)
        return 2
    print(f"seqpg: exported {args.target} to {out} ({args.format})")
    return 0


def _cmd_lab(args) -> int:
    from .lab import LabSettings, render_markdown, run_lab
    config = args.config or (Path(args.checkpoint) / "config.yaml" if args.checkpoint else None)
    cfg = load_config(config, args.overrides)
    settings = LabSettings(groups=args.groups, reference_groups=args.reference_groups, estimators=args.estimators,
                           directions=args.directions, cosine=args.cosine, seed=args.seed, out_dir=args.out)
    res = run_lab(cfg, settings, checkpoint=args.checkpoint, log=lambda m: print(m, file=sys.stderr))
    print(render_markdown(res))
    print(f"seqpg lab: {args.out}/lab.md, lab.json, plots/")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.config, args.overrides)


def _cmd_bench(args) -> int:
    from .bench import run_bench
    return run_bench(steps=args.steps, out_dir=args.out, dtypes=args.dtypes, threads=args.threads,
                     warmup=args.warmup, config=args.config, overrides=args.overrides, learning=args.learning,
                     learning_steps=args.learning_steps, device=args.device)


_COMMANDS = {"train": _cmd_train, "sft": _cmd_sft, "eval": _cmd_eval, "explain": _cmd_explain, "export": _cmd_export, "lab": _cmd_lab,
             "demo": _cmd_demo, "bench": _cmd_bench, "config": _cmd_config}

if __name__ == "__main__":
    sys.exit(main())
