"""Switch-Base (SW Table 9): T5-Base with a 128-expert Switch FFN in every other layer.

Same FLOPs per token as t5_base.py; about 7B parameters. Capacity factor 1.25 in training,
2.0 in evaluation. Lay experts over devices with e.g. --config.mesh.shape='(-1,32)'.
"""

from switchmoe.config import base_size, default_config


def get_config():
  c = base_size(default_config())
  e = c.model.moe
  # 512 divides both stacks' tokens per batch: 256 * 512 (encoder) and 256 * 114 (decoder).
  e.every, e.num_experts, e.group_size = 2, 128, 512
  e.capacity_factor, e.eval_capacity_factor = 1.25, 2.0
  return c
