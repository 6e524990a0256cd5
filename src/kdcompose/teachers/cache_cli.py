"""Arguments of ``kdcompose teacher-cache`` (kept free of heavy imports: the CLI builds every
sub-command's parser on each call)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", metavar="CONFIG", help="YAML config of the training run (its teacher and data)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="cache directory (created; re-runs resume)"
    )
    parser.add_argument(
        "--topk",
        type=int,
        metavar="K",
        help="teacher tokens kept per position (default: the config's lm_jsd.topk or gkd_logits_topk)",
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="storage dtype of the log-probabilities (default: float16)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="teacher batch size (default: per_device_train_batch_size)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=256,
        metavar="N",
        help="samples per shard file (default: 256)",
    )


def run(args: argparse.Namespace) -> int:
    from kdcompose.teachers.cache_build import run_cli

    return run_cli(
        args.config,
        args.out,
        topk=args.topk,
        dtype=args.dtype,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
    )
