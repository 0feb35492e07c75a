"""Evaluations of a loaded model: perplexity now; KL divergence and HumanEval in later issues."""
