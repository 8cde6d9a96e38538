"""Convert HuggingFace SwitchTransformers / T5 checkpoints to switchmoe exports and back.

  python scripts/convert_hf.py --hf_dir=DIR --out=OUT            # HF folder -> switchmoe
  python scripts/convert_hf.py --checkpoint=PATH --hf_out=DIR    # switchmoe -> HF folder

DIR holds ``config.json`` and safetensors weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), as ``huggingface-cli download google/switch-base-8`` leaves
them; nothing is downloaded here and torch is not needed. OUT (must not exist) gets the export
(``params/`` and ``config.json``, as `scripts/export.py` writes) and ``config.py``, a config
file for ``switchmoe-train`` that fine-tunes from it:

  switchmoe-train --config=OUT/config.py --workdir=runs/ft
  python scripts/evaluate.py OUT

The weights are streamed onto the run's mesh, never the whole model on the host: each
parameter is read tensor by tensor, placed on the devices that hold it (experts split over
``expert``) and written from there, shard by shard. ``--config.mesh.*`` sets that mesh as for
``switchmoe-train`` (it is stored with the export, so fine-tuning runs on it too); check first
that the model fits it with ``scripts/plan.py --config=OUT/config.py``, or before converting
with the same flags on a config file of the same model:

  python scripts/convert_hf.py --hf_dir=switch-base-128 --out=sb128 \
      --config.mesh.shape='(2,4)' --config.mesh.axes="('data','expert')"

Several hosts: start the same command on each, as for a multi-process ``switchmoe-train``
(`jax.distributed` finds the cluster, or give ``--coordinator_address``, ``--num_processes``
and ``--process_id``); each process reads only its own devices' blocks.

The reverse direction writes ``config.json`` and ``model.safetensors`` from a run folder (its
latest step), a checkpoint step or an export, for a model HF can express (a Switch model needs
``model.moe.group_size=0`` and a fixed ``model.moe.expert_capacity``, as converted ones have);
``transformers``' ``from_pretrained(DIR)`` loads it.

Conventions that differ between the two code bases, and how the conversion keeps the
checkpoint's function, are listed in `switchmoe/convert.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CONFIG_FILE = '''"""Fine-tune the checkpoint converted from {hf_dir}: the Switch Transformer
recipe (SW §4) on a task's .jsonl files of {{"inputs": ..., "targets": ...}} records,

  switchmoe-train --config={out}/config.py --config.data.files='task/*.jsonl' --workdir=...
"""

from switchmoe.checkpoint import find_config
from switchmoe.config import finetune_recipe


def get_config():
  c = finetune_recipe(find_config({out!r}))  # the converted model, its routing and tokenizer
  c.train.init_from = {out!r}
  return c
'''


def convert(hf_dir: str, out: str, overrides: list[str]) -> int:
  """Writes the export and its config file; returns the number of parameter arrays."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f'--out={out}: exists; allowed: a new folder')
  bad = [arg for arg in overrides if not arg.startswith('--config.mesh.')]
  if bad:
    raise ValueError(f'{bad[0]}: unknown flag; allowed: --hf_dir, --out, --checkpoint, '
                     '--hf_out, --config.mesh.* (the layout to place the weights on)')
  import jax
  from switchmoe import checkpoint as checkpoint_lib
  from switchmoe import config as config_lib
  from switchmoe import convert as convert_lib
  from switchmoe import sharding
  from switchmoe.main import apply_overrides
  config = convert_lib.config_from_hf(convert_lib.read_hf_config(hf_dir), hf_dir)
  apply_overrides(config, overrides)
  config_lib.validate(config)  # a bad mesh field fails here, before any weight is read
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  params, _ = convert_lib.load_hf_params(hf_dir, mesh, sharding.merge_rules(config.mesh.rules))
  checkpoint_lib.save_params(out, params, json.loads(config.to_json()))
  if jax.process_index() == 0:
    with open(os.path.join(out, 'config.py'), 'w') as f:
      f.write(CONFIG_FILE.format(hf_dir=os.path.abspath(hf_dir), out=out))
  return len(jax.tree.leaves(params))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hf_dir', help='a HuggingFace folder to convert (with --out)')
  parser.add_argument('--out', help='the new switchmoe export (with --hf_dir)')
  parser.add_argument('--checkpoint', help='a switchmoe run, step or export (with --hf_out)')
  parser.add_argument('--hf_out', help='the new HuggingFace folder (with --checkpoint)')
  parser.add_argument('--coordinator_address', default='', help='host:port of process 0')
  parser.add_argument('--num_processes', type=int, default=0)
  parser.add_argument('--process_id', type=int, default=-1)
  args, overrides = parser.parse_known_args(argv)
  from switchmoe import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  try:
    if args.hf_dir and args.out and not (args.checkpoint or args.hf_out):
      count = convert(args.hf_dir, args.out, overrides)
      print(f'Converted {count} parameter arrays from {os.path.abspath(args.hf_dir)} to '
            f'{os.path.abspath(args.out)}')
    elif args.checkpoint and args.hf_out and not (args.hf_dir or args.out or overrides):
      from switchmoe import convert as convert_lib
      count = convert_lib.checkpoint_to_hf(args.checkpoint, args.hf_out)
      print(f'Wrote {count} tensors of {os.path.abspath(args.checkpoint)} to '
            f'{os.path.abspath(args.hf_out)}')
    else:
      raise ValueError('give --hf_dir and --out (HF -> switchmoe), or --checkpoint and '
                       '--hf_out (switchmoe -> HF)')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
