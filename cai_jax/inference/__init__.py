"""Inference: the KV-cache sampler every stage uses, its helpers, and the one
batched forward pass every scorer uses."""
