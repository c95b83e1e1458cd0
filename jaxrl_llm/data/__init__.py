"""Datasets, chat templates, loss masks and batching."""

from jaxrl_llm.data.chat import DataError, tokenize_conversation
from jaxrl_llm.data.sources import builtin_sources, load_rows

__all__ = ["DataError", "builtin_sources", "load_rows", "tokenize_conversation"]
