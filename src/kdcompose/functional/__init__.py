"""Pure tensor math of kdcompose: no trainer, no ms-swift, no config imports.

`generalized_jsd` is part of the public contract (signature and semantics are fixed).
"""

from kdcompose.functional.ce import masked_cross_entropy
from kdcompose.functional.cross_tokenizer import (
    AlignedBatch,
    CrossTokenizerLoss,
    TeacherLogits,
    TeacherTopK,
    cross_tokenizer_loss,
)
from kdcompose.functional.features import DISTANCES, feature_distance
from kdcompose.functional.fused_jsd import fused_linear_generalized_jsd
from kdcompose.functional.jsd import generalized_jsd, generalized_jsd_reference, generalized_jsd_sum
from kdcompose.functional.topk_jsd import (
    MISSING_MASS_MODES,
    fused_linear_topk_generalized_jsd,
    teacher_topk,
    topk_generalized_jsd,
    topk_generalized_jsd_reference,
    topk_generalized_jsd_sum,
    topk_mass,
)

__all__ = [
    "DISTANCES",
    "MISSING_MASS_MODES",
    "AlignedBatch",
    "CrossTokenizerLoss",
    "TeacherLogits",
    "TeacherTopK",
    "cross_tokenizer_loss",
    "feature_distance",
    "fused_linear_generalized_jsd",
    "fused_linear_topk_generalized_jsd",
    "generalized_jsd",
    "generalized_jsd_reference",
    "generalized_jsd_sum",
    "masked_cross_entropy",
    "teacher_topk",
    "topk_generalized_jsd",
    "topk_generalized_jsd_reference",
    "topk_generalized_jsd_sum",
    "topk_mass",
]
