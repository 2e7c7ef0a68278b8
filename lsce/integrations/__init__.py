"""Adapters that put lsce under other libraries' training loops (``transformers``;
``trl``, imported on its own: ``from lsce.integrations.trl import SFTTrainer``).

Each submodule imports its library on first use, so ``import lsce`` makes
them reachable without needing the library: ``lsce.integrations.transformers``
needs ``pip install 'lsce[transformers]'`` when it is used.
"""

from . import fsdp, transformers  # noqa: F401
