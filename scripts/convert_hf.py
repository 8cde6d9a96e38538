"""Convert a HuggingFace SwitchTransformers / T5 checkpoint folder into a switchmoe export.

  python scripts/convert_hf.py --hf_dir=DIR --out=OUT

DIR holds ``config.json`` and safetensors weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), as ``huggingface-cli download google/switch-base-8`` leaves
them; nothing is downloaded here and torch is not needed. OUT (must not exist) gets the export
(``params/`` and ``config.json``, as `scripts/export.py` writes) and ``config.py``, a config
file for ``switchmoe-train`` that fine-tunes from it:

  switchmoe-train --config=OUT/config.py --workdir=runs/ft
  python scripts/evaluate.py OUT

Conventions that differ between the two code bases, and how the conversion keeps the
checkpoint's function, are listed in `switchmoe/convert.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CONFIG_FILE = '''"""Fine-tune the checkpoint converted from {hf_dir}."""

from switchmoe.checkpoint import find_config


def get_config():
  c = find_config({out!r})   # the converted model, with default data and training fields
  c.train.init_from = {out!r}
  return c
'''


def convert(hf_dir: str, out: str) -> int:
  """Writes the export and its config file; returns the number of parameter arrays."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f'--out={out}: exists; allowed: a new folder')
  from switchmoe import checkpoint as checkpoint_lib
  from switchmoe import convert as convert_lib
  import jax
  params, config = convert_lib.load_hf_params(hf_dir)
  checkpoint_lib.save_params(out, params, json.loads(config.to_json()))
  with open(os.path.join(out, 'config.py'), 'w') as f:
    f.write(CONFIG_FILE.format(hf_dir=os.path.abspath(hf_dir), out=out))
  return len(jax.tree.leaves(params))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hf_dir', required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  try:
    count = convert(args.hf_dir, args.out)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Converted {count} parameter arrays from {os.path.abspath(args.hf_dir)} to '
        f'{os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
