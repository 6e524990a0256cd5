"""The framework-neutral training core: what turns a composer into a training loss.

Nothing here imports ms-swift or transformers' `Trainer`: the context builder (forwards and
taps -> `LossContext`), module and LM-head taps, projectors, the loop bookkeeping behind its
host protocol (telemetry, token normalization, the NaN/inf guard, resume records), engine
helpers, and `Distiller`, the object a plain PyTorch / Accelerate / TRL script distils with.
Framework adapters (`kdcompose.integrations.*`) are thin layers over it.
"""
