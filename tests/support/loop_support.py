"""Shared pieces of the trainer-loop tests (telemetry, scale-out, resume, faults).

Everything is real: tiny local Qwen2-VL models, ms-swift 4.6's pipeline and trainer loop.
`probe_micro_batches` watches what the trainer recorded per micro-batch (it wraps, does not
replace, `KDLoop.record`), so a test can recompute a logged window from the
micro-batches independently of the aggregation code under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kdcompose.testing import build_caption_dataset, load_rows

STEP_KEY = "global_step/max_steps"


def image_rows(n: int = 32) -> list[dict[str, Any]]:
    return load_rows(build_caption_dataset(n=n, seed=0, image=True))


def uneven_rows() -> list[dict[str, Any]]:
    """Four rows with deliberately uneven label counts: an image caption (15 labelled tokens),
    a text answer (31), and two prompts without an answer (0 labelled tokens, no image)."""
    return [
        image_rows()[0],
        {
            "messages": [
                {"role": "user", "content": "Describe a small red square on a white background in detail."},
                {
                    "role": "assistant",
                    "content": "The picture shows a small red square in the center on a white background, "
                    "and nothing else is in it.",
                },
            ]
        },
        {"messages": [{"role": "user", "content": "Say hi, please, in a friendly way."}]},
        {"messages": [{"role": "user", "content": "Say a word."}]},
    ]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@contextmanager
def probe_micro_batches() -> Iterator[list[dict[str, Any]]]:
    """Collect, per micro-batch: mode, global_step, the weighted value of each term that ran
    (`terms`), the total, and the weight the trainer gave the micro-batch."""
    from kdcompose.training.loop import KDLoop

    records: list[dict[str, Any]] = []
    original = KDLoop.record

    def record(self, output, mode):
        loss = original(self, output, mode)
        records.append(
            {
                "mode": mode,
                "global_step": int(self.host.state.global_step),
                "terms": {r.metric_key: float(r.weighted) for r in output.terms},
                "raw": {r.metric_key: float(r.raw) for r in output.terms},
                "loss": float(loss),
                "weight": self.batch_weight(mode),
            }
        )
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KDLoop, "record", record)
        yield records


def log_rows(output_dir: Path) -> list[dict[str, Any]]:
    files = sorted(Path(output_dir).glob("**/logging.jsonl"))
    assert files, f"no logging.jsonl under {output_dir}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def step_of(row: dict[str, Any]) -> int:
    return int(str(row[STEP_KEY]).split("/")[0])


def train_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "loss" in r and "train_loss" not in r]


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "eval_loss" in r]


def window_mean(records: list[dict[str, Any]], key: str, field: str = "terms") -> float | None:
    """The weighted mean of `key` over `records`, counting 0 where it did not run; None when it
    ran on none of them (the definition in docs/metrics.md, recomputed from micro-batches)."""
    if not any(key in r[field] for r in records):
        return None
    total = sum(r[field].get(key, 0.0) * r["weight"] for r in records)
    return total / sum(r["weight"] for r in records)
