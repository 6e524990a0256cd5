"""kdcompose as an ms-swift plugin: train `swift rlhf` GKD runs with the composed loss.

Usage (ms-swift 4.6)::

    swift rlhf --rlhf_type gkd --model STUDENT --teacher_model TEACHER --dataset data.jsonl \\
        --external_plugins "$(kdcompose plugin-path)" \\
        --llm_kd_weight 0.5 --loss_terms '{"ce": {"weight": 0.1}}' \\
        --visual_kd '{"weight": 1.0, "aligner": {"enabled": true}}'

or with ms-swift's flat YAML (`swift rlhf cfg.yaml --external_plugins "$(kdcompose plugin-path)"`),
where `loss_terms:`, `llm_kd_weight:` and `visual_kd:` are top-level keys next to ms-swift's.
Without any of the three keys the run trains exactly like ms-swift's stock GKD trainer.
`KDCOMPOSE_RESUME=1 swift rlhf ...` continues from the newest complete checkpoint under
`--output_dir` (what `kdcompose train CONFIG --resume` does); an incomplete
`--resume_from_checkpoint` is refused before any model loads (docs/reliability.md).

ms-swift imports this file by path while it parses the arguments (`--external_plugins`); the
work is done by `kdcompose.integrations.swift.launch.argv.activate_plugin` (see its module doc).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# ms-swift put this directory first on sys.path so that plugins can import their siblings.
# Ours are imported as `kdcompose.integrations.swift.*`; leaving it there would make them
# importable as top-level `args`, `metrics`, ... and shadow any such module.
while _HERE in (os.path.abspath(p) for p in sys.path[:1]):
    sys.path.pop(0)

from kdcompose.integrations.swift.launch.argv import activate_plugin  # noqa: E402

activate_plugin()
