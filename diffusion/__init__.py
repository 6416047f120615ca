"""Score-based generative models in continuous time, in JAX/Flax (filled in as modules land)."""
