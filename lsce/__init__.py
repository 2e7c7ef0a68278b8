"""lsce: fused label-smoothed cross-entropy for PyTorch.

    import lsce
    loss = lsce.cross_entropy(logits, target, label_smoothing=0.1)
    crit = lsce.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
"""

from .functional import cross_entropy
from .modules import CrossEntropyLoss
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .distillation import distillation_loss, linear_distillation_loss
from . import linear_soft  # noqa: E402,F401  (registers the probability-target ops of linear_cross_entropy)
from . import distributed  # noqa: E402  (lsce.distributed.vocab_parallel_*)
from .cache import empty_cache
from . import integrations  # noqa: E402  (lsce.integrations.transformers; transformers itself is imported on use)

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss", "distillation_loss",
           "linear_distillation_loss", "empty_cache"]
__version__ = "0.1.0"
