"""Training algorithms; pure loss functions live in `losses`. REGISTRY maps the offline algorithms' `config.algorithm`
(sft, dpo, rm) to one; grpo (`grpo.py`) generates its own data and runs in `jaxrl_llm.rl_train`."""

from jaxrl_llm.algorithms import dpo, rm, sft
from jaxrl_llm.algorithms.base import Algorithm, batch_indices

REGISTRY: dict[str, Algorithm] = {"sft": sft.ALGORITHM, "dpo": dpo.ALGORITHM, "rm": rm.ALGORITHM}

__all__ = ["REGISTRY", "Algorithm", "batch_indices"]
