"""Integrations of ropekern into model libraries.

``ropekern.integrations.hf``: run a Hugging Face ``transformers`` model's RoPE + attention through
``ropekern.rope_attention`` (``patch``, ``unpatch``, ``extend_context``). Submodules are imported
explicitly so that ``import ropekern`` never requires ``transformers``.
"""

__all__ = ["hf"]
