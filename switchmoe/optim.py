"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import jax
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
  """The optimizer alone: gradient clipping happens in the train step, next to the
  non-finite guard that needs the same global norm.

  The optimizer-state tree depends on ``optim.name`` only (weight decay 0 is still a
  transform), so a run can resume with other optim values.
  """
  lr = schedule(o, num_steps)
  if o.name == 'adafactor':
    # T5 settings: factored second moments, update clipping at 1, scaled by parameter RMS.
    return optax.adafactor(lr, decay_rate=0.8, clipping_threshold=1.0,
                           multiply_by_parameter_scale=True, weight_decay_rate=o.weight_decay)
  if o.name == 'adamw':
    return optax.adamw(lr, b1=0.9, b2=0.98, weight_decay=o.weight_decay)
  raise ValueError(f'optim.name={o.name!r}: not an option; allowed: \'adafactor\', \'adamw\'')


def clip_by_global_norm(grads, norm: jax.Array, max_norm: float):
  """Scales ``grads`` (whose global norm is ``norm``) down to ``max_norm``; 0 = no clipping."""
  if max_norm <= 0:
    return grads
  scale = jnp.minimum(1.0, max_norm / norm)
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
