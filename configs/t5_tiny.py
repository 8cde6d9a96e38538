"""Dense T5 twin of switch_tiny.py: same layers and FLOPs per token, no experts."""

from switchmoe.config import default_config


def get_config():
  c = default_config()
  c.model.moe.every = 0
  c.train.num_steps = 300
  c.optim.warmup_steps = 100
  return c
