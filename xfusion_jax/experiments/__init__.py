"""Experiments built on the training job: the X-Fusion ablation harness."""
