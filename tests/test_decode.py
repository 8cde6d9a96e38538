"""Cached decoding equals the full forward pass token by token (encoder-decoder and
decoder-only, dense and Switch); sampling degenerates to greedy where it must; a Switch layer
drops nothing while decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchmoe import decode
from switchmoe.model import LanguageModel
from tests.helpers import tiny_config

N = 6   # new tokens


def model_of(arch, kind):
  # Eval capacity factor = number of experts: the full forward pass never drops a token.
  c = tiny_config(arch, every=0) if kind == 'dense' else tiny_config(
      arch, every=2, eval_capacity_factor=8.0, group_size=0)
  c.model.init_scale = 1.0   # sharper logits: fewer near-ties in the argmax
  return LanguageModel(c.model, rngs=nnx.Rngs(3))


def inputs(arch, seed=0):
  rs = np.random.RandomState(seed)
  if arch == 'encoder_decoder':
    enc = rs.randint(3, 300, (3, 12)).astype(np.int32)
    enc[2, 7:] = 0
    return {'encoder_tokens_BxL': jnp.asarray(enc)}
  return {'prompt_BxP': jnp.asarray(rs.randint(3, 300, (3, 4)).astype(np.int32))}


def full_forward_logits(model, arch, feed, tokens_BxN):
  """Teacher-forced logits at the generated positions, from one full forward pass."""
  prompt = feed.get('prompt_BxP', jnp.zeros((tokens_BxN.shape[0], 0), jnp.int32))
  decoder_in = jnp.concatenate([jnp.zeros_like(tokens_BxN[:, :1]), prompt,
                                tokens_BxN[:, :-1]], axis=1)
  batch = {'decoder_input_tokens': decoder_in, 'decoder_target_tokens': jnp.ones_like(decoder_in),
           'decoder_segment_ids': jnp.ones_like(decoder_in)}
  if arch == 'encoder_decoder':
    batch['encoder_input_tokens'] = feed['encoder_tokens_BxL']
  logits, aux = model(batch, deterministic=True)
  assert all(float(st.diagnostics['dropped_fraction']) == 0.0 for st in aux.values())
  return logits[:, prompt.shape[1]:]


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
@pytest.mark.parametrize('kind', ['dense', 'switch'])
def test_cached_greedy_decoding_equals_the_full_forward_pass(arch, kind):
  model, feed = model_of(arch, kind), inputs(arch)
  tokens, logits = decode.generate(model, max_new_tokens=N, eos_id=-1, **feed)
  assert tokens.shape == (3, N) and logits.shape == (3, N, 384)
  want = full_forward_logits(model, arch, feed, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(want, -1)))


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_sampling_that_can_only_pick_the_top_token_is_greedy(arch):
  model, feed = model_of(arch, 'switch'), inputs(arch, seed=1)
  greedy, _ = decode.generate(model, max_new_tokens=N, **feed)
  key = jax.random.key(5)
  for kw in ({'top_k': 1}, {'top_p': 1e-6}):
    sampled, _ = decode.generate(model, max_new_tokens=N, temperature=1.0, key=key, **feed, **kw)
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy), err_msg=str(kw))
  # A real sample differs somewhere, and is reproducible from its key.
  a, _ = decode.generate(model, max_new_tokens=N, temperature=2.0, key=key, **feed)
  b, _ = decode.generate(model, max_new_tokens=N, temperature=2.0, key=key, **feed)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.any(np.asarray(a) != np.asarray(greedy))


def test_rows_stop_at_eos():
  model, feed = model_of('encoder_decoder', 'dense'), inputs('encoder_decoder')
  tokens, _ = decode.generate(model, max_new_tokens=N, eos_id=-1, **feed)
  eos = int(tokens[0, 1])   # row 0 "ends" at its second token
  stopped, _ = decode.generate(model, max_new_tokens=N, eos_id=eos, **feed)
  row = np.asarray(stopped[0])
  first = int(np.argmax(row == eos))
  assert first <= 1 and np.all(row[first + 1:] == 0)


def test_choose_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(decode.choose(logits, jax.random.key(i), temperature=1.0, top_k=0, top_p=0.7)[0])
           for i in range(200)}
  assert draws == {0, 1}        # 0.5 < 0.7 <= 0.5 + 0.3
  draws = {int(decode.choose(logits, jax.random.key(i), temperature=1.0, top_k=3, top_p=1.0)[0])
           for i in range(200)}
  assert draws == {0, 1, 2}


def test_a_switch_layer_drops_nothing_while_decoding():
  from switchmoe.moe import MoeLayer
  from tests.helpers import moe_config
  cfg = moe_config(num_experts=4, capacity_factor=0.1, eval_capacity_factor=0.1, min_capacity=0)
  layer = MoeLayer(8, 16, cfg, activation='relu', init_scale=1.0, dtype=jnp.float32,
                   rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(0).randn(5, 1, 8), jnp.float32)
  assert layer.capacity(1, True) == 0          # a one-token group's capacity from the factors
  _, stats = layer(x, deterministic=True, rngs=None, decoding=True)
  assert float(stats.diagnostics['dropped_fraction']) == 0.0


@pytest.mark.slow  # test_readme runs generate.py as the README writes it
def test_generate_script_fills_spans_and_refuses_bad_input(tmp_path):
  import subprocess
  import sys
  from switchmoe import checkpoint as checkpoint_lib
  from switchmoe import train
  c = tiny_config(group_size=0)
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    params = jax.device_get(s.init(jax.random.key(0))['params'])
  export = str(tmp_path / 'export')
  checkpoint_lib.save_params(export, params, c.to_dict())
  repo = __file__.rsplit('/tests/', 1)[0]
  run = lambda *args: subprocess.run([sys.executable, 'scripts/generate.py', *args], cwd=repo,
                                     capture_output=True, text=True, timeout=300)
  text = 'The <extra_id_0> walks in <extra_id_1> park'
  done = run(f'--checkpoint={export}', f'--text={text}', '--text=a', '--max_new_tokens=5')
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith(f'{text} -> ') and lines[1].startswith('a -> ')
  bad = run(f'--checkpoint={tmp_path}/none', '--text=a')
  assert bad.returncode == 2 and bad.stderr.startswith('error: ') and bad.stderr.count('\n') == 1
  assert run(f'--checkpoint={export}', '--text=a', '--top_p=0').returncode == 2
  beam = run(f'--checkpoint={export}', '--text=a', '--beams=2', '--max_new_tokens=3')
  assert beam.returncode == 0 and beam.stdout.startswith('a -> '), beam.stderr[-2000:]


def test_sentinels_in_text_become_sentinel_ids():
  import importlib.util
  from switchmoe.tokenizer import make_tokenizer
  spec = importlib.util.spec_from_file_location('generate', __file__.rsplit('/tests/', 1)[0] +
                                                '/scripts/generate.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tok = make_tokenizer('byte')
  ids = module.encode(tok, 'a<extra_id_0>b<extra_id_12>')
  np.testing.assert_array_equal(ids, np.concatenate([
      tok.encode('a'), [tok.sentinel_id(0)], tok.encode('b'), [tok.sentinel_id(12)]]))
  assert tok.decode(ids) == 'a<extra_id_0>b<extra_id_12>'


def reference_beam_search(model, feed, n, k, alpha, eos):
  """Beam search over uncached, teacher-forced full forward passes, one row at a time."""
  enc = feed.get('encoder_tokens_BxL')
  prompt = feed.get('prompt_BxP')
  rows = (enc if prompt is None else prompt).shape[0]
  p = 0 if prompt is None else prompt.shape[1]

  @nnx.jit
  def next_logp(model, row_enc, decoder_in):
    batch = {'decoder_input_tokens': decoder_in, 'decoder_target_tokens': jnp.ones_like(
        decoder_in), 'decoder_segment_ids': jnp.ones_like(decoder_in)}
    if row_enc is not None:
      batch['encoder_input_tokens'] = row_enc
    return jax.nn.log_softmax(model(batch, deterministic=True)[0][0])

  best = []
  for b in range(rows):
    row_enc = None if enc is None else enc[b:b + 1]
    start = [0] + ([] if prompt is None else list(np.asarray(prompt[b])))
    hyps = [([], 0.0, False, 0)]   # tokens, score, finished, length
    for _ in range(n):
      candidates = []
      for tokens, score, done, length in hyps:
        if done:
          candidates.append((tokens + [0], score, True, length))
          continue
        seq = start + tokens
        decoder_in = jnp.asarray([seq + [0] * (p + 1 + n - len(seq))], jnp.int32)
        logp = np.asarray(next_logp(model, row_enc, decoder_in)[len(seq) - 1], np.float64)
        for v in np.argsort(-logp)[:k]:
          candidates.append((tokens + [int(v)], score + logp[v], int(v) == eos, length + 1))
      hyps = sorted(candidates, key=lambda h: -h[1])[:k]
    best.append(max(hyps, key=lambda h: h[1] / ((5.0 + h[3]) / 6.0) ** alpha))
  return np.asarray([h[0] for h in best]), np.asarray([h[1] for h in best])


@pytest.mark.parametrize('arch,kind', [('encoder_decoder', 'switch'), ('decoder', 'dense')])
def test_beam_search_equals_beam_search_over_full_forward_passes(arch, kind):
  model, feed = model_of(arch, kind), inputs(arch, seed=2)
  greedy, _ = decode.generate(model, max_new_tokens=4, eos_id=-1, **feed)
  one, _ = decode.beam_search(model, max_new_tokens=4, beams=1, eos_id=-1, **feed)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(greedy))
  eos = int(greedy[0, 1])   # some hypotheses finish early
  for alpha, eos_id in ((0.0, -1), (0.6, eos)):
    tokens, score = decode.beam_search(model, max_new_tokens=4, beams=3, length_alpha=alpha,
                                       eos_id=eos_id, **feed)
    want_tokens, want_score = reference_beam_search(model, feed, 4, 3, alpha, eos_id)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens, err_msg=f'alpha={alpha}')
    np.testing.assert_allclose(np.asarray(score), want_score, rtol=1e-4, atol=1e-4)
