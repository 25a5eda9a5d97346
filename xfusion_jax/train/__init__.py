"""The generic training loop and the model families it trains."""
