"""Small configs and synthetic batches shared by the tests."""

import numpy as np
from flax import nnx

from switchmoe.config import default_config


def tiny_config(arch='encoder_decoder', **moe):
  """A model small enough to compile and step in about a second on the CPU."""
  c = default_config()
  m = c.model
  m.arch = arch
  c.data.objective = 'span_corruption' if arch == 'encoder_decoder' else 'causal_lm'
  m.d_model, m.num_layers, m.num_heads, m.d_kv, m.d_ff = 32, 2, 2, 16, 64
  m.moe.num_experts, m.moe.every, m.moe.group_size = 8, 1, 32
  m.moe.update(moe)
  c.data.inputs_length, c.data.targets_length = 32, 16
  c.train.batch_size = 8
  c.optim.name, c.optim.schedule, c.optim.learning_rate = 'adamw', 'constant', 1e-3
  return c


def pad_row_0(x_BxLxD, pad_from):
  """(x_BxLxD, valid_BxL): a copy of x whose row 0 is padding from ``pad_from`` on, every
  padding token the same vector (as padding embeddings are): row 1's first token, so padding
  prefers that token's expert(s)."""
  x = x_BxLxD.copy()
  valid = np.ones(x.shape[:2], bool)
  valid[0, pad_from:] = False
  x[0, pad_from:] = x[1, 0]
  return x, valid


def random_batch(c, seed=0):
  """Random tokens in the batch layout of switchmoe.data (padding at the ends of rows)."""
  rng = np.random.default_rng(seed)
  b, li, lt = c.train.batch_size, c.data.inputs_length, c.data.targets_length
  targets = rng.integers(3, 359, (b, lt)).astype(np.int32)
  targets[:, lt - 3:] *= (rng.random((b, 1)) < 0.5)  # some rows end in padding
  batch = {
      'decoder_target_tokens': targets,
      'decoder_input_tokens': np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
      'decoder_loss_weights': (targets > 0).astype(np.float32),
  }
  if c.model.arch == 'encoder_decoder':
    inputs = rng.integers(3, 359, (b, li)).astype(np.int32)
    inputs[:, li - 5:] = 0
    batch['encoder_input_tokens'] = inputs
  return batch


def moe_config(*, causal=False, expert_parallel='gspmd', **fields):
  """A `MoeConfig` from default_config()'s model.moe with ``fields`` (model.moe names, e.g.
  router='topk', num_selected=2) changed."""
  from switchmoe.moe import MoeConfig
  moe = default_config().model.moe
  moe.update(fields)
  return MoeConfig.from_config(moe, causal=causal, expert_parallel=expert_parallel)


def routing_options(**fields):
  """The `RoutingOptions` of `moe_config` (an encoder stack's)."""
  return moe_config(**fields).routing


# --------------------------------------------------------------------------------------------
# MoE layer helpers shared by test_moe.py and test_dispatch.py ([B, L, D] = [2, 8, 4] there).


def random_x(seed, shape=(2, 8, 4)):
  """A float32 N(0, 1) batch of the MoE layer tests' [B, L, D] shape."""
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def weights(layer):
  """A MoeLayer's router and routed-expert weights as NumPy arrays (wi_gate None unless
  GEGLU): the ``w`` of tests/moe_reference.py."""
  gate = layer.experts.wi_gate
  return {
      'router': np.asarray(layer.router.kernel[...]),
      'wi': np.asarray(layer.experts.wi[...]),
      'wo': np.asarray(layer.experts.wo[...]),
      'wi_gate': None if gate is None else np.asarray(gate[...]),
  }


@nnx.jit(static_argnames='deterministic')
def call(layer, x, deterministic=True, rngs=None, valid=None):
  """A MoeLayer call under nnx.jit: (y, the call's `MoeStats` as one dict)."""
  y, stats = layer(x, deterministic=deterministic, rngs=rngs, valid_BxL=valid)
  return y, stats.as_dict()
