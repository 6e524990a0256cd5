"""Test-only kdcompose plugin (`plugins: [this file]`): what each rank saw and logged.

Loaded through the config's `plugins:` list, so it runs in every process of a multi-process
`kdcompose train` without changing how the run is launched. It wraps three trainer methods
and appends one JSON line per event to `$KDCOMPOSE_PROBE_DIR/rank<r>.jsonl`:

* `micro`: every micro-batch (mode, global_step, labelled tokens, images or not, the
  weighted value of each term that ran, the weight the micro-batch got);
* `log`: every row the rank logged (after kdcompose and ms-swift added their metrics);
* `end`: the trainer state's best metric when training returns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdcompose.integrations.swift.runtime import prepare_swift_import

prepare_swift_import()

from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer  # noqa: E402
from kdcompose.training.loop import KDLoop  # noqa: E402

PROBE_ENV = "KDCOMPOSE_PROBE_DIR"


def _write(trainer: KDComposeGKDTrainer, event: dict) -> None:
    folder = os.environ.get(PROBE_ENV)
    if not folder:
        return
    rank = int(trainer.accelerator.process_index)
    with open(Path(folder) / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"rank": rank, **event}) + "\n")


def _install() -> None:
    cls = KDComposeGKDTrainer
    if getattr(cls, "_rank_probe_installed", False):
        return
    cls._rank_probe_installed = True
    compute_loss, record, log, train = cls.compute_loss, KDLoop.record, cls.log, cls.train

    def probed_compute_loss(self, model, inputs, *args, **kwargs):
        model_inputs = inputs["model_inputs"]
        self._probe_batch = {
            "tokens": int((model_inputs["labels"] != -100).sum()),
            "images": model_inputs.get("pixel_values") is not None,
        }
        return compute_loss(self, model, inputs, *args, **kwargs)

    def probed_record(self, output, mode):  # self: the trainer's KDLoop
        loss = record(self, output, mode)
        trainer = self.host
        terms = {r.metric_key: float(r.weighted) for r in output.terms}
        event = {"event": "micro", "mode": mode, "global_step": int(trainer.state.global_step)}
        event.update(getattr(trainer, "_probe_batch", {}), terms=terms, weight=self.batch_weight(mode))
        _write(trainer, event)
        return loss

    def probed_log(self, logs, *args, **kwargs):
        result = log(self, logs, *args, **kwargs)
        row = {k: v for k, v in logs.items() if isinstance(v, (int, float, str))}
        _write(self, {"event": "log", "global_step": int(self.state.global_step), "logs": row})
        return result

    def probed_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        _write(self, {"event": "end", "best_metric": self.state.best_metric})
        return result

    cls.compute_loss, cls.log, cls.train = probed_compute_loss, probed_log, probed_train
    KDLoop.record = probed_record


_install()
