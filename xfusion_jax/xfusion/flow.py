"""Flow matching on autoencoder latents, and the X-Fusion training loss.

Convention: x_t = (1 - t) * x0 + t * noise, so t = 0 is the clean latent and
t = 1 pure noise; the model predicts the velocity noise - x0. Training times
are logit-normal, t = sigmoid(n) with n ~ N(0, 1), as in Stable Diffusion 3.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def logit_normal_times(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.nn.sigmoid(jax.random.normal(rng, shape))


def noisy_latents(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Interpolate `[batch, images, h, w, c]` latents to times t `[batch, images]`."""
  t = t[..., None, None, None]
  return (1.0 - t) * x0 + t * noise


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array,
                           weights: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the positions with weight 1."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def velocity_loss(predicted: jax.Array, target: jax.Array,
                  weights: jax.Array) -> jax.Array:
  """Mean squared error per image, averaged over images with weight 1.

  Args:
    predicted: `[batch, images, h, w, c]`.
    target: same shape.
    weights: `[batch, images]`.
  """
  per_image = jnp.mean(jnp.square(predicted - target), axis=(2, 3, 4))
  return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def euler_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 noise: jax.Array, steps: int) -> jax.Array:
  """Integrate from t = 1 (noise) to t = 0 with `steps` Euler steps.

  Args:
    velocity_fn: `(x_t, t [batch, images]) -> velocity`, guidance included.
    noise: `[batch, images, h, w, c]` starting point.
    steps: number of steps.
  """
  times = jnp.linspace(1.0, 0.0, steps + 1)

  def step(x, i):
    t, t_next = times[i], times[i + 1]
    t_batch = jnp.full(noise.shape[:2], t)
    return x + (t_next - t) * velocity_fn(x, t_batch), None

  x, _ = jax.lax.scan(step, noise, jnp.arange(steps))
  return x


def guided(velocity_cond: jax.Array, velocity_uncond: jax.Array,
           scale: float) -> jax.Array:
  """Classifier-free guidance: uncond + scale * (cond - uncond)."""
  return velocity_uncond + scale * (velocity_cond - velocity_uncond)


