"""Export a trained X-Fusion model: the LLM as an HF folder plus its towers.

  python -m xfusion_jax.export --workdir=DIR --out=EXPORT_DIR
"""

from absl import app

from xfusion_jax.xfusion import cli

if __name__ == "__main__":
  app.run(cli.export_main)
