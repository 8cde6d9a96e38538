"""Model structure, shapes, gradients, masks and initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from switchmoe import routing, sharding
from switchmoe.layers import relative_position_bucket
from switchmoe.model import LanguageModel, is_moe_layer, loss_and_metrics
from tests.helpers import random_batch, tiny_config


def loss_grads(c, batch):
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)

  def f(p):
    loss, metrics, _ = loss_and_metrics(nnx.merge(graphdef, p), batch, deterministic=False,
                                        rngs=nnx.Rngs(dropout=0, jitter=1))
    return loss, metrics

  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_forward_backward_reaches_every_parameter(arch):
  c = tiny_config(arch, every=2, exploration='input_jitter', jitter=0.01)
  c.model.num_layers = 4
  c.model.dropout_rate = 0.1
  (loss, metrics), grads = loss_grads(c, random_batch(c))
  assert np.isfinite(loss)
  # Untrained: cross-entropy near log(vocab), each Switch layer's balance loss near alpha.
  assert abs(float(metrics['ce']) - math.log(c.model.vocab_size)) < 0.5
  stacks = ['decoder'] + (['encoder'] if arch == 'encoder_decoder' else [])
  assert sorted(metrics['moe']) == sorted(f'{s}/layer_{i}' for s in stacks for i in (1, 3))
  n = len(metrics['moe'])
  assert 0.9 * 0.01 * n < float(metrics['load_balance']) < 1.5 * 0.01 * n
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f'no gradient reaches {jax.tree_util.keystr(path)}'


def test_dense_model_has_no_aux_losses():
  c = tiny_config(every=0)
  (loss, metrics), _ = loss_grads(c, random_batch(c))
  assert metrics['moe'] == {}
  assert float(metrics['load_balance']) == 0 and float(metrics['z_loss']) == 0
  assert float(loss) == pytest.approx(float(metrics['ce']))


def test_moe_layer_placement():
  assert [i for i in range(6) if is_moe_layer(i, 2)] == [1, 3, 5]
  assert [i for i in range(3) if is_moe_layer(i, 1)] == [0, 1, 2]
  assert not any(is_moe_layer(i, 0) for i in range(6))


def test_decoder_is_causal():
  # Large eval capacity: no token is dropped, so routing cannot couple positions either.
  c = tiny_config('decoder', eval_capacity_factor=8.0)
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  batch = random_batch(c)
  batch['decoder_target_tokens'][:] = np.maximum(batch['decoder_target_tokens'], 3)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['decoder_input_tokens'][:, 9:] = 7
  logits_a, _ = model(batch, deterministic=True)
  logits_b, _ = model(changed, deterministic=True)
  np.testing.assert_allclose(logits_a[:, :9], logits_b[:, :9], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits_a[:, 9:], logits_b[:, 9:])


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_padding_contents_change_no_real_token(arch):
  """Padding (segment id 0) takes no Switch capacity and counts in no aux loss or diagnostic:
  whatever tokens it holds, the real tokens get the same logits and every Switch layer the same
  stats. Groups of 64 span rows and capacity is tight (8 slots per expert), so padding routed
  as text would take slots of the next row's tokens."""
  c = tiny_config(arch, group_size=64, eval_capacity_factor=1.0)
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  batch = random_batch(c)
  rng = np.random.default_rng(1)
  batch['decoder_segment_ids'] = (batch['decoder_target_tokens'] > 0).astype(np.int32)
  stacks = [('decoder', 'decoder_input_tokens')]
  if arch == 'encoder_decoder':
    batch['encoder_segment_ids'] = (batch['encoder_input_tokens'] > 0).astype(np.int32)
    stacks.append(('encoder', 'encoder_input_tokens'))
  other = {k: v.copy() for k, v in batch.items()}
  for stack, key in stacks:
    padding = batch[f'{stack}_segment_ids'] == 0
    assert padding.any()
    other[key][padding] = rng.integers(3, 359, padding.sum())
  logits, aux = model(batch, deterministic=True)
  other_logits, other_aux = model(other, deterministic=True)
  real = batch['decoder_target_tokens'] > 0
  np.testing.assert_allclose(other_logits[real], logits[real], rtol=1e-6, atol=1e-6)
  assert any(float(stats.diagnostics['dropped_fraction']) > 0 for stats in aux.values())
  for name, stats in aux.items():
    for key, value in stats.as_dict().items():
      np.testing.assert_allclose(other_aux[name].as_dict()[key], value, rtol=1e-6, atol=1e-7,
                                 err_msg=f'{name} {key}')


def reference_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """T5's bucketing, one integer at a time."""
  n, bucket = -relative_position, 0
  if bidirectional:
    num_buckets //= 2
    bucket = num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_buckets_match_reference(bidirectional):
  rel = np.arange(-300, 301)
  got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                 num_buckets=32, max_distance=128)
  want = [reference_bucket(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize('scale', [0.1, 1.0])
def test_init_scale_sets_weight_std(scale):
  c = tiny_config()
  c.model.d_model, c.model.d_ff, c.model.init_scale = 256, 1024, scale
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  wi = np.asarray(model.encoder.layers[0].ffn.experts.wi[...])  # [E, d_model, d_ff]
  np.testing.assert_allclose(wi.std(), math.sqrt(scale / 256), rtol=0.02)
  assert np.abs(wi).max() <= 2 * math.sqrt(scale / 256) / 0.8796 + 1e-6  # cut at 2 std


def test_bfloat16_activations_keep_float32_router_and_params():
  c = tiny_config()
  c.model.dtype = 'bfloat16'
  (loss, metrics), grads = loss_grads(c, random_batch(c))
  assert np.isfinite(loss)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert metrics['moe']['encoder/layer_0']['z_loss'].dtype == jnp.float32


def _abstract_model(c):
  return nnx.eval_shape(lambda: LanguageModel(c.model, rngs=nnx.Rngs(0)))


def test_shared_experts_and_expert_bias_variables():
  """Shared experts add one dense-FFN's parameters (and its logical axes) per Switch layer; the
  expert bias is a replicated non-Param variable; neither exists by default."""
  base = tiny_config()
  extended = tiny_config(num_shared_experts=2, bias_update_rate=0.001)
  count = lambda model: sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  m = base.model
  switch_layers = 2 * m.num_layers  # every layer of the encoder and the decoder
  ffn = 3 * m.d_model * 2 * m.d_ff  # GEGLU wi, wi_gate, wo of width 2 * d_ff
  base_model, model = _abstract_model(base), _abstract_model(extended)
  assert count(model) - count(base_model) == switch_layers * ffn
  assert not nnx.state(base_model, routing.ExpertBias)
  biases = nnx.to_flat_state(nnx.state(model, routing.ExpertBias))
  assert len(biases) == switch_layers
  assert all(path[-2:] == ('router', 'expert_bias') for path, _ in biases)
  mesh = sharding.make_mesh((2, 2, 2), ('fsdp', 'expert', 'model'))
  specs = sharding.state_shardings(nnx.state(model), mesh)['encoder']['layers'][0]['ffn']
  assert specs['shared']['wi'].spec == P('fsdp', 'model')
  assert specs['shared']['wo'].spec == P('model', 'fsdp')
  assert specs['router']['expert_bias'].spec == P(None)


def _remat_config():
  c = tiny_config('encoder_decoder', every=2, exploration='input_jitter', jitter=0.01,
                  expert_dropout=0.2)
  c.model.dropout_rate = 0.1
  return c


_NO_REMAT = {}


@pytest.mark.parametrize('remat, blocks', [
    ('full', 'all'), ('save_dots', 'moe'),
    pytest.param('save_all_dots', 'dense', marks=pytest.mark.slow),
    pytest.param('full', 'moe', marks=pytest.mark.slow)])
def test_remat_keeps_loss_and_gradients(remat, blocks):
  """model.remat recomputes the chosen blocks in the backward pass (the jaxpr has one
  checkpoint per such block) and changes neither the loss nor any gradient, dropout and
  router jitter included: the recomputation draws the same random numbers."""
  c = _remat_config()
  batch = random_batch(c)
  if not _NO_REMAT:  # the reference, computed once for all cases
    _NO_REMAT['value'] = loss_grads(c, batch)
  (loss, _), grads = _NO_REMAT['value']
  c.model.remat, c.model.remat_blocks = remat, blocks
  (loss_remat, _), grads_remat = loss_grads(c, batch)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for (path, g), g_remat in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree_util.tree_leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=2e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p: loss_and_metrics(
      nnx.merge(graphdef, p), batch, deterministic=False,
      rngs=nnx.Rngs(dropout=0, jitter=1))[0])(params)
  expected = {'all': 4, 'moe': 2, 'dense': 2}[blocks]  # 2 + 2 blocks, every other one Switch
  text = str(jaxpr)  # the primitive is remat2 in jax 0.10, checkpoint in some versions
  assert text.count('remat2[') + text.count('checkpoint[') == expected
