"""Training algorithms; pure loss functions live in `losses`. REGISTRY maps `config.algorithm` to one."""

from jaxrl_llm.algorithms import sft
from jaxrl_llm.algorithms.base import Algorithm, batch_indices

REGISTRY: dict[str, Algorithm] = {"sft": sft.ALGORITHM}

__all__ = ["REGISTRY", "Algorithm", "batch_indices"]
