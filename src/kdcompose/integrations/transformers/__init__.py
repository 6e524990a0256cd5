"""kdcompose in transformers' `Trainer` family (ms-swift's and TRL's trainers build on it).

`KDLoopCallback` runs the framework-neutral loop's step-boundary work (`kdcompose.training`)
from the `Trainer`'s callback events; nothing here imports ms-swift.
"""

from kdcompose.integrations.transformers.callbacks import KDLoopCallback

__all__ = ["KDLoopCallback"]
