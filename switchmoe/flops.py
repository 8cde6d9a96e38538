"""Model FLOPs per training step and the devices' peak throughput, for MFU.

Counted analytically from the config, as in PaLM's MFU (Chowdhery et al. 2022, App. B):
matrix multiplications only, 2 FLOPs per multiply-add, and a training step costs 3x the
forward pass (the backward pass computes gradients for activations and for weights). With
d = d_model, h = num_heads * d_kv, f = d_ff, V = vocab_size, E = num_experts:

  FFN (dense, or each expert):  2 * (n_in + 1) * d * f per token, n_in = 2 for GEGLU, else 1
  attention projections:        2 * 4 * d * h per token (q, k, v, out)
  attention scores and values:  2 * 2 * L_keys * h per query token (causal masks included)
  cross-attention:              q, out on decoder tokens; k, v on encoder tokens, per layer
  Switch layer:                 router 2 * d * E, plus the FFN of the experts a token uses:
                                k for top-k and dropless, capacity_factor for experts_choose,
                                plus num_shared_experts always-on experts for every token;
                                capacity padding and dropped tokens are not subtracted, the
                                dispatch and combine einsums not added: only active compute
  logits:                       2 * d * V per decoder token

MFU = model FLOPs per step / step time / (peak FLOP/s per device * devices).
"""

from __future__ import annotations

import ml_collections

from switchmoe.model import is_moe_layer

# Dense bfloat16 peak FLOP/s per JAX device, matched as substrings of `device_kind`, most
# specific first. CPUs have no meaningful peak: set train.peak_flops to measure MFU there.
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('A100', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None if unknown (CPU)."""
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def experts_per_token(moe: ml_collections.ConfigDict) -> float:
  """How many expert FFNs each token's activations pass through, on average."""
  if moe.router == 'topk':
    return float(moe.num_selected)
  if moe.router == 'experts_choose':
    return float(moe.capacity_factor)
  return 1.0


def _stack_flops(m: ml_collections.ConfigDict, num_layers: int, tokens: int, length: int, *,
                 cross_tokens: int = 0, cross_length: int = 0) -> float:
  """Forward FLOPs of one stack over ``tokens`` tokens (rows of ``length``)."""
  d, h, f = m.d_model, m.num_heads * m.d_kv, m.d_ff
  ffn = 2 * ((2 if m.ffn_activation == 'geglu' else 1) + 1) * d * f
  moe = 2 * d * m.moe.num_experts + (experts_per_token(m.moe) + m.moe.num_shared_experts) * ffn
  total = 0.0
  for i in range(num_layers):
    per_token = 2 * 4 * d * h + 2 * 2 * length * h
    if cross_tokens:
      per_token += 2 * 2 * d * h + 2 * 2 * cross_length * h
      total += cross_tokens * 2 * 2 * d * h
    per_token += moe if is_moe_layer(i, m.moe.every) else ffn
    total += tokens * per_token
  return total


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of one training step on the global batch (3x the forward pass)."""
  m, b = config.model, config.train.batch_size
  lt = config.data.targets_length
  decoder_layers = m.num_decoder_layers or m.num_layers
  forward = 2 * m.d_model * m.vocab_size * b * lt
  if m.arch == 'encoder_decoder':
    li = config.data.inputs_length
    forward += _stack_flops(m, m.num_layers, b * li, li)
    forward += _stack_flops(m, decoder_layers, b * lt, lt, cross_tokens=b * li,
                            cross_length=li)
  else:
    forward += _stack_flops(m, decoder_layers, b * lt, lt)
  return 3 * forward
