"""lm-evaluation-harness on llada: the model `llada` (a client of `llada serve`)."""

from .model import LladaLM, ServerError
from .presets import PRESETS

__all__ = ["LladaLM", "ServerError", "PRESETS"]
