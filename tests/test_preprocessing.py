import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchmoe import preprocessing
from switchmoe.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def _spans(is_noise_L):
  """Lengths of the runs of True in a mask."""
  padded = np.concatenate([[False], is_noise_L, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return edges[1::2] - edges[::2]


def _uncorrupt(inputs, targets):
  """Rebuilds the original tokens from span-corruption (inputs, targets), both ending in EOS."""
  assert inputs[-1] == TOKENIZER.eos_id and targets[-1] == TOKENIZER.eos_id
  first_sentinel = TOKENIZER.sentinel_id(TOKENIZER.num_sentinels - 1)
  dropped = {}
  current = None
  for token in targets[:-1].tolist():
    if token >= first_sentinel:
      current = dropped.setdefault(token, [])
    else:
      current.append(token)
  tokens = []
  for token in inputs[:-1].tolist():
    tokens.extend(dropped.pop(token) if token >= first_sentinel else [token])
  assert not dropped, 'targets hold a span whose sentinel is not in the inputs'
  return np.array(tokens, dtype=np.int32)


def test_noise_mask_structure():
  rng = np.random.default_rng(0)
  for length in [2, 3, 10, 57, 128, 568]:
    mask = preprocessing.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert mask.shape == (length,) and mask.dtype == bool
    assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise
    expected_noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.sum() == expected_noise
    assert len(_spans(mask)) == min(max(round(expected_noise / 3.0), 1), expected_noise)


@pytest.mark.parametrize('length', [0, 1])
def test_noise_mask_degenerate_lengths(length):
  mask = preprocessing.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(0))
  assert mask.shape == (length,) and not mask.any()


def test_noise_mask_statistics():
  rng = np.random.default_rng(1)
  lengths = rng.integers(50, 600, size=500)
  masks = [preprocessing.random_spans_noise_mask(int(n), 0.15, 3.0, rng) for n in lengths]
  all_spans = np.concatenate([_spans(m) for m in masks])
  assert abs(sum(m.sum() for m in masks) / lengths.sum() - 0.15) < 0.005
  assert abs(all_spans.mean() - 3.0) < 0.1
  assert all_spans.max() > 6  # span lengths are random, not all equal to the mean

  # Away from the forced non-noise start and noise end, all positions are about equally likely.
  masks_100 = [preprocessing.random_spans_noise_mask(100, 0.15, 3.0, rng) for _ in range(2000)]
  per_position = np.mean(masks_100, axis=0)
  assert np.all((per_position[10:85] > 0.08) & (per_position[10:85] < 0.22))


def test_noise_mask_is_deterministic_given_rng():
  def draw(seed):
    return preprocessing.random_spans_noise_mask(200, 0.15, 3.0, np.random.default_rng(seed))

  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))


@pytest.mark.parametrize(
    'inputs_length, expected',
    [
        # T5's published value.
        (512, (568, 114)),
        # By hand: 141 raw tokens -> 21 noise (round 21.15), 7 spans -> inputs 120 + 7 + 1 = 128 and
        # targets 21 + 7 + 1 = 29; 142 tokens -> 21 noise, 7 spans -> inputs 129, too long.
        (128, (141, 29)),
        # By hand: 21 tokens -> 3 noise, 1 span -> inputs 18 + 1 + 1 = 20, targets 3 + 1 + 1 = 5;
        # 22 tokens -> 3 noise (round 3.3), 1 span -> inputs 21.
        (20, (21, 5)),
    ],
)
def test_random_spans_helper(inputs_length, expected):
  assert preprocessing.random_spans_helper(inputs_length, 0.15, 3.0) == expected


@pytest.mark.parametrize('inputs_length', [20, 64, 128, 512])
def test_corrupted_lengths_fit(inputs_length):
  tokens_length, targets_length = preprocessing.random_spans_helper(inputs_length, 0.15, 3.0)
  rng = np.random.default_rng(0)
  for length in range(tokens_length + 1):  # shorter passages give shorter raw sequences
    inputs, targets = preprocessing.span_corruption(np.full(length, 50), TOKENIZER, rng)
    assert len(inputs) <= inputs_length and len(targets) <= targets_length
    if length == tokens_length:
      assert (len(inputs), len(targets)) == (inputs_length, targets_length)


def test_span_corruption_layout():
  tokens = TOKENIZER.encode('The quick brown fox jumps over the lazy dog, again and again.')
  inputs, targets = preprocessing.span_corruption(tokens, TOKENIZER, np.random.default_rng(0))
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  is_sentinel = lambda ids: ids >= TOKENIZER.sentinel_id(TOKENIZER.num_sentinels - 1)
  num_spans = is_sentinel(inputs).sum()
  expected_sentinels = [TOKENIZER.sentinel_id(k) for k in range(num_spans)]
  assert inputs[is_sentinel(inputs)].tolist() == expected_sentinels
  assert targets[is_sentinel(targets)].tolist() == expected_sentinels
  assert targets[0] == TOKENIZER.sentinel_id(0)
  assert (inputs == TOKENIZER.eos_id).sum() == 1 and (targets == TOKENIZER.eos_id).sum() == 1
  assert len(targets) - 1 - num_spans == round(len(tokens) * 0.15)


@settings(max_examples=300, deadline=None, database=None)
@given(
    # At most 400 * 0.5 / 2 = 100 spans, the number of sentinels.
    tokens=st.lists(st.integers(3, 258), max_size=400),
    seed=st.integers(0, 2**32 - 1),
    noise_density=st.sampled_from([0.05, 0.15, 0.5]),
    mean_noise_span_length=st.sampled_from([2.0, 3.0, 8.0]),
)
def test_span_corruption_round_trip(tokens, seed, noise_density, mean_noise_span_length):
  tokens = np.array(tokens, dtype=np.int32)
  inputs, targets = preprocessing.span_corruption(
      tokens, TOKENIZER, np.random.default_rng(seed), noise_density, mean_noise_span_length
  )
  np.testing.assert_array_equal(_uncorrupt(inputs, targets), tokens)


def test_span_corruption_round_trip_full_length():
  rng = np.random.default_rng(0)
  for _ in range(100):
    tokens = rng.integers(3, 259, size=568).astype(np.int32)
    inputs, targets = preprocessing.span_corruption(tokens, TOKENIZER, rng)
    np.testing.assert_array_equal(_uncorrupt(inputs, targets), tokens)


def test_span_corruption_rejects_more_spans_than_sentinels():
  with pytest.raises(ValueError, match='sentinels'):
    preprocessing.span_corruption(np.full(2000, 50), TOKENIZER, np.random.default_rng(0), 0.15, 1.0)


def test_random_window():
  tokens = np.arange(100, dtype=np.int32)
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(50):
    window = preprocessing.random_window(tokens, 10, rng)
    np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 10))
    starts.add(int(window[0]))
  assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 90
  np.testing.assert_array_equal(preprocessing.random_window(tokens[:7], 10, rng), tokens[:7])


def test_pad_or_truncate():
  np.testing.assert_array_equal(preprocessing.pad_or_truncate(np.array([5, 6]), 4), [5, 6, 0, 0])
  np.testing.assert_array_equal(preprocessing.pad_or_truncate(np.array([5, 6, 7]), 2), [5, 6])
  assert preprocessing.pad_or_truncate(np.array([5]), 3).dtype == np.int32


def test_decoder_features():
  features = preprocessing.decoder_features(np.array([7, 8, 9, 1], dtype=np.int32), 6)
  np.testing.assert_array_equal(features['decoder_target_tokens'], [7, 8, 9, 1, 0, 0])
  np.testing.assert_array_equal(features['decoder_input_tokens'], [0, 7, 8, 9, 1, 0])
  np.testing.assert_array_equal(features['decoder_loss_weights'], [1, 1, 1, 1, 0, 0])
  assert features['decoder_input_tokens'].dtype == np.int32
  assert features['decoder_target_tokens'].dtype == np.int32
  assert features['decoder_loss_weights'].dtype == np.float32

  truncated = preprocessing.decoder_features(np.arange(3, 13, dtype=np.int32), 4)
  np.testing.assert_array_equal(truncated['decoder_input_tokens'], [0, 3, 4, 5])
  np.testing.assert_array_equal(truncated['decoder_loss_weights'], [1, 1, 1, 1])


def test_span_corruption_hand_worked(monkeypatch):
  # tokens 10..19 with noise at 2-3 and 7 (as T5's docstring example): the inputs keep the rest
  # with <extra_id_0>, <extra_id_1> in place of the spans; the targets list each span after its
  # sentinel; both end in EOS.
  mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], bool)
  monkeypatch.setattr(preprocessing, 'random_spans_noise_mask', lambda *args: mask)
  inputs, targets = preprocessing.span_corruption(
      np.arange(10, 20), TOKENIZER, np.random.default_rng(0))
  s0, s1, eos = TOKENIZER.sentinel_id(0), TOKENIZER.sentinel_id(1), TOKENIZER.eos_id
  assert inputs.tolist() == [10, 11, s0, 14, 15, 16, s1, 18, 19, eos]
  assert targets.tolist() == [s0, 12, 13, s1, 17, eos]


def test_segment_positions():
  segments = np.array([1, 1, 1, 2, 3, 3, 0, 0])
  assert preprocessing.segment_positions(segments).tolist() == [0, 1, 2, 0, 0, 1, 0, 1]


def test_packed_decoder_features_by_hand():
  tokens = np.array([5, 6, 7, 1, 8, 9, 0, 0])
  segments = np.array([1, 1, 1, 1, 2, 2, 0, 0])
  features = preprocessing.packed_decoder_features(tokens, segments)
  assert features['decoder_target_tokens'].tolist() == [5, 6, 7, 1, 8, 9, 0, 0]
  # Each segment's inputs start from 0 and never see the previous segment.
  assert features['decoder_input_tokens'].tolist() == [0, 5, 6, 7, 0, 8, 0, 0]
  assert features['decoder_positions'].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
  assert features['decoder_segment_ids'].tolist() == segments.tolist()
  assert features['decoder_loss_weights'].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
  assert 'decoder_causal_attention' not in features

  prefix = np.array([2, 2, 2, 2, 1, 1, 0, 0])
  features = preprocessing.packed_decoder_features(tokens, segments, prefix)
  # Prefix tokens are inputs, not predicted; the prefix and the first target position (whose
  # input is the last prefix token) see each other.
  assert features['decoder_loss_weights'].tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
  assert features['decoder_causal_attention'].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]


def test_random_prefix_lengths():
  rng = np.random.default_rng(0)
  segments = np.repeat(np.arange(1, 5), [6, 1, 2, 9])
  draws = np.array([preprocessing.random_prefix_lengths(segments, rng) for _ in range(2000)])
  for segment, length in zip(range(1, 5), [6, 1, 2, 9]):
    per_segment = draws[:, segments == segment]
    assert (per_segment == per_segment[:, :1]).all()  # one prefix length per segment
    if length == 1:
      assert (per_segment == 0).all()
    else:  # uniform over 1 .. length - 1
      counts = np.bincount(per_segment[:, 0], minlength=length)[1:]
      assert counts.min() > 0.7 * 2000 / (length - 1)


@pytest.mark.parametrize('n, inputs_length, targets_length', [(127, 128, 128), (127, 128, 32),
                                                              (2, 8, 8)])
def test_prefix_lm_split(n, inputs_length, targets_length):
  rng = np.random.default_rng(0)
  tokens = np.arange(3, 3 + n, dtype=np.int32)
  cuts = set()
  for _ in range(200):
    inputs, targets = preprocessing.prefix_lm_split(tokens, rng, inputs_length, targets_length, 1)
    assert inputs[-1] == 1 and targets[-1] == 1
    np.testing.assert_array_equal(np.concatenate([inputs[:-1], targets[:-1]]), tokens)
    assert 2 <= len(inputs) <= inputs_length and 2 <= len(targets) <= targets_length
    cuts.add(len(inputs) - 1)
  assert min(cuts) == max(1, n - targets_length + 1) or len(cuts) > 20
