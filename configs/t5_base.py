"""T5-Base (T5.1.1 style, GEGLU, ~0.2B parameters): the dense baseline of SW Table 1.

Needs accelerators; see switchmoe.config.base_size for the sizes and training setup.
"""

from switchmoe.config import base_size, default_config


def get_config():
  c = base_size(default_config())
  c.model.moe.every = 0
  return c
