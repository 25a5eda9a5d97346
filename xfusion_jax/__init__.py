"""xfusion_jax: train new towers beside a frozen pretrained LLM."""
