"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def schedule(o: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """``rsqrt``: T5's lr * sqrt(warmup / max(step, warmup)) - constant, then 1/sqrt decay.

  ``cosine``: linear warmup then cosine decay to 0 at ``num_steps``; ``constant``.
  """
  if o.schedule == 'rsqrt':
    warmup = max(o.warmup_steps, 1)
    return lambda step: o.learning_rate * jnp.sqrt(warmup / jnp.maximum(step, warmup))
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps,
                                              max(num_steps, o.warmup_steps + 1))
  return optax.constant_schedule(o.learning_rate)


def make_optimizer(o: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  lr = schedule(o, num_steps)
  if o.name == 'adafactor':
    # T5 settings: factored second moments, update clipping at 1, scaled by parameter RMS.
    tx = optax.adafactor(lr, decay_rate=0.8, clipping_threshold=1.0,
                         multiply_by_parameter_scale=True,
                         weight_decay_rate=o.weight_decay or None)
  elif o.name == 'adamw':
    tx = optax.adamw(lr, b1=0.9, b2=0.98, weight_decay=o.weight_decay)
  else:
    raise ValueError(f'optim.name={o.name!r}: expected "adafactor" or "adamw"')
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx
