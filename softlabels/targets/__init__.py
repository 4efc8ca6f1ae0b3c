"""Target kinds behind one interface (``base.TargetKind``): ``topk`` and ``sample`` are registered here;
another kind is one module that calls ``register``. See ``softlabels.targets.base``."""

from .base import (BatchTargets, HostTargets, RowTargets, TargetKind, all_batch_keys, all_logprob_columns, all_soft_columns, soft_columns, kind_named, kind_of, kind_of_batch,
                   kind_of_columns, register, registered, unregister)
from .sampled import SAMPLED, Sampled
from .topk import TOPK, TopK

__all__ = ["TargetKind", "BatchTargets", "HostTargets", "RowTargets", "register", "unregister", "registered", "kind_named", "kind_of",
           "kind_of_columns", "kind_of_batch", "all_soft_columns", "all_logprob_columns", "all_batch_keys", "soft_columns", "TopK", "Sampled", "TOPK", "SAMPLED"]
