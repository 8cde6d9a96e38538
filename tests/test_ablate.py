"""scripts/ablate.py: every study's rows validate; a tiny sweep trains, summarizes, resumes."""

import json
import math
import os

import pytest

from tests.train_helpers import load_script

ablate = load_script('ablate')

TINY = ['--steps=4', '--config.train.eval_every=4', '--config.train.eval_batches=1',
        '--config.train.log_every=2', '--config.model.num_layers=2']


@pytest.mark.parametrize('table', sorted(ablate.STUDIES))
def test_list_validates_every_row(table, capsys):
  assert ablate.main([table, '--list']) == 0
  out = capsys.readouterr().out
  for row in ablate.STUDIES[table].rows:
    assert f'  {row.name} ' in out


@pytest.mark.parametrize('argv, message', [
    (['sw_table9'], "TABLE='sw_table9': unknown study"),
    (['sw_table2', '--only=float32,fp8'], "--only='fp8': no such row in sw_table2"),
    (['sw_table2', '--config.model.moe.num_expertz=4'], 'did you mean num_experts?'),
    (['sw_table2', '--list', '--config.model.dtype=float16'], "model.dtype='float16'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
  assert ablate.main(argv + [f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1
  assert not os.listdir(tmp_path)


def test_sweep_summarizes_and_skips_finished_rows(data_dir, tmp_path, capsys):
  argv = ['sw_table2', '--only=float32,selective', f'--out={tmp_path}',
          f'--config.data.data_dir={data_dir}'] + TINY
  assert ablate.main(argv) == 0
  with open(tmp_path / 'sw_table2' / 'summary.json') as f:
    summary = json.load(f)
  assert [r['row'] for r in summary['rows']] == ['float32', 'selective']
  for row in summary['rows']:
    assert math.isfinite(row['neg_log_perplexity']) and row['neg_log_perplexity'] < 0
    assert row['tokens_per_sec'] > 0 and row['paper'] is not None and not row['failed']
  assert 'paper (full scale)' in (tmp_path / 'sw_table2' / 'summary.md').read_text()
  capsys.readouterr()

  assert ablate.main(argv) == 0  # nothing left to train: both rows are skipped
  out = capsys.readouterr().out
  assert out.count(': skip, finished') == 2 and 'Compiled' not in out
  with open(tmp_path / 'sw_table2' / 'summary.json') as f:
    assert json.load(f)['rows'] == summary['rows']
