"""cai-jax: Constitutional AI (Bai et al. 2022) end to end in JAX."""
