"""Where a finished run left its files: the lines `kdcompose train` prints at the end.

Why: ms-swift writes each run into a fresh `<output_dir>/v<N>-<time>/` folder and mentions
it once, thousands of log lines before the end; the first thing a user wants after training
is that folder (for `kdcompose plot`, TensorBoard or the next `--resume`), its
`logging.jsonl` and the checkpoint to use.

The folder is found from what ms-swift returns (`last_model_checkpoint` sits inside it);
without a checkpoint (`save_strategy: no`) it is the highest-numbered `v<N>-*` folder under
the output directory holding a `logging.jsonl` (ms-swift numbers them in order), or the
output directory itself when versioning is off. ms-swift's default output directory
(`output/<model name>`, named by ms-swift itself) is used when the config sets none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompose.integrations.swift.launch.resume_point import output_dir_of

LOG_FILE = "logging.jsonl"
_VERSION = re.compile(r"^v(\d+)-")


@dataclass(frozen=True)
class RunFiles:
    folder: Path | None
    log: Path | None
    checkpoint: Path | None

    def lines(self) -> list[str]:
        if self.folder is None:
            return ["kdcompose: run finished (its folder could not be found under the output directory)"]
        return [
            f"kdcompose: run folder: {self.folder}",
            f"kdcompose: logging:    {self.log if self.log is not None else '(no logging.jsonl written)'}",
            f"kdcompose: checkpoint: {self.checkpoint if self.checkpoint is not None else '(none saved)'}",
        ]


def run_files(result: Any, swift_args: Mapping[str, Any]) -> RunFiles:
    """The run folder, log and last checkpoint of a finished run (`result`: rlhf_main's return)."""
    checkpoint = None
    if isinstance(result, Mapping) and isinstance(result.get("last_model_checkpoint"), str):
        checkpoint = Path(result["last_model_checkpoint"]).resolve()
    folder = checkpoint.parent if checkpoint is not None else _newest_run(swift_args)
    log = folder / LOG_FILE if folder is not None and (folder / LOG_FILE).is_file() else None
    return RunFiles(folder, log, checkpoint)


def _newest_run(swift_args: Mapping[str, Any]) -> Path | None:
    if not swift_args.get("output_dir") and not swift_args.get("model"):
        return None
    root = output_dir_of(swift_args)
    runs = [
        (int(match.group(1)), path)
        for path in (root.iterdir() if root.is_dir() else ())
        if (match := _VERSION.match(path.name)) and (path / LOG_FILE).is_file()
    ]
    if runs:
        return max(runs)[1]
    return root if (root / LOG_FILE).is_file() else None
