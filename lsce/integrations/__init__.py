"""Adapters that put lsce under other libraries' training loops.

Each submodule imports its library on first use, so ``import lsce`` never
needs them: ``lsce.integrations.transformers`` needs ``pip install 'lsce[transformers]'``.
"""
