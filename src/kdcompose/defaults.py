"""ms-swift 4.6's GKD defaults, in one place.

A config that sets no new field must train exactly like ms-swift's stock GKD trainer, so
when `rlhf.beta`, `rlhf.temperature` or `rlhf.sft_alpha` is absent we use the values
`swift.arguments.RLHFArguments` would use for `rlhf_type: gkd`. A test pins these against
the installed ms-swift.
"""

from __future__ import annotations

SWIFT_GKD_BETA = 0.5
SWIFT_GKD_TEMPERATURE = 0.9
SWIFT_GKD_SFT_ALPHA = 0.0
LLM_KD_WEIGHT_DEFAULT = 1.0
IGNORE_INDEX = -100
