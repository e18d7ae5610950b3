"""Losses and the token-level quantities they are built from; pick variants by Hydra ``_target_``."""
from llmlab.losses.dpo import DPOLoss, DPOOutput, IPOLoss
from llmlab.losses.kto import KTOLoss, KTOOutput
from llmlab.losses.lm import (
    IGNORE_INDEX,
    causal_lm_loss,
    causal_lm_loss_sum,
    chunked_causal_lm_loss_sum,
    entropy_from_logits,
    gather_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from llmlab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    kl_penalized_rewards,
    leave_one_out_centered,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from llmlab.losses.reference_free import ORPOLoss, SimPOLoss
from llmlab.losses.reward import PairwiseRewardLoss, pairwise_accuracy

__all__ = [
    "IGNORE_INDEX", "causal_lm_loss", "causal_lm_loss_sum", "chunked_causal_lm_loss_sum", "sequence_logprobs", "token_logprobs",
    "entropy_from_logits", "gather_logprobs", "PairwiseRewardLoss", "pairwise_accuracy", "DPOLoss", "IPOLoss", "DPOOutput",
    "KTOLoss", "KTOOutput", "ORPOLoss", "SimPOLoss",
    "masked_mean", "masked_var", "masked_whiten", "gae_advantages", "ppo_policy_loss", "ppo_value_loss",
    "AdaptiveKLController", "FixedKLController", "kl_penalized_rewards", "leave_one_out_centered",
]
