"""lsce: fused label-smoothed cross-entropy for PyTorch.

    import lsce
    loss = lsce.cross_entropy(logits, target, label_smoothing=0.1)
    crit = lsce.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
"""

from .functional import cross_entropy
from .modules import CrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss"]
__version__ = "0.1.0"
