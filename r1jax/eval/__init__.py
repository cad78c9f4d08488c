"""Evaluation: pass@1 over k samples, pass@k, cons@k majority vote.

Example:
    >>> from r1jax.eval import pass_at_k
    >>> pass_at_k(n=2, c=2, k=1)
    1.0
"""

from r1jax.eval.metrics import answer_key, majority_vote, parse_pass_at, pass_at_k, summarize
from r1jax.eval.run import ProgressMismatch, check_reward, decode_completions, encode_prompts, evaluate

__all__ = ["ProgressMismatch", "answer_key", "check_reward", "decode_completions", "encode_prompts", "evaluate",
           "majority_vote", "parse_pass_at", "pass_at_k", "summarize"]
