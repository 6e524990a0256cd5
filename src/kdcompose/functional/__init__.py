"""Pure tensor math of kdcompose: no trainer, no ms-swift, no config imports.

`generalized_jsd` is part of the public contract (signature and semantics are fixed).
"""

from kdcompose.functional.ce import masked_cross_entropy
from kdcompose.functional.features import DISTANCES, feature_distance
from kdcompose.functional.fused_jsd import fused_linear_generalized_jsd
from kdcompose.functional.jsd import generalized_jsd, generalized_jsd_reference, generalized_jsd_sum

__all__ = [
    "DISTANCES",
    "feature_distance",
    "fused_linear_generalized_jsd",
    "generalized_jsd",
    "generalized_jsd_reference",
    "generalized_jsd_sum",
    "masked_cross_entropy",
]
