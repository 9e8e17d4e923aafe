"""The `jaxselm` command line. The only module that parses argv.

    jaxselm online   --config configs/demo.yaml [key=value ...]   online SELM iterations
    jaxselm sft      --config configs/demo.yaml [key=value ...]   next-token fine-tuning only
    jaxselm train    --config FILE.yaml data.prompts_path=prefs.jsonl   offline SELM/DPO/IPO
    jaxselm train-rm --config FILE.yaml data.prompts_path=prefs.jsonl   Bradley-Terry reward model
    jaxselm generate --config FILE.yaml --checkpoint DIR --prompts FILE --output out.jsonl
    jaxselm eval     --config FILE.yaml --checkpoint A --baseline B [--alpaca-eval out.json]
    jaxselm convert  --input HF_DIR_OR.gguf --output PARAMS_DIR  (--to hf|gguf from an export)
    jaxselm --distributed online --config FILE.yaml   on every host of a TPU pod / SLURM job

Every subcommand takes ``--config FILE.yaml`` plus ``key=value`` overrides (e.g.
``online.iterations=5 model.position=cope``). Mistakes in configs, data, checkpoints, tokenizers or
judge specs print ONE line (``jaxselm: error: <culprit>: <what>``) and exit with status 2 before any
work starts; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from jaxselm.errors import JaxselmError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention too)
        self.exit(EXIT_USAGE, f"jaxselm: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE.yaml", help="run config (YAML)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, e.g. online.iterations=5 model.position=cope",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxselm", description="Online preference alignment (SELM) with CoPE, in JAX."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process run: start jax.distributed first (auto-detected on "
        "Cloud TPU / SLURM; implied by JAXSELM_COORDINATOR or "
        "JAXSELM_NUM_PROCESSES, see docs/multinode-gpu.md)",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser(
        "online",
        help="run (or resume) online SELM iterations",
        description="Run or resume the online loop: generate, judge, reference "
        "log-probs, train, evaluate, per iteration.",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on demonstrations (the warm start)",
        description="Run only the SFT warm start of a run config; writes "
        "OUTPUT_DIR/policy/iter_00.",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "train",
        help="offline SELM / DPO / IPO on a preference file",
        description="Offline preference training on data.prompts_path (rows with "
        "prompt, chosen, rejected; SELM/XPO also need refresp or use "
        "the policy's greedy response).",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "train-rm",
        help="fit a reward model (Bradley-Terry) on preference data",
        description="Fit a scalar-head reward model on data.prompts_path "
        "(prompt, chosen, rejected).",
    )
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")

    p = sub.add_parser(
        "generate",
        help="sample responses from a checkpoint",
        description="Generate responses for prompts (JSONL with 'prompt' or "
        "'messages'; or the task's eval prompts) and write JSONL.",
    )
    _add_config_args(p)
    p.add_argument(
        "--checkpoint", required=True, help="params export (e.g. RUN/policy/iter_03) or HF dir"
    )
    p.add_argument("--prompts", help="JSONL of prompts (default: the run's evaluation prompts)")
    p.add_argument("--output", required=True, help="output JSONL")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")

    p = sub.add_parser(
        "eval",
        help="win rate of a checkpoint against another with the judge",
        description="Greedy responses of two checkpoints on the evaluation prompts, "
        "judged pairwise; optionally an AlpacaEval-format JSON of outputs.",
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="the model to evaluate")
    p.add_argument("--baseline", help="the model to compare against (default: none, scores only)")
    p.add_argument("--alpaca-eval", metavar="OUT.json", help="write outputs in AlpacaEval format")

    p = sub.add_parser(
        "convert",
        help="convert checkpoints between HF, GGUF and jaxselm params exports",
        description="Any model checkpoint (HF directory, .gguf file, jaxselm params export) to "
        "another kind. HF and GGUF outputs carry the tokenizer and its chat template.",
    )
    p.add_argument("--input", required=True, help="HF directory, .gguf file or params export")
    p.add_argument("--output", required=True)
    p.add_argument(
        "--to",
        choices=("jaxselm", "hf", "gguf"),
        default=None,
        help="output kind (default: jaxselm for HF/GGUF input, hf for an export)",
    )
    p.add_argument(
        "--from",
        dest="src",
        choices=("hf", "gguf", "jaxselm"),
        default=None,
        help="the input's kind (checked; it is recognised from the files)",
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE.yaml",
        help="a run config whose model section the checkpoint must match (needed only for a "
        "params export saved without its model config)",
    )
    p.add_argument("--tokenizer", help="tokenizer to include (default: the input's own)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--head", choices=("lm", "reward"), default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _load_run_config(args):
    from jaxselm.config_io import load_config
    from jaxselm.online.config import RunConfig

    return load_config(RunConfig, args.config, args.overrides)


def _config_dir(args) -> str:
    """The run config's folder: a programmatic judge's module is also looked for there."""
    return os.path.dirname(os.path.abspath(args.config))


def _cmd_online(args) -> int:
    from jaxselm.online.loop import run_online

    return run_online(_load_run_config(args), config_dir=_config_dir(args))


def _cmd_sft(args) -> int:
    from jaxselm.online.loop import run_sft

    return run_sft(_load_run_config(args), config_dir=_config_dir(args))


def _cmd_generate(args) -> int:
    from jaxselm.online.commands import generate_command

    cfg = _load_run_config(args)
    return generate_command(
        cfg,
        args.checkpoint,
        args.prompts,
        args.output,
        greedy=args.greedy,
        config_dir=_config_dir(args),
    )


def _cmd_eval(args) -> int:
    from jaxselm.online.commands import eval_command

    cfg = _load_run_config(args)
    return eval_command(
        cfg, args.checkpoint, args.baseline, args.alpaca_eval, config_dir=_config_dir(args)
    )


def _cmd_train(args) -> int:
    from jaxselm.online.loop import run_offline

    return run_offline(_load_run_config(args), config_dir=_config_dir(args))


def _cmd_train_rm(args) -> int:
    from jaxselm.online.commands import train_rm_command

    return train_rm_command(_load_run_config(args), steps=args.steps)


def _cmd_convert(args) -> int:
    from jaxselm.online.commands import convert_command

    cfg = _load_run_config(args) if args.config is not None else None
    return convert_command(
        args.input,
        args.output,
        to=args.to,
        src=args.src,
        cfg=cfg,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        head=args.head,
    )


_COMMANDS = {
    "online": _cmd_online,
    "sft": _cmd_sft,
    "train": _cmd_train,
    "train-rm": _cmd_train_rm,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "convert": _cmd_convert,
}


# Commands whose code paths keep every process in lockstep (jaxselm.online.loop); the others
# (generate, eval, train-rm, convert) run as one process.
_MULTI_PROCESS_COMMANDS = ("online", "sft", "train")


def _env_wants_distributed() -> bool:
    """JAXSELM_COORDINATOR / JAXSELM_NUM_PROCESSES set (as jaxselm.parallel.multihost reads them;
    checked here without importing jax)."""
    return bool(os.environ.get("JAXSELM_COORDINATOR") or os.environ.get("JAXSELM_NUM_PROCESSES"))


class _OrbaxNoise(logging.Filter):
    """Orbax's warning when it cannot read a checkpoint's metadata precedes the one-line
    CheckpointError that says what is wrong (absl logs it under its own file name, so it is
    recognised by its text); every other record passes."""

    NOISE = ("Failed to get item metadata from directory",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and str(record.msg).startswith(self.NOISE))


def _closed_loop_hook(unraisable) -> None:
    """After a failed orbax read, its pending futures are collected once their event loop is
    closed, and each prints 'Event loop is closed' with a traceback: teardown noise from the
    library, not a second error. Everything else goes to Python's own hook."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


class _UnretrievedFutures(logging.Filter):
    """asyncio's "Future exception was never retrieved" (logged at ERROR) for the futures of a
    failed orbax/tensorstore read, which orbax leaves behind after raising the error we report:
    jaxselm runs no asyncio code of its own, so these are always the library's leftovers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Future exception was never retrieved")


def _quiet_library_noise() -> None:
    warnings.filterwarnings(
        "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
    )  # orbax's metadata coroutines after a failed read (jaxselm has no coroutines of its own)
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _closed_loop_hook
    for name, noise in (("absl", _OrbaxNoise), ("asyncio", _UnretrievedFutures)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, noise) for f in logger.filters):
            logger.addFilter(noise())


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from jaxselm import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command != "convert" and args.config is None:
        print(f"jaxselm {args.command}: error: --config FILE.yaml is required", file=sys.stderr)
        return EXIT_USAGE
    for item in getattr(args, "overrides", []) or []:
        if "=" not in item:
            print(
                f"jaxselm {args.command}: error: unexpected argument {item!r} (overrides look like "
                "key=value)",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        if args.distributed or _env_wants_distributed():
            if args.command not in _MULTI_PROCESS_COMMANDS:
                print(
                    f"jaxselm {args.command}: error: --distributed: multi-process runs are "
                    f"supported by {', '.join(_MULTI_PROCESS_COMMANDS)} "
                    f"(run {args.command} as one process)",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            from jaxselm.parallel.multihost import initialize_distributed

            initialize_distributed()
        return _COMMANDS[args.command](args)
    except JaxselmError as err:
        msg = " ".join(str(err).split())  # one line
        print(f"jaxselm {args.command}: error: {msg}", file=sys.stderr)
        if getattr(err, "abandon_process", False):  # a distributed init still blocked in C++
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jaxselm {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:  # console script
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    code = main()
    if code == EXIT_USAGE:
        # The one-line error is printed and every file the command writes is written atomically
        # (with-blocks, checkpointers included, closed on the way out); skipping the interpreter's
        # teardown keeps the futures and coroutines a failed orbax read leaves behind from
        # printing warnings after that line ("coroutine ... was never awaited", "Event loop is
        # closed"), which they do at exit, nondeterministically.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
