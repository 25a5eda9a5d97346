"""Entry point of `python -m xfusion_jax.train`; see `xfusion_jax.train.cli`."""

from xfusion_jax.train import cli

if __name__ == "__main__":
  cli.run()
