"""Pure loss functions and advantage estimators (the public `jaxrl_llm.losses` of DESIGN.md)."""

from jaxrl_llm.algorithms.advantages import (
    ADV_ESTIMATORS,
    gdpo_advantages,
    reinforce_pp_advantages,
    scale_rewards,
    stop_properly_penalty,
)
from jaxrl_llm.algorithms.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    bradley_terry_loss_sum,
    dpo_loss,
    dpo_loss_sum,
    next_token_nll_sum,
    sequence_logprobs,
    token_logprobs,
)
from jaxrl_llm.algorithms.pg_losses import (
    KL_TYPES,
    TIS_TYPES,
    grpo_advantages,
    kl_penalty,
    policy_gradient_loss,
    policy_gradient_loss_sum,
)

__all__ = [
    "ADV_ESTIMATORS",
    "DPO_LOSS_TYPES",
    "KL_TYPES",
    "TIS_TYPES",
    "bradley_terry_loss",
    "bradley_terry_loss_sum",
    "dpo_loss",
    "dpo_loss_sum",
    "gdpo_advantages",
    "grpo_advantages",
    "kl_penalty",
    "next_token_nll_sum",
    "policy_gradient_loss",
    "policy_gradient_loss_sum",
    "reinforce_pp_advantages",
    "scale_rewards",
    "sequence_logprobs",
    "stop_properly_penalty",
    "token_logprobs",
]
