"""Inference: the KV-cache sampler every stage uses, its helpers, the one
batched forward pass, and the scorers built on it (multiple-choice options for
AI feedback, preference models for PPO and evaluation)."""
