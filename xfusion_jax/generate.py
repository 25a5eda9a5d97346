"""Generate images or captions with a trained X-Fusion model.

  python -m xfusion_jax.generate --workdir=DIR --prompt="a photo of a bag" \
      --num_images=4 --cfg_scale=5.5 --steps=30 --out=bags.png
  python -m xfusion_jax.generate --workdir=DIR --task=caption --image=FILE
"""

from absl import app

from xfusion_jax import hostenv
from xfusion_jax.xfusion import cli

if __name__ == "__main__":
  hostenv.restart_with_hugepage_malloc()
  app.run(cli.generate_main)
