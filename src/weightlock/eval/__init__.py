"""Evaluation, after attacks and before the report: perplexity, tasks (what an attacker fine-tunes for),
fidelity of a lock to its original, lm-evaluation-harness tasks, attacker cost (memory, FLOPs, time), cost
to a target gain, and that cost predicted from a model's config alone (``eval.plan``)."""
