"""The independent NumPy float64 reference for the MoE tests (test_moe.py, test_dispatch.py).

Written from the papers' definitions (Switch Transformer, GShard / top-k, expert choice) as
plain per-token and per-expert loops; it imports only NumPy and math and calls no switchmoe
code. Tokens are the rows of [B, L] in row-major order, cut into groups of S consecutive
tokens; capacity is counted per group.

- `ref_switch_layer`, the Switch layer (SW §2) with its statistics: each group routes token
  by token, in sequence order, to its argmax expert; a token whose expert already holds
  ``capacity`` tokens of this group is dropped (output 0), otherwise its output is
  p_i(x) * FFN_i(x). Padding is skipped: it takes no slot, gets output 0 and is left out of
  every statistic, which are means over the real tokens.
- tokens choose (top-k, `ref_tokens_choose`): every token ranks the experts by probability
  and makes k choices; all first choices take capacity before any second choice (and so on),
  within one rank in sequence order, or, batch-prioritized (BPR), by descending top-1
  probability (stable). A choice is kept while its expert holds fewer than ``capacity``
  tokens of the group.
- no-token-left-behind (`ref_ntlb`): after top-1 routing, in round r = 1, 2, ... each
  still-dropped token (same order) tries its (r+1)-th ranked expert and takes a slot if one
  is left.
- experts choose (`ref_experts_choose`): expert e keeps the ``capacity`` tokens of the group
  with the highest p_e.
- padding (`ref_route_real`): each group's real tokens route alone, at the same capacity;
  padding routes nowhere.
- `ref_moe`, the MoE output of any of these routers, as a per-expert loop:
  y[token] = sum over kept choices of gate * FFN_expert(x[token]).

FFN (`ref_ffn`): relu(x @ wi) @ wo, or GEGLU (gelu_tanh(x @ wi_gate) * (x @ wi)) @ wo.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------------------------
# Softmax and the expert FFN.


def ref_softmax(logits):
  """Softmax over the last axis."""
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_ffn(x_D, wi_DxF, wo_FxD, wi_gate_DxF=None, activation='relu'):
  """One expert (or the shared experts' dense FFN) on one token: 'relu' or 'geglu'."""
  h = x_D @ wi_DxF
  if activation == 'geglu':
    h = _gelu_tanh(x_D @ wi_gate_DxF) * h
  elif activation == 'relu':
    h = np.maximum(h, 0.0)
  else:
    raise ValueError(f'unknown activation {activation!r}')
  return h @ wo_FxD


def _expert_weights(w):
  """(router [D,E], wi [E,D,F], wo [E,F,D], wi_gate [E,D,F] or None) of ``w``, in float64."""
  wr, wi, wo = (np.asarray(w[k], np.float64) for k in ('router', 'wi', 'wo'))
  wg = None if w.get('wi_gate') is None else np.asarray(w['wi_gate'], np.float64)
  return wr, wi, wo, wg


# --------------------------------------------------------------------------------------------
# The Switch layer, with its statistics.


def ref_switch_layer(x_BxLxD, w, *, group_size, capacity_factor, min_capacity, activation,
                     alpha=0.0, beta=0.0, gamma=0.0, router_x_BxLxD=None, valid_BxL=None):
  """Float64 Switch layer. ``w``: dict of router [D,E], wi [E,D,F], wo [E,F,D], wi_gate.

  ``router_x_BxLxD`` (optional) is the router's input when it differs from the experts' input
  (router jitter). ``valid_BxL`` (optional, bool) is False on padding; a group without real
  tokens adds no load-balance or importance term. Returns (y_BxLxD, stats, details).
  """
  x = np.asarray(x_BxLxD, np.float64)
  b, l, d = x.shape
  xs = x.reshape(-1, d)
  rx = xs if router_x_BxLxD is None else np.asarray(router_x_BxLxD, np.float64).reshape(-1, d)
  wr, wi, wo, wg = _expert_weights(w)
  e = wr.shape[1]
  n = xs.shape[0]
  s = min(group_size, n)
  assert n % s == 0
  g = n // s
  capacity = max(min_capacity, math.floor(s * capacity_factor / e))
  valid = np.ones(n, bool) if valid_BxL is None else np.asarray(valid_BxL).reshape(n)

  y = np.zeros_like(xs)
  kept = np.zeros(n, bool)
  top = -np.ones(n, int)              # -1 on padding
  margin = np.inf                     # smallest top-1 / top-2 logit gap (tie sanity check)
  lse_sq, top_p, entropy = [], [], []
  balance, importance = [], []
  for gi in range(g):
    count = np.zeros(e, int)
    f_sum, p_sum = np.zeros(e), np.zeros(e)
    real = 0
    for t in range(s):
      j = gi * s + t
      if not valid[j]:
        continue
      real += 1
      logits = rx[j] @ wr
      m = logits.max()
      p = ref_softmax(logits)
      i = int(np.argmax(p))
      top[j] = i
      if e > 1:
        margin = min(margin, np.sort(logits)[-1] - np.sort(logits)[-2])
      lse_sq.append((m + np.log(np.sum(np.exp(logits - m)))) ** 2)
      top_p.append(p[i])
      entropy.append(-np.sum(p * np.log(p)))
      f_sum[i] += 1
      p_sum += p
      if count[i] < capacity:
        y[j] = p[i] * ref_ffn(xs[j], wi[i], wo[i], None if wg is None else wg[i], activation)
        count[i] += 1
        kept[j] = True
      # else: dropped, y[j] stays 0 (the residual carries the token).
    if real:
      balance.append(e * np.sum((f_sum / real) * (p_sum / real)))
      importance.append(np.var(p_sum) / np.mean(p_sum) ** 2)
  load = np.bincount(top[kept], minlength=e)
  stats = {
      'load_balance': alpha * np.mean(balance),
      'importance': gamma * np.mean(importance),
      'z_loss': beta * np.mean(lse_sq),
      'dropped_fraction': 1.0 - kept[valid].mean(),
      'expert_fraction_E': np.bincount(top[valid], minlength=e) / valid.sum(),
      'confidence': np.mean(top_p),
      'entropy': np.mean(entropy),
      'load_cv': np.std(load) / np.mean(load),
  }
  details = dict(capacity=capacity, kept=kept.reshape(b, l), top=top.reshape(b, l),
                 margin=margin, groups=g, group_size=s)
  return y.reshape(b, l, d), stats, details


# --------------------------------------------------------------------------------------------
# Routers: each returns (expert, gate (0 where dropped), position (-1 where dropped), kept),
# all GxSxK.


def _order(probs_SxE, prioritized):
  s = probs_SxE.shape[0]
  if not prioritized:
    return list(range(s))
  top = probs_SxE.max(-1)
  return sorted(range(s), key=lambda t: -top[t])       # Python's sort is stable


def ref_tokens_choose(probs_GxSxE, capacity, k, *, renormalize=False, prioritized=False):
  """Returns expert, gate (0 where dropped), position (-1 where dropped), kept: GxSxK."""
  probs = np.asarray(probs_GxSxE, np.float64)
  g, s, e = probs.shape
  expert = np.zeros((g, s, k), int)
  gate = np.zeros((g, s, k))
  position = -np.ones((g, s, k), int)
  kept = np.zeros((g, s, k), bool)
  for gi in range(g):
    choice_gates = np.zeros((s, k))
    for t in range(s):
      ranked = sorted(range(e), key=lambda j: -probs[gi, t, j])[:k]
      expert[gi, t] = ranked
      choice_gates[t] = probs[gi, t, ranked]
      if renormalize:
        choice_gates[t] /= choice_gates[t].sum()
    count = np.zeros(e, int)
    for rank in range(k):
      for t in _order(probs[gi], prioritized):
        j = expert[gi, t, rank]
        if count[j] < capacity:
          position[gi, t, rank] = count[j]
          count[j] += 1
          kept[gi, t, rank] = True
          gate[gi, t, rank] = choice_gates[t, rank]
  return expert, gate, position, kept


def ref_ntlb(probs_GxSxE, capacity, rounds, *, prioritized=False):
  """Top-1 routing with no-token-left-behind re-routing (K = 1)."""
  probs = np.asarray(probs_GxSxE, np.float64)
  g, s, e = probs.shape
  expert, _, position, kept = ref_tokens_choose(probs, capacity, 1, prioritized=prioritized)
  gate = np.zeros((g, s, 1))
  for gi in range(g):
    count = np.bincount(expert[gi, kept[gi, :, 0], 0], minlength=e)
    for r in range(1, min(rounds, e - 1) + 1):
      for t in _order(probs[gi], prioritized):
        if kept[gi, t, 0]:
          continue
        j = sorted(range(e), key=lambda jj: -probs[gi, t, jj])[r]
        if count[j] < capacity:
          expert[gi, t, 0], position[gi, t, 0], kept[gi, t, 0] = j, count[j], True
          count[j] += 1
    for t in range(s):
      if kept[gi, t, 0]:
        gate[gi, t, 0] = probs[gi, t, expert[gi, t, 0]]
  return expert, gate, position, kept


def ref_experts_choose(probs_GxSxE, capacity):
  """K = E: choice e of a token is expert e."""
  probs = np.asarray(probs_GxSxE, np.float64)
  g, s, e = probs.shape
  expert = np.broadcast_to(np.arange(e), (g, s, e)).copy()
  gate = np.zeros((g, s, e))
  position = -np.ones((g, s, e), int)
  kept = np.zeros((g, s, e), bool)
  for gi in range(g):
    for j in range(e):
      best = sorted(range(s), key=lambda t: -probs[gi, t, j])[:capacity]
      for slot, t in enumerate(best):
        position[gi, t, j], kept[gi, t, j], gate[gi, t, j] = slot, True, probs[gi, t, j]
  return expert, gate, position, kept


def ref_route(probs, capacity, *, router, k=2, renormalize=True, prioritized=False, ntlb=0):
  """The reference of ``router`` ('experts_choose', 'topk', else Switch with ``ntlb``
  rounds)."""
  if router == 'experts_choose':
    return ref_experts_choose(probs, capacity)
  if router == 'topk':
    return ref_tokens_choose(probs, capacity, k, renormalize=renormalize,
                             prioritized=prioritized)
  return ref_ntlb(probs, capacity, ntlb, prioritized=prioritized)


def ref_route_real(probs_GxSxE, capacity, valid_GxS, **route_kw):
  """`ref_route` of each group's real tokens alone (``valid_GxS`` True), at the same
  capacity. Padding routes nowhere: expert and position -1, gate 0, kept False."""
  g, s, _ = probs_GxSxE.shape
  routed = None
  for gi in range(g):
    real = np.flatnonzero(valid_GxS[gi])
    part = ref_route(probs_GxSxE[gi:gi + 1, real], capacity, **route_kw)
    if routed is None:
      k = part[0].shape[-1]
      routed = (-np.ones((g, s, k), int), np.zeros((g, s, k)), -np.ones((g, s, k), int),
                np.zeros((g, s, k), bool))
    for full, got in zip(routed, part):
      full[gi, real] = got[0]
  return routed


# --------------------------------------------------------------------------------------------
# The MoE layer of any router.


def ref_moe(x_BxLxD, w, *, group_size, capacity, valid_BxL=None, activation='relu',
            **route_kw):
  """Float64 MoE layer, per-expert loop. ``w``: dict of router [D,E], wi [E,D,F], wo [E,F,D]
  and (GEGLU) wi_gate; ``valid_BxL`` (bool, None: all True) is False on padding;
  ``route_kw`` go to `ref_route`. Returns (y_BxLxD, probs_GxSxE, routing tuple)."""
  x = np.asarray(x_BxLxD, np.float64)
  xs = x.reshape(-1, x.shape[-1])
  n = xs.shape[0]
  s = min(group_size, n)
  g = n // s
  wr, wi, wo, wg = _expert_weights(w)
  probs = ref_softmax(xs @ wr).reshape(g, s, -1)
  valid = np.ones(n, bool) if valid_BxL is None else np.asarray(valid_BxL)
  expert, gate, position, kept = ref_route_real(probs, capacity, valid.reshape(g, s),
                                                **route_kw)
  y = np.zeros_like(xs)
  for e in range(wr.shape[1]):
    for gi, t, kk in zip(*np.nonzero(kept & (expert == e))):
      j = gi * s + t
      y[j] += gate[gi, t, kk] * ref_ffn(xs[j], wi[e], wo[e], None if wg is None else wg[e],
                                        activation)
  return y.reshape(x.shape), probs, (expert, gate, position, kept)


def min_gap(probs_GxSxE, prioritized=False):
  """Smallest log-gap between probabilities the routers compare (tie sanity check)."""
  p = np.log(np.asarray(probs_GxSxE, np.float64))
  gaps = [np.diff(np.sort(p, -1), axis=-1).min(), np.diff(np.sort(p, 1), axis=1).min()]
  if prioritized:
    gaps.append(np.diff(np.sort(p.max(-1), -1), axis=-1).min())
  return min(gaps)
