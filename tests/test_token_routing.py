"""switchmoe.token_routing against routing computed by hand from each Switch layer's input.

The reference records every encoder Switch layer's input x_BxLxD as the model runs, then
routes in NumPy float64 from the definition: logits = x @ router kernel, expert = argmax, and
in each group of S consecutive tokens (row-major over [B, L]) a token is dropped when its
expert already holds ``capacity`` earlier real tokens of the group; padding takes no slot.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from switchmoe import checkpoint, token_routing
from switchmoe.model import LanguageModel
from switchmoe.moe import MoeLayer
from tests.helpers import random_batch, tiny_config

GROUP_SIZE, EVAL_CF = 64, 0.5   # two 32-token rows per group, capacity floor(64 * 0.5 / 8) = 4


def routing_config():
  c = tiny_config(group_size=GROUP_SIZE, eval_capacity_factor=EVAL_CF, min_capacity=1)
  c.model.init_scale = 1.0  # spread router logits: no near-ties for float32 to flip
  return c


@pytest.fixture(scope='module')
def export(tmp_path_factory):
  """(path, params) of a randomly initialised tiny model, exported as params/ + config.json."""
  c = routing_config()
  params = nnx.to_pure_dict(nnx.state(LanguageModel(c.model, rngs=nnx.Rngs(3))))
  path = str(tmp_path_factory.mktemp('routing') / 'export')
  checkpoint.save_params(path, params, json.loads(c.to_json()))
  return path, params


def record_switch_inputs(monkeypatch) -> dict[int, list[np.ndarray]]:
  """Makes every sowing MoeLayer call record its input x_BxLxD (NumPy), under the order in
  which the layers were traced (encoder layer order), one entry per executed call."""
  seen = {}
  call = MoeLayer.__call__

  def recording(self, x_BxLxD, **kwargs):
    if self.sow_routing:
      calls = seen.setdefault(len(seen), [])
      jax.debug.callback(lambda x: calls.append(np.asarray(x, np.float64)), x_BxLxD)
    return call(self, x_BxLxD, **kwargs)

  monkeypatch.setattr(MoeLayer, '__call__', recording)
  return seen


def route_by_hand(x_BxLxD, kernel_DxE, group_size, capacity, valid_BxL):
  """(expert_BxL, kept_BxL): argmax routing of the real tokens (``valid_BxL``), first come
  first served in sequence order."""
  b, l, d = x_BxLxD.shape
  expert_N = np.argmax(x_BxLxD.reshape(-1, d) @ kernel_DxE, axis=-1)
  kept_N = np.zeros(b * l, bool)
  for start in range(0, b * l, group_size):
    used = {}
    for n in np.flatnonzero(valid_BxL.reshape(-1)[start:start + group_size]) + start:
      used[expert_N[n]] = used.get(expert_N[n], 0) + 1
      kept_N[n] = used[expert_N[n]] <= capacity
  return expert_N.reshape(b, l), kept_N.reshape(b, l)


def test_route_texts_matches_routing_by_hand(export, monkeypatch):
  c = routing_config()
  b, length = c.train.batch_size, c.data.inputs_length
  # 9 texts: two batches of 8 rows; the first is cut to the encoder length.
  texts = ['x' * 100, 'def f(a, b):', 'aaaa', 'the cat', '', 'é', 'import os', '\tz = 1\n',
           'last one']
  path, params = export
  seen = record_switch_inputs(monkeypatch)
  routed = token_routing.route_texts(path, texts)
  jax.effects_barrier()
  names = ['encoder/layer_0', 'encoder/layer_1']
  assert all(list(r.expert_index_LxK) == list(r.kept_LxK) == names for r in routed)
  assert [len(calls) for calls in seen.values()] == [2] * len(names)  # traced once, 2 batches
  capacity = max(1, math.floor(GROUP_SIZE * EVAL_CF / c.model.moe.num_experts))
  assert [r.text for r in routed] == texts
  assert len(routed[0].tokens_L) == length and routed[0].tokens_L[-1] == 1  # cut, then EOS
  np.testing.assert_array_equal(routed[1].tokens_L, [ch + 3 for ch in b'def f(a, b):'] + [1])
  for batch in range(2):
    valid_BxL = np.zeros((b, length), bool)  # empty rows fill the last batch
    for row, r in enumerate(routed[batch * b:(batch + 1) * b]):
      valid_BxL[row, :len(r.tokens_L)] = True
    for layer, name in enumerate(names):
      x_BxLxD = seen[layer][batch]
      assert x_BxLxD.shape == (b, length, c.model.d_model)
      kernel = np.asarray(params['encoder']['layers'][layer]['ffn']['router']['kernel'],
                          np.float64)
      expert_BxL, kept_BxL = route_by_hand(x_BxLxD, kernel, GROUP_SIZE, capacity, valid_BxL)
      for row, r in enumerate(routed[batch * b:(batch + 1) * b]):
        n = len(r.tokens_L)
        assert r.expert_index_LxK[name].shape == r.kept_LxK[name].shape == (n, 1)
        np.testing.assert_array_equal(r.expert_index_LxK[name][:, 0], expert_BxL[row, :n])
        np.testing.assert_array_equal(r.kept_LxK[name][:, 0], kept_BxL[row, :n])
  assert not all(np.all(r.kept_LxK[name]) for r in routed for name in names)  # drops happen
  assert routed[0].pieces[:2] == ['x', 'x'] and routed[0].pieces[-1] == '</s>'
  assert routed[7].pieces[:3] == ['\u21e5', 'z', '\u2423']


def test_sow_routing_is_off_by_default_and_adds_no_state():
  c = routing_config()
  model = LanguageModel(c.model, rngs=nnx.Rngs(0))
  before = jax.tree.structure(nnx.state(model))
  batch = random_batch(c)
  # nnx.jit carries state changes made inside back to the model
  nnx.jit(lambda m: m(batch, deterministic=True))(model)
  assert jax.tree.structure(nnx.state(model)) == before
  layers = model.encoder.switch_layers('encoder')
  for _, layer in layers:
    layer.sow_routing = True
  capture = nnx.capture(lambda m: m(batch, deterministic=True), nnx.Intermediate)
  _, sown = nnx.jit(capture)(model)
  assert len(dict(nnx.to_flat_state(sown))) == len(layers)
  assert jax.tree.structure(nnx.state(model)) == before  # captured, not stored in the model


def test_render_aligns_wraps_and_marks_drops():
  r = token_routing.TextRouting(
      text='ab c', tokens_L=np.array([100, 101, 35, 102, 1]),
      pieces=['a', 'b', '\u2423', 'c', '</s>'],
      expert_index_LxK={'encoder/layer_1': np.array([[3, 1], [12, 0], [5, 2], [7, 6], [0, 1]])},
      kept_LxK={'encoder/layer_1': np.array([[True, True], [True, False], [False, False],
                                             [False, True], [True, False]])})
  assert token_routing.render(r, width=30) == (
      'token           a   b  \u2423 c\n'
      'encoder/layer_1 3,1 12 - 6\n'
      '\n'
      'token           </s>\n'
      'encoder/layer_1 0\n'
      '\n'
      'dropped tokens (of 5): encoder/layer_1 1')
