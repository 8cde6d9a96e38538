"""Which expert each token of a text goes to, in each encoder Switch layer of a trained model.

`route_texts` loads a run folder, checkpoint step or export (`load_model`: its stored config,
as ``scripts/evaluate.py`` does), puts each text in one encoder row (its tokens, then EOS,
padded to ``data.inputs_length``; longer texts are cut) and reads every encoder Switch layer's
`routing.Routing` by `nnx.capture` (`moe.MoeLayer` ``sow_routing``). Routing is evaluation's:
deterministic, at ``model.moe.eval_capacity_factor``. Rows go in batches of
``train.batch_size`` (empty rows fill the last one), so routing groups and capacity are those
of evaluation: padding is not routed and takes no slot, and a token is dropped when the real
tokens before it in its group (in sequence order, or by BPR priority) filled its expert.
`render` shows one text as a token / expert table.

Shape suffixes: B batch, L tokens (a text's, or the encoder length), K choices per token
(1 for ``switch``, k for ``topk``, E for ``experts_choose``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import config as config_lib
from switchmoe import train
from switchmoe.main import apply_overrides
from switchmoe.tokenizer import make_tokenizer

# Visible stand-ins for whitespace and control characters in a rendered token.
_VISIBLE = {' ': '\u2423', '\n': '\u23ce', '\t': '\u21e5'}


class TextRouting(NamedTuple):
  """One text's routing. Per Switch layer (``encoder/layer_1``, ... as in the model's aux)."""
  text: str
  tokens_L: np.ndarray                     # int32 encoder input ids: the text's, then EOS
  pieces: list[str]                        # each token as text (whitespace made visible)
  expert_index_LxK: dict[str, np.ndarray]  # int32 expert of each choice
  kept_LxK: dict[str, np.ndarray]          # bool: the choice got a slot under capacity


def load_model(path: str, overrides: Sequence[str] = ()) -> tuple[train.Setup, Any]:
  """(setup, params) of a run folder (its latest step), checkpoint step or export, built from
  its stored config with ``--config.a.b=v`` ``overrides``. ValueError names a bad path or
  field."""
  config = checkpoint_lib.find_config(path)
  apply_overrides(config, list(overrides))
  config_lib.validate(config)
  s = train.make_setup(config)
  with train.mesh_context(s):
    params, _ = checkpoint_lib.load_params(path, s.abstract_state['params'])
  return s, params


def _capture_routing(graphdef: nnx.GraphDef, params, batch: dict) -> dict[str, Any]:
  """{encoder Switch layer name: its Routing on ``batch``}, from one evaluation forward pass."""
  model = nnx.merge(graphdef, params)
  layers = model.encoder.switch_layers('encoder')
  for _, layer in layers:
    layer.sow_routing = True
  _, sown = nnx.capture(lambda m: m(batch, deterministic=True), nnx.Intermediate)(model)
  sown = dict(nnx.to_flat_state(sown))
  paths = {id(module): path for path, module in nnx.iter_modules(model)}
  return {name: sown[paths[id(layer)] + ('routing',)].get_value()[0] for name, layer in layers}


def _piece(tokenizer, token: int) -> str:
  if token == tokenizer.eos_id:
    return '</s>'
  text = tokenizer.decode([token])
  return ''.join(_VISIBLE.get(c, c if c.isprintable() else '\ufffd') for c in text)


def route_texts(path: str, texts: Sequence[str], overrides: Sequence[str] = ()
                ) -> list[TextRouting]:
  """Each text's encoder routing under the model at ``path`` (see the module docstring)."""
  s, params = load_model(path, overrides)
  config = s.config
  if config.model.arch != 'encoder_decoder':
    raise ValueError(f'model.arch={config.model.arch!r}: token routing reads the encoder; '
                     'allowed: encoder_decoder')
  tokenizer = make_tokenizer(config.data.tokenizer)
  length, rows = config.data.inputs_length, config.train.batch_size
  tokens = [np.append(tokenizer.encode(text)[:length - 1], np.int32(tokenizer.eos_id))
            for text in texts]
  capture = jax.jit(functools.partial(_capture_routing, s.graphdef))
  results = []
  for start in range(0, len(texts), rows):
    chunk = tokens[start:start + rows]
    inputs_BxL = np.zeros((rows, length), np.int32)
    for i, ids_L in enumerate(chunk):
      inputs_BxL[i, :len(ids_L)] = ids_L
    # The decoder only has to run: one start token per row, its target EOS.
    batch = {'encoder_input_tokens': inputs_BxL,
             'decoder_input_tokens': np.zeros((rows, 1), np.int32),
             'decoder_target_tokens': np.full((rows, 1), tokenizer.eos_id, np.int32)}
    with train.mesh_context(s):
      routed = jax.device_get(capture(params, train.device_batch(s, batch)))
    for i, ids_L in enumerate(chunk):
      n = len(ids_L)
      # Groups split the batch's B * L tokens in row-major order, so [G, S] reshapes to [B, L].
      per_row = lambda a_GxSxK: a_GxSxK.reshape(rows, length, -1)[i, :n]
      results.append(TextRouting(
          text=texts[start + i], tokens_L=ids_L,
          pieces=[_piece(tokenizer, int(t)) for t in ids_L],
          expert_index_LxK={k: per_row(r.expert_index_GxSxK) for k, r in routed.items()},
          kept_LxK={k: per_row(r.kept_GxSxK) for k, r in routed.items()}))
  return results


def render(r: TextRouting, width: int = 96) -> str:
  """A token / expert table: a line of tokens, then one line per Switch layer with the
  expert(s) each token was kept in (``-``: dropped, routed nowhere), in aligned columns
  wrapped at ``width`` characters; last, each layer's count of dropped tokens."""
  names = list(r.expert_index_LxK)
  labels = {name: [','.join(str(e) for e in experts_K[kept_K]) or '-'
                   for experts_K, kept_K in zip(r.expert_index_LxK[name], r.kept_LxK[name])]
            for name in names}
  heads = ['token', *names]
  head_width = max(map(len, heads))
  columns = [[piece, *(labels[name][i] for name in names)] for i, piece in enumerate(r.pieces)]
  blocks, block, used = [], [], head_width
  for column in columns:
    column_width = max(map(len, column)) + 1
    if block and used + column_width > width:
      blocks.append(block)
      block, used = [], head_width
    block.append(column)
    used += column_width
  blocks.append(block)

  def lines(block):
    widths = [max(map(len, column)) for column in block]
    return '\n'.join(' '.join([head.ljust(head_width)] +
                              [column[row].ljust(w) for column, w in zip(block, widths)]).rstrip()
                     for row, head in enumerate(heads))

  dropped = ', '.join(f'{name} {int(np.sum(~np.any(r.kept_LxK[name], axis=-1)))}'
                      for name in names)
  return '\n\n'.join(map(lines, blocks)) + f'\n\ndropped tokens (of {len(r.pieces)}): {dropped}'
