"""Hugging Face transformers integration: ``tp.patch`` / ``tp.prune`` on models and processors."""

from tokenprune.integrations.hf.adapters import get_adapter, supported_architectures
from tokenprune.integrations.hf.model import patch_model

__all__ = ["patch_model", "get_adapter", "supported_architectures"]
