"""The `kdcompose` command line.

Exit codes: 0 success, 2 invalid config or usage (message on stderr naming each offending
dotted path), 1 anything else; `train` also 75 (stopped by SIGTERM after saving a complete
checkpoint: continue with `--resume`), 130 (Ctrl-C) and 143 (SIGTERM without a new checkpoint).
`kdcompose` alone prints this help; `kdcompose COMMAND -h` describes a command, its exit codes
and the environment variables it reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from kdcompose.errors import ConfigError

EXIT_INVALID = 2

SET_HELP = (
    "override one key of the config for this run: a dotted YAML path and a YAML value, e.g. "
    "--set training.max_steps=2 --set rlhf.loss_terms.ce.weight=0 (repeatable; checked like the file)"
)


def _validate(args: argparse.Namespace) -> int:
    from kdcompose.composer import describe_terms
    from kdcompose.config import load_config

    if args.json and len(args.configs) != 1:
        print("kdcompose validate --json takes exactly one config", file=sys.stderr)
        return EXIT_INVALID
    status = 0
    for path in args.configs:
        try:
            config = load_config(path, args.overrides)
            notes = _preflight(config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            if args.json:
                errors = [{"path": issue.path, "message": issue.message} for issue in exc.issues]
                print(json.dumps({"ok": False, "errors": errors}, indent=2))
            status = EXIT_INVALID
            continue
        composer = config.composer
        rows = describe_terms(composer)
        if args.json:
            payload = {
                "ok": True,
                "terms": list(rows),
                "needs_teacher": composer.needs.teacher,
                "formula": composer.formula(),
                "llm_kd_weight": config.llm_kd_weight,
                "notes": notes,
            }
            print(json.dumps(payload, indent=2))
        else:
            print(f"{path}: OK")
            print(_table(rows))
            print(f"  {composer.formula()}")
            print(f"  teacher needed: {'yes' if composer.needs.teacher else 'no'}")
            for note in notes:
                print(f"  note: {note}")
    return status


def _preflight(config: object) -> list[str]:
    """The checks `train` makes before loading a model (ms-swift argument names, rlhf_type,
    unsupported settings, teacher, the models' files), when ms-swift is installed: a config
    that validates starts. Returns notes that are not errors (a model that will be downloaded).
    Without ms-swift only kdcompose's own keys can be checked, and validate says so."""
    from kdcompose.integrations.swift.launch.preflight import check_config, swift_importable

    if not swift_importable():
        return ["ms-swift is not installed; ms-swift argument names and the models were not checked"]
    check_config(config)
    from kdcompose.integrations.swift.launch.model_preflight import model_notes

    return model_notes(config)


def _table(rows: Sequence[dict]) -> str:
    header = ("term", "type", "weight", "schedule", "active", "needs teacher", "metric")
    body = [
        (
            str(r["name"]),
            str(r["type"]),
            f"{r['weight']:g}",
            str(r.get("schedule") or "-"),
            "yes" if r["active"] else "no",
            "yes" if r["needs_teacher"] else "no",
            str(r["metric"]) if r["active"] else "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *body)
    ]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _schema(args: argparse.Namespace) -> int:
    from kdcompose.config import load_plugins
    from kdcompose.errors import ConfigIssue
    from kdcompose.json_schema import config_json_schema

    issues: list[ConfigIssue] = []
    load_plugins(list(args.plugins), None, issues)
    if issues:
        print(ConfigError(issues, source="--plugin").render(), file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from kdcompose.integrations.swift.launch.command import train

    return train(args.config, overrides=args.overrides, resume=args.resume)


def _demo(args: argparse.Namespace) -> int:
    from kdcompose.demo import run_demo

    return run_demo(args.output_dir, args.steps, seed=args.seed, quick=args.quick)


def _torchvision_hook(args: argparse.Namespace) -> int:
    from kdcompose.compat import install_startup_hook, remove_startup_hook, startup_hook_installed
    from kdcompose.compat.torchvision_ops import startup_hook_path

    if args.action == "install":
        print(f"installed {install_startup_hook()}")
    elif args.action == "remove":
        print(f"removed {startup_hook_path()}" if remove_startup_hook() else "no start-up hook was installed")
    else:
        state = "installed" if startup_hook_installed() else "not installed"
        print(f"{startup_hook_path()}: {state}")
    return 0


def _plugin_path(args: argparse.Namespace) -> int:
    from kdcompose.integrations.swift import plugin_path

    print(plugin_path())
    return 0


def _plot(args: argparse.Namespace) -> int:
    from kdcompose.plot import PlotError, PlotUnavailableError, plot_run

    try:
        run, out = plot_run(args.run_dir, args.output, log_y=args.log_y)
    except PlotError as exc:
        print(f"kdcompose plot: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except PlotUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"read {run.path}" + (f" ({run.note})" if run.note else ""))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------- what each command's help says

_EXIT_CONFIG = (
    "  0  success\n"
    "  1  any other failure (the message says what)\n"
    "  2  invalid config or usage: the message names each dotted YAML path"
)
_MODEL_ENV = (
    "  HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, MODELSCOPE_OFFLINE\n"
    "                       offline mode: a hub id not in the local cache is an error, not a download\n"
    "  USE_HF               1: models come from the Hugging Face hub (default: ModelScope, as ms-swift)\n"
    "  HF_HOME, HF_HUB_CACHE, MODELSCOPE_CACHE\n"
    "                       where the hubs' local caches are looked up\n"
    "  KDCOMPOSE_CACHE      kdcompose's cache folder (ms-swift names; default ~/.cache/kdcompose)"
)
_LAUNCH_ENV = (
    "  NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT\n"
    "                       run on several processes / nodes (re-launched under torch.distributed.run)\n"
    "  KDCOMPOSE_TEACHER_SERVER_API_KEY, KDCOMPOSE_TEACHER_SERVER_TIMEOUT_S, _WAIT_S, _RETRIES, _BACKOFF_S\n"
    "                       teacher servers (docs/teacher_server.md)\n"
    "  KDCOMPOSE_RESUME_ALLOW_CHANGES\n"
    "                       1: resume although the config changed since the checkpoint\n"
    "  KDCOMPOSE_RESUME_INCOMPLETE\n"
    "                       1: resume from a checkpoint without kdcompose's completion marker\n"
    "  KDCOMPOSE_SIGTERM_GRACE_S\n"
    "                       seconds after SIGTERM to save before exiting at once (default 300; 0: no limit)\n"
    "  KDCOMPOSE_SAVE_ON_SIGINT\n"
    "                       1: the first Ctrl-C saves a checkpoint and stops like SIGTERM\n"
    "  KDCOMPOSE_ALLOW_UNTESTED_SWIFT\n"
    "                       1: run with an ms-swift version outside the tested range\n"
    "  KDCOMPOSE_DEBUG      1: an ms-swift start-up error shows its traceback, not the config message\n"
    "  (and every variable ms-swift, transformers and torch read, e.g. CUDA_VISIBLE_DEVICES)"
)


def _help(description: str, exit_codes: str = _EXIT_CONFIG, env: str = "  none") -> dict[str, str]:
    return {
        "description": textwrap.fill(description, 88),
        "epilog": f"exit codes:\n{exit_codes}\n\nenvironment variables:\n{env}",
    }


COMMAND_HELP: dict[str, dict[str, str]] = {
    "validate": _help(
        "Check a config as `kdcompose train` would, without loading a model: the loss composition "
        "(legacy knobs included), every ms-swift argument name, the settings kdcompose refuses, the "
        "teachers and caches, and the models' own files (config.json, tokenizer): paths or cached hub "
        "ids, model_type and template known to ms-swift and fitting the checkpoint, feature widths "
        "(a missing projector), vocabularies. Prints the terms table and the loss formula.",
        env=_MODEL_ENV,
    ),
    "schema": _help(
        "Print the JSON Schema of the config (for editors): every section with ms-swift's arguments "
        "(when ms-swift is installed), kdcompose's own keys and every registered term type, "
        "including installed plug-ins and those named with --plugin.",
        env="  KDCOMPOSE_CACHE      kdcompose's cache folder",
    ),
    "train": _help(
        "Train with ms-swift's GKD pipeline and the config's loss composition. Runs every check of "
        "`validate` first (a bad config costs seconds, not a model load), prints the loss formula, "
        "and at the end the run folder, its logging.jsonl and the last checkpoint.",
        exit_codes=_EXIT_CONFIG
        + "\n  75  stopped by SIGTERM after saving a complete checkpoint of the reached step (--resume)"
        + "\n  130  interrupted (Ctrl-C); complete checkpoints saved so far are kept"
        + "\n  143  stopped by SIGTERM without a new checkpoint (second SIGTERM, or the grace period ended)",
        env=_MODEL_ENV + "\n" + _LAUNCH_ENV,
    ),
    "demo": _help(
        "Distillation working, measured, on CPU. Trains a tiny teacher VLM on many synthetic pictures "
        "(once; cached), builds a student from it, then trains the student on a few labelled pictures "
        "twice through `kdcompose train`: with lm_jsd + ce + visual_kd (distilled) and with ce only "
        "(the control; same data, steps and seed). Scores all three on held-out pictures, prints the "
        "table and writes summary.json and plot.png into the output folder.",
        exit_codes="  0  success\n  1  a training run failed (its train.log is shown)\n  2  bad options",
        env="  KDCOMPOSE_CACHE      where the teacher, student and data are built (~/.cache/kdcompose)",
    ),
    "plugin-path": _help(
        "Print the path of the ms-swift plugin file, for `swift rlhf ... --external_plugins PATH`.",
        exit_codes="  0  success",
    ),
    "torchvision-hook": _help(
        "A CUDA build of torchvision cannot be imported next to a CPU torch. kdcompose's own commands "
        "fix that in their process; `install` adds a one-line start-up hook to site-packages "
        "(kdcompose_torchvision.pth) so every Python process gets the fix too -- the child processes "
        "`swift rlhf` starts, and your own scripts. It does nothing where torchvision works "
        "(docs/installation.md). Opt-in: nothing is installed until you run this.",
        exit_codes="  0  success",
        env="  KDCOMPOSE_DISABLE_TORCHVISION_HOOK   set to 1 to turn an installed hook off",
    ),
    "plot": _help(
        "Draw a run's loss composition from its logging.jsonl into a PNG: the weighted terms stacked "
        "under the total, then one panel per term on its own y scale (its parts dashed, its evaluation "
        "points, its diagnostics on a right axis). A term skipped on a step is a gap.",
        exit_codes="  0  success\n  1  matplotlib is not installed\n  2  no run log there, nothing to plot",
        env="  MPLBACKEND           matplotlib's backend (a file backend is used by default)",
    ),
    "teacher-cache": _help(
        "Run the config's teacher once over the training data and store its top-K log-probabilities, "
        "so training can read them with `rlhf.teacher_cache: DIR` instead of loading the teacher "
        "(docs/teacher_cache.md). Re-running the same command resumes.",
        env=_MODEL_ENV + "\n  NPROC_PER_NODE       build with several processes (one per GPU)",
    ),
    "serve-teacher": _help(
        "Serve a teacher's top-K log-probabilities over HTTP for ms-swift's `teacher_model_server` "
        "and `rlhf.teachers.NAME.server` (GET /health, POST /infer/; docs/teacher_server.md).",
        exit_codes="  0  stopped normally\n  1  the model could not be loaded or served\n  2  bad options",
        env=_MODEL_ENV,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from kdcompose import __version__

    parser = argparse.ArgumentParser(
        prog="kdcompose",
        description="Pluggable loss composition for knowledge distillation with ms-swift.",
        epilog="`kdcompose COMMAND -h` describes a command, its exit codes and environment variables.",
    )
    parser.add_argument(
        "--version", action="version", version=f"kdcompose {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("validate", help="check a config as train would, without loading any model")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config file(s)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"ok": true, "terms", "needs_teacher", "formula", "notes"}, or '
        '{"ok": false, "errors": [{"path", "message"}]} for an invalid config',
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="DOTTED.KEY=VALUE", help=SET_HELP
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the config (for editors)")
    p.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="also describe the terms this module or .py file registers (repeatable; as `plugins:`)",
    )
    p.set_defaults(func=_schema)

    p = sub.add_parser("train", help="train with ms-swift's GKD pipeline and the config's loss composition")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint under the config's output_dir (across ms-swift's "
        "v<N>-<time> run folders); without one, start fresh",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="DOTTED.KEY=VALUE", help=SET_HELP
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "demo",
        help="distillation on CPU: a trained tiny teacher, a distilled student, a ce-only control",
    )
    p.add_argument("--output-dir", default="kdcompose-demo", metavar="DIR", help="default: ./kdcompose-demo")
    p.add_argument(
        "--steps", type=int, default=60, metavar="N", help="optimizer steps per student (default: 60)"
    )
    p.add_argument(
        "--seed", type=int, default=42, metavar="N", help="the students' training seed (default: 42)"
    )
    p.add_argument(
        "--quick", action="store_true", help="skip the control run and score on fewer pictures (a smoke test)"
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "plugin-path", help="print the path of the ms-swift plugin (for `swift rlhf --external_plugins`)"
    )
    p.set_defaults(func=_plugin_path)

    p = sub.add_parser(
        "torchvision-hook",
        help="install / remove / show the opt-in start-up hook that makes a CUDA torchvision importable "
        "next to a CPU torch in every Python process (for `swift rlhf` and your own scripts)",
    )
    p.add_argument(
        "action",
        choices=("install", "remove", "status"),
        help="what to do (default: status)",
        nargs="?",
        default="status",
    )
    p.set_defaults(func=_torchvision_hook)

    p = sub.add_parser(
        "plot", help="draw a run's loss composition: the terms stacked, then one panel per term"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (v<N>-<time>) or its output_dir (newest)")
    p.add_argument("-o", "--output", metavar="PNG", help="output file (default: RUN/loss_composition.png)")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axes (terms of very different sizes)")
    p.set_defaults(func=_plot)

    from kdcompose.teachers import cache_cli

    p = sub.add_parser("teacher-cache", help="cache the teacher's top-K log-probabilities for training")
    cache_cli.add_arguments(p)
    p.set_defaults(func=cache_cli.run)

    from kdcompose.serve import cli as serve_cli  # light: torch/fastapi load only when it runs

    p = sub.add_parser(
        "serve-teacher", help="serve a teacher's top-K log-probs (ms-swift teacher_model_server)"
    )
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.run)

    for name, command in sub.choices.items():
        texts = COMMAND_HELP.get(name)
        if texts is not None:
            command.description = texts["description"]
            command.epilog = texts["epilog"]
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `kdcompose`: the overview, not an error
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
