"""Generate text from a trained or converted model: greedy or sampled, with a KV cache.

  python scripts/generate.py --checkpoint=PATH --text="The <extra_id_0> walks in <extra_id_1> park"

PATH is a run folder (its latest checkpoint), a ``checkpoints/<step>`` folder or an export
(``export.py``, ``convert_hf.py``). An encoder-decoder model reads each ``--text`` as its
input (``<extra_id_i>`` marks span i to fill, as in span corruption, padded to
``data.inputs_length``) and prints what its decoder writes; a decoder-only model continues
each text. ``--temperature`` 0 (default) is greedy; above 0 it samples, optionally from the
``--top_k`` most likely tokens or the ``--top_p`` nucleus. ``--beams`` > 1 is beam search
(``--length_alpha``: GNMT length penalty). Any ``--config.a.b=v`` overrides the
stored config. One line per text: ``<text> -> <output>``.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

_SENTINEL = re.compile(r'<extra_id_(\d+)>')


def encode(tokenizer, text: str) -> np.ndarray:
  """ids of ``text`` with each ``<extra_id_i>`` as sentinel i."""
  ids, start = [], 0
  for match in _SENTINEL.finditer(text):
    ids.extend(tokenizer.encode(text[start:match.start()]).tolist())
    ids.append(tokenizer.sentinel_id(int(match.group(1))))
    start = match.end()
  ids.extend(tokenizer.encode(text[start:]).tolist())
  return np.asarray(ids, np.int32)


def generate_texts(path: str, texts: list[str], overrides: list[str], *, max_new_tokens: int,
                   temperature: float, top_k: int, top_p: float, seed: int, beams: int = 1,
                   length_alpha: float = 0.0) -> list[str]:
  import jax
  from flax import nnx
  from switchmoe import decode, token_routing, train
  from switchmoe.tokenizer import make_tokenizer
  s, params = token_routing.load_model(path, overrides)
  config = s.config
  tokenizer = make_tokenizer(config.data.tokenizer)
  outputs = []
  with train.mesh_context(s):
    model = nnx.merge(s.graphdef, jax.device_get(params))
    for i, text in enumerate(texts):
      ids = encode(tokenizer, text)
      if config.model.arch == 'encoder_decoder':
        length = config.data.inputs_length
        ids = np.append(ids[:length - 1], np.int32(tokenizer.eos_id))
        feed = {'encoder_tokens_BxL': np.pad(ids, (0, length - len(ids)))[None]}
      else:
        feed = {'prompt_BxP': ids[None]}
      if beams > 1:
        tokens, _ = decode.beam_search(model, max_new_tokens=max_new_tokens, beams=beams,
                                       length_alpha=length_alpha, eos_id=tokenizer.eos_id,
                                       **feed)
      else:
        tokens, _ = decode.generate(
            model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, key=jax.random.key(seed + i), eos_id=tokenizer.eos_id, **feed)
      outputs.append(tokenizer.decode(np.asarray(tokens[0])))
  return outputs


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--text', action='append', required=True)
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--temperature', type=float, default=0.0)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--beams', type=int, default=1)
  parser.add_argument('--length_alpha', type=float, default=0.0)
  args, overrides = parser.parse_known_args(argv)
  try:
    for name, value, ok in (('--max_new_tokens', args.max_new_tokens, args.max_new_tokens >= 1),
                            ('--temperature', args.temperature, args.temperature >= 0),
                            ('--top_k', args.top_k, args.top_k >= 0),
                            ('--top_p', args.top_p, 0 < args.top_p <= 1),
                            ('--beams', args.beams, args.beams >= 1),
                            ('--length_alpha', args.length_alpha, args.length_alpha >= 0)):
      if not ok:
        raise ValueError(f'{name}={value}: out of range')
    if args.beams > 1 and args.temperature > 0:
      raise ValueError(f'--beams={args.beams}: beam search does not sample; allowed: '
                       '--temperature=0 with --beams > 1')
    outputs = generate_texts(args.checkpoint, args.text, overrides,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             beams=args.beams, length_alpha=args.length_alpha)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for text, output in zip(args.text, outputs):
    print(f'{text} -> {output}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
