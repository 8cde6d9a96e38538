"""Packed rows and the prefix LM: attention never crosses examples, and a packed row gives each
example the logits and loss it has alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchmoe import sharding, train
from switchmoe.layers import relative_position_bucket
from switchmoe.model import LanguageModel, attention_mask, loss_and_metrics
from tests.helpers import tiny_config

LT, LI = 16, 32  # decoder and encoder row lengths
TARGETS = (5, 7, 3)  # lengths of the three examples; packed, they leave one padding slot
INPUTS = (9, 6, 11)


def sequences(lengths, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 359, n).astype(np.int32) for n in lengths]


def decoder_row(targets, prefixes=None):
  """Decoder features of one row [1, LT] holding ``targets`` back to back, each example's
  input shifted right within it. With ``prefixes`` (prefix length k per example) the first
  k + 1 positions of each example get decoder_causal_attention = 1."""
  row = {'decoder_target_tokens': np.zeros((1, LT), np.int32),
         'decoder_input_tokens': np.zeros((1, LT), np.int32),
         'decoder_segment_ids': np.zeros((1, LT), np.int32),
         'decoder_positions': np.zeros((1, LT), np.int32)}
  if prefixes is not None:
    row['decoder_causal_attention'] = np.zeros((1, LT), np.int32)
  start = 0
  for i, t in enumerate(targets):
    span = slice(start, start + len(t))
    row['decoder_target_tokens'][0, span] = t
    row['decoder_input_tokens'][0, start + 1:span.stop] = t[:-1]
    row['decoder_segment_ids'][0, span] = i + 1
    row['decoder_positions'][0, span] = np.arange(len(t))
    if prefixes is not None:
      row['decoder_causal_attention'][0, start:start + prefixes[i] + 1] = 1
    start = span.stop
  row['decoder_loss_weights'] = (row['decoder_target_tokens'] > 0).astype(np.float32)
  return row


def encoder_row(inputs):
  row = {'encoder_input_tokens': np.zeros((1, LI), np.int32),
         'encoder_segment_ids': np.zeros((1, LI), np.int32),
         'encoder_positions': np.zeros((1, LI), np.int32)}
  start = 0
  for i, x in enumerate(inputs):
    span = slice(start, start + len(x))
    row['encoder_input_tokens'][0, span] = x
    row['encoder_segment_ids'][0, span] = i + 1
    row['encoder_positions'][0, span] = np.arange(len(x))
    start = span.stop
  return row


def unpacked(batch):
  """The batch as a model without packing support would read it."""
  return {k: v for k, v in batch.items() if 'segment_ids' not in k and 'positions' not in k}


def examples(arch):
  """(packed batch, [standalone batch per example]); standalone rows have no packing keys."""
  targets = sequences(TARGETS, 0)
  packed = decoder_row(targets)
  alone = [unpacked(decoder_row([t])) for t in targets]
  if arch == 'encoder_decoder':
    inputs = sequences(INPUTS, 1)
    packed.update(encoder_row(inputs))
    for a, x in zip(alone, inputs):
      a.update(unpacked(encoder_row([x])))
  return packed, alone


def model_config(arch, kind):
  """Dense, or Switch layers whose eval capacity (factor = num_experts) never drops a token."""
  if kind == 'dense':
    return tiny_config(arch, every=0)
  return tiny_config(arch, eval_capacity_factor=8.0)


def forward(model, batch):
  logits, aux = model(batch, deterministic=True)
  for name, stats in aux.items():  # packing may move tokens between groups, never drop them
    assert float(stats.diagnostics['dropped_fraction']) == 0.0, name
  return np.asarray(logits)


def segment_logits(logits_1xLtxV):
  spans, start = [], 0
  for n in TARGETS:
    spans.append(logits_1xLtxV[0, start:start + n])
    start += n
  return spans


@pytest.mark.parametrize('arch,kind', [('decoder', 'dense'), ('decoder', 'moe'),
                                       ('encoder_decoder', 'dense'),
                                       ('encoder_decoder', 'moe')])
def test_packed_row_gives_each_example_its_standalone_logits(arch, kind):
  model = LanguageModel(model_config(arch, kind).model, rngs=nnx.Rngs(0))
  packed, alone = examples(arch)
  got = segment_logits(forward(model, packed))
  want = [forward(model, a)[0, :n] for a, n in zip(alone, TARGETS)]
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f'example {i}')
  # Without segment ids the same row mixes examples: the check above is not vacuous. (A causal
  # decoder's first example sees nothing else either way.)
  leaky = segment_logits(forward(model, unpacked(packed)))
  first_mixed = 1 if arch == 'decoder' else 0
  for i in range(first_mixed, len(TARGETS)):
    assert not np.allclose(leaky[i], want[i], rtol=1e-5, atol=1e-5), f'example {i}'


def reference_mask(query_segments, key_segments, causal, prefix):
  b, l = query_segments.shape
  mask = np.zeros((b, 1, l, key_segments.shape[1]), bool)
  for i in range(b):
    for q in range(l):
      for k in range(key_segments.shape[1]):
        same = query_segments[i, q] == key_segments[i, k] != 0
        order = (not causal or k <= q
                 or (prefix is not None and prefix[i, q] == 1 and prefix[i, k] == 1))
        mask[i, 0, q, k] = same and order
  return mask


def test_attention_mask_matches_definition():
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0],
                       [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                       [1, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0]], np.int32)
  prefix = np.array([[1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  other = np.array([[1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1], [2, 2, 1, 0, 0, 0]], np.int32)
  for causal, p in ((True, prefix), (True, None), (False, None)):
    got = attention_mask(jnp.asarray(segments), jnp.asarray(segments), causal=causal,
                         prefix_BxL=None if p is None else jnp.asarray(p))
    np.testing.assert_array_equal(np.asarray(got), reference_mask(segments, segments, causal, p))
  got = attention_mask(jnp.asarray(segments), jnp.asarray(other))
  np.testing.assert_array_equal(np.asarray(got), reference_mask(segments, other, False, None))


def test_prefix_is_bidirectional_targets_causal_segments_separate():
  c = tiny_config('decoder', every=0)
  c.data.objective = 'prefix_lm'
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  # Example 1 (positions 0..7) has prefix length 3: inputs 0..3 (start token + prefix) are
  # bidirectional, 4..7 causal. Example 2 (8..13) has prefix length 2.
  base = decoder_row(sequences((8, 6), 2), prefixes=(3, 2))
  logits = forward(model, base)

  def changed(position):
    batch = {k: v.copy() for k, v in base.items()}
    batch['decoder_input_tokens'][0, position] = 5 + batch['decoder_input_tokens'][0, position]
    return forward(model, batch)

  late_prefix = changed(3)
  assert not np.allclose(late_prefix[0, 1], logits[0, 1], rtol=1e-5, atol=1e-5)
  target = changed(5)
  np.testing.assert_allclose(target[0, :5], logits[0, :5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(target[0, 5], logits[0, 5], rtol=1e-5, atol=1e-5)
  for first, second in ((range(1, 8), slice(8, 14)), (range(9, 14), slice(0, 8))):
    batch = {k: v.copy() for k, v in base.items()}
    batch['decoder_input_tokens'][0, first] += 5
    np.testing.assert_allclose(forward(model, batch)[0, second], logits[0, second],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_index_bias_equals_position_bias_inside_segments(bidirectional):
  # Why the model may ignore *_positions: a bias built per example from positions agrees with
  # the shared one built from indices wherever the mask lets attention through.
  arch = 'encoder_decoder' if bidirectional else 'decoder'
  model = LanguageModel(tiny_config(arch, every=0).model, rngs=nnx.Rngs(0))
  stack = model.encoder if bidirectional else model.decoder
  row = decoder_row(sequences(TARGETS, 0))
  positions_L = row['decoder_positions'][0]
  buckets_LxL = relative_position_bucket(
      jnp.asarray(positions_L[None, :] - positions_L[:, None]), bidirectional=bidirectional,
      num_buckets=stack.rel_bias.num_buckets, max_distance=stack.rel_bias.max_distance)
  by_position_HxLxL = np.moveaxis(np.asarray(stack.rel_bias.rel_embedding[...])[buckets_LxL],
                                  -1, 0)
  by_index_HxLxL = np.asarray(stack.rel_bias(LT, LT))[0]
  segments = jnp.asarray(row['decoder_segment_ids'])
  mask_LxL = np.asarray(attention_mask(segments, segments, causal=not bidirectional))[0, 0]
  np.testing.assert_array_equal(by_position_HxLxL[:, mask_LxL], by_index_HxLxL[:, mask_LxL])
  assert not np.array_equal(by_position_HxLxL, by_index_HxLxL)  # the mask is what makes it so


@pytest.mark.parametrize('arch', ['decoder', 'encoder_decoder'])
def test_packed_loss_is_token_weighted_mean_of_standalone_losses(arch):
  model = LanguageModel(tiny_config(arch, every=0).model, rngs=nnx.Rngs(0))
  packed, alone = examples(arch)
  loss, metrics, _ = loss_and_metrics(model, packed, deterministic=True)
  standalone = [float(loss_and_metrics(model, a, deterministic=True)[1]['ce']) for a in alone]
  want = np.dot(standalone, TARGETS) / sum(TARGETS)
  np.testing.assert_allclose(float(metrics['ce']), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_train_step_takes_packed_prefix_lm_batch():
  c = tiny_config('decoder', every=0)
  c.data.objective = 'prefix_lm'
  c.model.num_layers = 1
  rows = [decoder_row(sequences(TARGETS, seed), prefixes=(2, 3, 1))
          for seed in range(c.train.batch_size)]
  batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  s = train.make_setup(c, jax.devices()[:2])  # two devices: every key is split on the batch
  with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
    state = s.init(jax.random.key(0))
    batch = train.device_batch(s, batch)
    assert all(v.sharding == s.batch_sharding for v in batch.values())
    _, metrics = s.train_step(state, batch)
  assert np.isfinite(float(metrics['loss']))
