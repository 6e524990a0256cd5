"""Pure tensor math of kdcompose: no trainer, no ms-swift, no config imports.

`generalized_jsd` is part of the public contract (signature and semantics are fixed). Every
LM-head divergence runs on one chunk engine (`kdcompose.functional.engine`): the
`*_generalized_jsd` functions are the engine with the `jsd` divergence, the `*divergence_loss`
functions take any divergence (`kdcompose.functional.divergences`, docs/divergences.md).
"""

from kdcompose.functional._checks import MISSING_MASS_MODES
from kdcompose.functional.ce import masked_cross_entropy
from kdcompose.functional.cross_tokenizer import (
    AlignedBatch,
    CrossTokenizerLoss,
    TeacherLogits,
    TeacherTopK,
    cross_tokenizer_loss,
)
from kdcompose.functional.divergences import (
    AdaptiveKL,
    AlphaBeta,
    ChunkOps,
    Divergence,
    DivergenceParams,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
    get_divergence,
)
from kdcompose.functional.features import DISTANCES, feature_distance
from kdcompose.functional.fused_jsd import fused_linear_generalized_jsd
from kdcompose.functional.jsd import generalized_jsd, generalized_jsd_reference, generalized_jsd_sum
from kdcompose.functional.kd import (
    divergence_loss,
    divergence_loss_sum,
    fused_linear_divergence_loss,
    fused_linear_topk_divergence_loss,
    topk_divergence_loss,
)
from kdcompose.functional.tokens import TokenSelection
from kdcompose.functional.topk_jsd import (
    fused_linear_topk_generalized_jsd,
    teacher_topk,
    topk_generalized_jsd,
    topk_generalized_jsd_reference,
    topk_generalized_jsd_sum,
    topk_mass,
)
from kdcompose.functional.vocab_parallel import VocabParallel

__all__ = [
    "DISTANCES",
    "MISSING_MASS_MODES",
    "AdaptiveKL",
    "AlignedBatch",
    "AlphaBeta",
    "ChunkOps",
    "CrossTokenizerLoss",
    "Divergence",
    "DivergenceParams",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "TeacherLogits",
    "TeacherTopK",
    "TokenSelection",
    "TotalVariation",
    "VocabParallel",
    "cross_tokenizer_loss",
    "divergence_loss",
    "divergence_loss_sum",
    "feature_distance",
    "fused_linear_divergence_loss",
    "fused_linear_generalized_jsd",
    "fused_linear_topk_divergence_loss",
    "fused_linear_topk_generalized_jsd",
    "generalized_jsd",
    "generalized_jsd_reference",
    "generalized_jsd_sum",
    "get_divergence",
    "masked_cross_entropy",
    "teacher_topk",
    "topk_divergence_loss",
    "topk_generalized_jsd",
    "topk_generalized_jsd_reference",
    "topk_generalized_jsd_sum",
    "topk_mass",
]
