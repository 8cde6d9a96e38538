"""Train a model: python scripts/train.py --config=configs/switch_tiny.py --workdir=DIR."""

from switchmoe.main import run

if __name__ == '__main__':
  run()
