"""Model adapters: one surface over local HF folders and OpenAI-compatible endpoints."""
from audit.adapters.base import Audio, Capabilities, ModalitySpan, ModelAdapter, Query
from audit.adapters.loading import load_adapter

__all__ = ["Audio", "Capabilities", "ModalitySpan", "ModelAdapter", "Query", "load_adapter"]
