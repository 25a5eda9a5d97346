"""Pre-encoded latents match the encoder and feed the pipeline."""

import dataclasses
import importlib.util

import jax
import numpy as np
import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle

from xfusion_jax.autoencoder import interface
from xfusion_jax.autoencoder import modules
from xfusion_jax.data import datasets
from xfusion_jax.data import decode
from xfusion_jax.data import encode_latents
from xfusion_jax.data import pipeline


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.prepare("emoji_captions", data_dir)
  config = modules.AutoencoderConfig(
      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
      latent_channels=4, scaling_factor=0.5, shift_factor=0.1)
  ae = interface.ImageAutoencoder(
      config, interface.init_params(config, jax.random.key(0), 8))
  folder = encode_latents.encode_latents("emoji_captions", ae,
                                         data_dir=data_dir, batch_size=100)
  return data_dir, ae, folder


def test_latents_match_encoder(written):
  data_dir, ae, folder = written
  images = datasets.data_source("emoji_captions", "test", data_dir)
  latents = datasets.data_source(folder, "test")
  by_id = {latents[i]["id"]: latents[i] for i in range(len(latents))}

  assert len(latents) == len(images) == 135
  for index in (0, 70, 134):
    record = images[index]
    pixels = record["image"][None].astype(np.float32) / 127.5 - 1.0
    mean, logvar = ae.moments(pixels)
    stored = by_id[record["id"]]
    assert stored["latent_mean"].shape == (32, 32, 4)
    np.testing.assert_allclose(stored["latent_mean"], mean[0], atol=1e-5)
    np.testing.assert_allclose(stored["latent_logvar"], logvar[0], atol=1e-5)
    assert stored["caption"] == record["caption"]
    assert stored["label"] == record["label"]


def test_second_call_reuses_dataset(written):
  data_dir, ae, folder = written
  before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

  again = encode_latents.encode_latents("emoji_captions", ae,
                                        data_dir=data_dir)

  assert again == folder
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_split_above_tfds_buffer_is_written(written, tmp_path, monkeypatch):
  # Above its buffer size, tfds spills to disk through TensorFlow, which
  # xfusion_jax does not install. A buffer of one byte makes every split
  # exceed it.
  data_dir, ae, _ = written
  monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 1)

  folder = encode_latents.encode_latents(
      "emoji_captions", ae, data_dir=data_dir, output_dir=tmp_path,
      batch_size=100)

  assert len(datasets.data_source(folder, "test")) == 135
  assert tfds_shuffle.MAX_MEM_BUFFER_SIZE == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow, tfds spills to disk")
def test_split_beyond_memory_is_rejected(written, tmp_path, monkeypatch):
  data_dir, ae, _ = written
  monkeypatch.setattr(datasets, "_available_memory_bytes", lambda: 10_000)

  with pytest.raises(MemoryError, match="Install TensorFlow"):
    encode_latents.encode_latents("emoji_captions", ae, data_dir=data_dir,
                                  output_dir=tmp_path)


def test_pipeline_samples_latents(written):
  _, _, folder = written
  config = pipeline.PipelineConfig(
      dataset=str(folder), split="train", batch_size=16, num_epochs=1,
      shuffle=False, decode=decode.DecodeConfig(image_channels=3))
  source = datasets.data_source(folder, "train")

  batch = next(iter(pipeline.make_dataset(config, None, process_index=0,
                                          process_count=1)))

  assert "image" not in batch
  assert batch["latents"].shape == (16, 32, 32, 4)
  means = np.stack([source[i]["latent_mean"] for i in range(16)])
  stds = np.exp(0.5 * np.stack([source[i]["latent_logvar"]
                                for i in range(16)]))
  noise = (batch["latents"] - means) / stds
  assert abs(np.mean(noise)) < 0.05
  assert 0.95 < np.std(noise) < 1.05
  again = next(iter(pipeline.make_dataset(
      dataclasses.replace(config), None, process_index=0, process_count=1)))
  np.testing.assert_array_equal(again["latents"], batch["latents"])
