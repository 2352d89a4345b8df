"""Model wrappers: `NNsight` for any module, `LanguageModel` for Hugging Face causal LMs."""

from .base import NNsight
from .language import LanguageModel
from .registry import models

__all__ = ["LanguageModel", "NNsight", "models"]
