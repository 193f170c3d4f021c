"""Evaluation: perplexity, tasks, fine-tuning gain and attacker cost."""
