"""Model wrappers: `NNsight` for any module, `LanguageModel` for Hugging Face causal LMs."""

from .base import NNsight

__all__ = ["NNsight"]
