"""The `kdcompose` command line.

Exit codes: 0 success, 2 invalid config or usage (message on stderr naming each offending
dotted path), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdcompose.errors import ConfigError

EXIT_INVALID = 2


def _validate(args: argparse.Namespace) -> int:
    from kdcompose.composer import build_composer, describe_terms
    from kdcompose.config import load_config

    if args.json and len(args.configs) != 1:
        print("kdcompose validate --json takes exactly one config", file=sys.stderr)
        return EXIT_INVALID
    status = 0
    for path in args.configs:
        try:
            config = load_config(path)
            _preflight(config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            status = EXIT_INVALID
            continue
        composer = build_composer(config.composition)
        rows = describe_terms(composer)
        if args.json:
            payload = {
                "terms": list(rows),
                "needs_teacher": composer.needs.teacher,
                "formula": composer.formula(),
                "llm_kd_weight": config.llm_kd_weight,
            }
            print(json.dumps(payload, indent=2))
        else:
            print(f"{path}: OK")
            print(_table(rows))
            print(f"  {composer.formula()}")
            print(f"  teacher needed: {'yes' if composer.needs.teacher else 'no'}")
    return status


def _preflight(config: object) -> None:
    """The checks `train` makes before loading a model (ms-swift argument names, rlhf_type,
    unsupported settings, teacher), when ms-swift is installed: a config that validates starts.
    Without ms-swift only kdcompose's own keys can be checked, and validate says so."""
    from kdcompose.integrations.swift.preflight import check_config, swift_importable

    if swift_importable():
        check_config(config)
    else:
        print("note: ms-swift is not installed; ms-swift argument names were not checked", file=sys.stderr)


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
    from kdcompose.json_schema import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from kdcompose.integrations.swift.launch import train

    return train(args.config)


def _demo(args: argparse.Namespace) -> int:
    from kdcompose.demo import run_demo

    return run_demo(args.output_dir, args.steps, seed=args.seed, quick=args.quick)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcompose", description="Pluggable loss composition for knowledge distillation with ms-swift."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="resolve a config's loss composition without loading any model")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config file(s)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (terms, needs_teacher, formula)"
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the config (for editors)")
    p.set_defaults(func=_schema)

    p = sub.add_parser("train", help="train with ms-swift's GKD pipeline and the config's loss composition")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "demo",
        help="distillation on CPU in a minute: a trained tiny teacher, a distilled student, a control",
        description="Train a tiny teacher VLM on many synthetic pictures (once; cached under "
        "$KDCOMPOSE_CACHE, default ~/.cache/kdcompose), then the same tiny student on a few labelled "
        "pictures twice through `kdcompose train`: with lm_jsd + ce + visual_kd (distilled) and with "
        "ce only (control). Scores all three on held-out pictures, prints the table and writes "
        "summary.json and plot.png into the output folder.",
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
        "plot",
        help="draw a run's loss composition: the terms stacked, then one panel per term",
        description="Draw a run's loss composition from its logging.jsonl: the weighted terms stacked "
        "under the total, then one panel per term on its own y scale (its parts dashed, its "
        "evaluation points, its diagnostics on a right axis). A term skipped on a step is a gap.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
