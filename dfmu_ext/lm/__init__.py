"""Causal language models: the task (samples, next-token loss), their MLP neurons, and DFMU for them.

A causal-LM sample is a Hugging Face dict ``{"input_ids", "attention_mask"?, "labels"}`` whose
``labels`` are the token ids to score and ``-100`` where nothing is scored; the model shifts them
itself (position ``t``'s logits predict ``labels[t + 1]``).
"""
from .task import IGNORE_INDEX, TASKS, TokenSequences, detect_task, is_lm_sample, lm_loss, sequence_nll, token_nll

__all__ = ["IGNORE_INDEX", "TASKS", "TokenSequences", "detect_task", "is_lm_sample", "lm_loss", "sequence_nll",
           "token_nll"]
