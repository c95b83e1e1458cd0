"""jaxrl_llm: post-training of LLMs (SFT, DPO, reward models, GRPO; PPO planned) in JAX on one device mesh."""

__version__ = "0.1.0"
