"""llmlab: declarative LLM training experiments on Hydra and Lightning."""
