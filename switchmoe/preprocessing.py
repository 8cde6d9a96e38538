"""Pure NumPy example transforms: T5 span corruption and decoder-side feature construction.

Everything here is deterministic given its ``np.random.Generator``, so a pipeline that derives the
generator from (seed, example index) reproduces the same examples after a checkpoint restore.
"""

import numpy as np

from switchmoe.tokenizer import Tokenizer


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Splits ``num_items`` into ``num_segments`` positive lengths, uniformly over such compositions.

  Returns lengths_S int64 with S = num_segments, summing to num_items.
  """
  cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
  """T5's noise mask: which of ``length`` tokens to drop, as contiguous random spans.

  Returns is_noise_L bool. About ``noise_density * length`` tokens are noise, in spans of mean
  length ``mean_noise_span_length``; the mask always starts with a non-noise span and ends with a
  noise span.
  """
  # Work on at least 2 tokens so there is room for one noise and one non-noise token, then cut back.
  work_length = max(length, 2)
  num_noise = int(np.clip(round(work_length * noise_density), 1, work_length - 1))
  num_nonnoise = work_length - num_noise
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  # Each span, noise and non-noise, needs at least one token (binds only at extreme densities).
  num_spans = min(num_spans, num_noise, num_nonnoise)

  noise_lengths_S = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths_S = _random_segmentation(num_nonnoise, num_spans, rng)
  span_lengths_2S = np.stack([nonnoise_lengths_S, noise_lengths_S], axis=1).reshape(-1)
  span_is_noise_2S = np.tile([False, True], num_spans)
  return np.repeat(span_is_noise_2S, span_lengths_2S)[:length]


def random_spans_helper(
    inputs_length: int,
    noise_density: float,
    mean_noise_span_length: float,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
  """T5's arithmetic for how many raw tokens to corrupt so the encoder input fills it.

  Returns (tokens_length, targets_length): the largest raw length whose corrupted inputs (non-noise
  tokens, one sentinel per span, EOS) fit in ``inputs_length``, and the length of the matching
  targets (noise tokens, one sentinel per span, EOS). E.g. (512, 0.15, 3.0) -> (568, 114).
  """

  def corrupted_lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_nonnoise = tokens_length - num_noise
    num_spans = int(round(num_noise / mean_noise_span_length))
    return (
        num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
        num_noise + num_spans * extra_tokens_per_span_targets + 1,
    )

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = corrupted_lengths(tokens_length)
  # T5 trims one token at density 0.5 so targets_length matches the (usually round) inputs_length.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def span_corruption(
    tokens_L: np.ndarray,
    tokenizer: Tokenizer,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of one token sequence (no EOS in ``tokens_L``).

  The k-th noise span is replaced in the inputs by ``sentinel_id(k)``; the targets list, for each
  span, its sentinel followed by the dropped tokens. Both get a trailing EOS.
  Returns (inputs_I, targets_T) int32 with I = L - num_noise + num_spans + 1 and
  T = num_noise + num_spans + 1.
  """
  tokens_L = np.asarray(tokens_L, dtype=np.int32)
  is_noise_L = random_spans_noise_mask(len(tokens_L), noise_density, mean_noise_span_length, rng)
  starts_span_L = is_noise_L & ~np.concatenate([[False], is_noise_L[:-1]])
  num_spans = int(starts_span_L.sum())
  if num_spans > tokenizer.num_sentinels:
    raise ValueError(
        f'{num_spans} noise spans need more than the tokenizer\'s {tokenizer.num_sentinels} '
        'sentinels; use shorter sequences or longer spans.'
    )
  sentinels_S = np.array([tokenizer.sentinel_id(k) for k in range(num_spans)], dtype=np.int32)
  eos_1 = np.array([tokenizer.eos_id], dtype=np.int32)

  with_sentinels_L = tokens_L.copy()
  with_sentinels_L[starts_span_L] = sentinels_S
  inputs = with_sentinels_L[~is_noise_L | starts_span_L]
  noise_N = tokens_L[is_noise_L]
  targets = np.insert(noise_N, np.flatnonzero(starts_span_L[is_noise_L]), sentinels_S)
  return np.concatenate([inputs, eos_1]), np.concatenate([targets, eos_1])


def random_window(tokens_N: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly placed window of ``length`` tokens, or all of ``tokens_N`` if it is not longer."""
  if len(tokens_N) <= length:
    return tokens_N
  start = int(rng.integers(0, len(tokens_N) - length + 1))
  return tokens_N[start : start + length]


def pad_or_truncate(ids_N: np.ndarray, length: int, pad_id: int = 0) -> np.ndarray:
  """Returns ids_length int32: ``ids_N`` cut to ``length``, or right-padded with ``pad_id``."""
  out = np.full(length, pad_id, dtype=np.int32)
  kept = min(len(ids_N), length)
  out[:kept] = ids_N[:kept]
  return out


def decoder_features(targets_N: np.ndarray, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Teacher-forcing arrays for a decoder that must predict ``targets_N``, each of shape [length].

  decoder_target_tokens int32: the targets, padded/truncated to ``length``.
  decoder_input_tokens int32: the same shifted right by one, starting with ``pad_id``.
  decoder_loss_weights float32: 1.0 where the target is a real token, 0.0 on padding.
  """
  target_tokens = pad_or_truncate(targets_N, length, pad_id)
  input_tokens = np.concatenate([[pad_id], target_tokens[:-1]]).astype(np.int32)
  loss_weights = (np.arange(length) < min(len(targets_N), length)).astype(np.float32)
  return {
      'decoder_input_tokens': input_tokens,
      'decoder_target_tokens': target_tokens,
      'decoder_loss_weights': loss_weights,
  }


def segment_positions(segment_ids_L: np.ndarray) -> np.ndarray:
  """positions_L int32: 0, 1, 2, ... restarting wherever the segment id changes."""
  segment_ids_L = np.asarray(segment_ids_L)
  index_L = np.arange(len(segment_ids_L))
  starts_L = np.concatenate([[True], segment_ids_L[1:] != segment_ids_L[:-1]])
  return (index_L - np.maximum.accumulate(np.where(starts_L, index_L, 0))).astype(np.int32)


def random_prefix_lengths(segment_ids_L: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """prefix_lengths_L int32: for each token, its segment's prefix length k.

  k is uniform in [1, n - 1] for a segment of n >= 2 tokens (at least one token is predicted) and 0
  for a one-token segment.
  """
  _, starts_S, lengths_S = np.unique(segment_ids_L, return_index=True, return_counts=True)
  high_S = np.maximum(lengths_S - 1, 1)
  prefix_S = np.where(lengths_S >= 2, rng.integers(1, high_S, endpoint=True), 0)
  in_row_order = np.argsort(starts_S)
  return np.repeat(prefix_S[in_row_order], lengths_S[in_row_order]).astype(np.int32)


def packed_decoder_features(
    tokens_L: np.ndarray, segment_ids_L: np.ndarray, prefix_lengths_L: np.ndarray | None = None
) -> dict[str, np.ndarray]:
  """Decoder-only features of a packed row (segment ids 1, 2, ... by contiguous runs; 0 = pad).

  Every array has shape [L]:
  decoder_target_tokens int32: the tokens (0 on padding).
  decoder_input_tokens int32: targets shifted right by one *within* each segment, so a segment
    starts from 0 and never sees the previous one.
  decoder_segment_ids, decoder_positions int32: for the model's attention mask.
  decoder_loss_weights float32: 1.0 on real tokens outside the prefix.
  With ``prefix_lengths_L`` (prefix LM), also decoder_causal_attention int32: 1 on the first k + 1
  positions of a segment with prefix length k, whose decoder inputs are the start token and the
  prefix (t5x's convention); the model lets these attend to each other bidirectionally.
  """
  segment_ids_L = np.asarray(segment_ids_L, np.int32)
  real_L = segment_ids_L > 0
  targets_L = np.where(real_L, tokens_L, 0).astype(np.int32)
  positions_L = np.where(real_L, segment_positions(segment_ids_L), 0).astype(np.int32)
  inputs_L = np.where(positions_L > 0, np.concatenate([[0], targets_L[:-1]]), 0).astype(np.int32)
  features = {
      'decoder_input_tokens': inputs_L,
      'decoder_target_tokens': targets_L,
      'decoder_segment_ids': segment_ids_L,
      'decoder_positions': positions_L,
  }
  loss_L = real_L
  if prefix_lengths_L is not None:
    loss_L = real_L & (positions_L >= prefix_lengths_L)
    features['decoder_causal_attention'] = (real_L & (positions_L <= prefix_lengths_L)).astype(
        np.int32)
  features['decoder_loss_weights'] = loss_L.astype(np.float32)
  return features


def prefix_lm_split(
    tokens_N: np.ndarray, rng: np.random.Generator, inputs_length: int, targets_length: int,
    eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Encoder-decoder prefix LM: (inputs, targets) = (prefix + EOS, rest + EOS).

  ``tokens_N`` (N >= 2, N < inputs_length) is cut at a uniform point k in
  [max(1, N - targets_length + 1), N - 1], so both parts with their EOS fit their lengths.
  """
  n = len(tokens_N)
  k = int(rng.integers(max(1, n - targets_length + 1), n - 1, endpoint=True))
  eos_1 = np.array([eos_id], np.int32)
  return (np.concatenate([tokens_N[:k], eos_1]).astype(np.int32),
          np.concatenate([tokens_N[k:], eos_1]).astype(np.int32))
