"""Switch Transformer, tiny: the CPU default (a few minutes on 2 cores).

4+4 layers, d_model 128, 8 experts in every other FFN, span corruption on the embedded
standard-library corpus (128 input / 32 target bytes).
"""

from switchmoe.config import default_config


def get_config():
  c = default_config()
  c.model.moe.num_experts = 8
  c.model.moe.every = 2
  c.train.num_steps = 300
  c.optim.name = 'adafactor'
  c.optim.learning_rate = 0.01
  c.optim.warmup_steps = 100
  return c
