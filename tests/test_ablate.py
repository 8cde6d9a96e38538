"""scripts/ablate.py: every study's rows validate at every scale; the statistics agree with
scipy's and with hand-computed cases; a smoke sweep trains, summarizes and skips finished runs."""

import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from tests.train_helpers import compile_cache, load_script  # noqa: F401  (fixture)

ablate = load_script('ablate')


@pytest.mark.parametrize('scale', sorted(ablate.SCALES))
@pytest.mark.parametrize('table', sorted(ablate.STUDIES))
def test_list_validates_every_row(table, scale, capsys):
  assert ablate.main([table, '--list', f'--scale={scale}']) == 0
  out = capsys.readouterr().out
  for row in ablate.STUDIES[table].rows:
    assert f'  {row.name} ' in out
  assert out.count('  claim: ') == len(ablate.STUDIES[table].claims)


def test_every_claim_names_rows_of_its_study():
  for table, study in ablate.STUDIES.items():
    names = [r.name for r in study.rows]
    assert len(set(names)) == len(names), table
    for claim in study.claims:
      assert claim.better in names and claim.worse in names, (table, claim)


@pytest.mark.parametrize('argv, message', [
    (['sw_table9'], "STUDY='sw_table9': unknown study"),
    (['sw_table2', '--only=float32,fp8'], "--only='fp8': no such row in sw_table2"),
    (['sw_table2', '--list', '--only=fp8'], "--only='fp8': no such row in sw_table2"),
    (['--list', '--only=float32'], '--only: needs a STUDY'),
    (['sw_table2', '--scale=huge'], "--scale='huge': unknown scale; allowed: smoke, cpu, paper"),
    (['sw_table2', '--config.model.moe.num_expertz=4'], 'did you mean num_experts?'),
    (['sw_table2', '--list', '--config.model.dtype=float16'], "model.dtype='float16'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
  assert ablate.main(argv + [f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1
  assert not os.listdir(tmp_path)


def test_help_describes_every_argument(capsys):
  with pytest.raises(SystemExit):
    ablate.main(['--help'])
  out = capsys.readouterr().out
  for text in ('sw_table1', 'smoke:', 'cpu:', 'paper:', 'seeds per row', 'rows to run',
               'train nothing', 'OUT/STUDY/ROW/seed_i'):
    assert text in out, text


def test_mean_interval_is_the_t_interval():
  values = [-2.31, -2.28, -2.35, -2.30]
  got = ablate.mean_interval(values)
  low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                     scale=scipy.stats.sem(values))
  np.testing.assert_allclose([got['mean'], got['std'], got['low'], got['high']],
                             [np.mean(values), np.std(values, ddof=1), low, high])
  one = ablate.mean_interval([-2.3])
  assert one['mean'] == -2.3 and one['std'] is None and one['low'] is None


def test_difference_is_paired_by_seed_or_welch():
  a, b = {0: 1.0, 1: 1.5, 2: 1.2}, {0: 0.8, 1: 1.4, 2: 0.9}
  paired = ablate.difference(a, b)
  d = [0.2, 0.1, 0.3]
  low, high = scipy.stats.t.interval(0.95, 2, loc=np.mean(d), scale=scipy.stats.sem(d))
  assert paired['paired']
  np.testing.assert_allclose([paired['mean'], paired['low'], paired['high']],
                             [np.mean(d), low, high])

  unpaired = ablate.difference({0: 1.0, 1: 1.5, 2: 1.2}, {3: 0.8, 4: 1.4, 5: 0.9, 6: 1.0})
  ci = scipy.stats.ttest_ind([1.0, 1.5, 1.2], [0.8, 1.4, 0.9, 1.0],
                             equal_var=False).confidence_interval(0.95)
  assert not unpaired['paired']
  np.testing.assert_allclose([unpaired['low'], unpaired['high']], [ci.low, ci.high], rtol=1e-6)


@pytest.mark.parametrize('values, base, verdict', [
    ({0: 1.2, 1: 1.3, 2: 1.25}, {0: 1.0, 1: 1.1, 2: 1.05}, 'reproduced'),
    ({0: 1.0, 1: 1.1, 2: 1.05}, {0: 1.2, 1: 1.3, 2: 1.25}, 'not reproduced (the opposite holds)'),
    ({0: 1.2, 1: 1.0, 2: 1.1}, {0: 1.0, 1: 1.2, 2: 1.1}, 'inconclusive (the interval contains 0)'),
    ({0: 1.2}, {0: 1.0}, 'inconclusive (one seed: no interval)'),
])
def test_verdict(values, base, verdict):
  assert ablate.verdict(ablate.difference(values, base)) == verdict


def test_steps_to_reach_interpolates_between_evaluations():
  curve = [(10, -3.0), (20, -2.5), (30, -2.0)]
  assert ablate.steps_to_reach(curve, -2.25) == pytest.approx(25.0)
  assert ablate.steps_to_reach(curve, -3.5) == 10.0
  assert ablate.steps_to_reach(curve, -1.0) is None


def _runs(curves, step_time):
  return [{'seed': seed, 'error': None,
           'records': [{'step': s, 'eval/neg_log_perplexity': q, 'perf/step_time': step_time,
                        'perf/tokens_per_sec': 1.0, 'eval/accuracy': 0.5}
                       for s, q in curve]}
          for seed, curve in enumerate(curves)]


def test_speedup_is_steps_and_time_to_the_baselines_final_quality():
  steps = [25, 50, 75, 100]
  base = _runs([list(zip(steps, [-3.0, -2.6, -2.3, -2.1])),
                list(zip(steps, [-3.1, -2.7, -2.3, -2.1]))], step_time=1.0)
  # Reaches -2.1 (the baseline's final mean) half way between steps 25 and 50, at 37.5.
  fast = _runs([list(zip(steps, [-2.5, -1.7, -1.6, -1.5])),
                list(zip(steps, [-2.3, -1.9, -1.6, -1.5]))], step_time=1.5)
  row = ablate.summarize_row(ablate.Row('fast', 'switch', {}), fast, base, 100)
  assert row['steps_to_baseline'] == pytest.approx(37.5)
  assert row['speedup_steps'] == pytest.approx(100 / 37.5)
  assert row['speedup_time'] == pytest.approx(100 * 1.0 / (37.5 * 1.5))
  assert row['neg_log_perplexity'] == pytest.approx(-1.5)
  assert row['difference']['mean'] == pytest.approx(0.6) and row['difference']['paired']
  slow = _runs([list(zip(steps, [-3.5, -3.0, -2.8, -2.5]))] * 2, step_time=1.0)
  assert ablate.summarize_row(ablate.Row('slow', 'switch', {}), slow, base,
                              100)['steps_to_baseline'] is None


@pytest.mark.slow
def test_smoke_sweep_summarizes_and_skips_finished_runs(data_dir, compile_cache, tmp_path,
                                                        capsys):
  argv = ['sw_table3', '--scale=smoke', '--seeds=2', f'--out={tmp_path}',
          f'--config.data.data_dir={data_dir}']
  assert ablate.main(argv) == 0
  folder = tmp_path / 'sw_table3'
  with open(folder / 'sw_table3.json') as f:
    summary = json.load(f)
  assert [r['row'] for r in summary['rows']] == ['init_0.1', 'init_1.0']
  assert summary['scale'] == 'smoke' and summary['steps'] == 6 and summary['seeds'] == 2
  for row in summary['rows']:
    finals = list(row['final_by_seed'].values())
    assert len(finals) == 2 and all(math.isfinite(v) and v < 0 for v in finals)
    assert row['interval'][0] < row['neg_log_perplexity'] < row['interval'][1]
    assert row['tokens_per_sec'] > 0 and row['paper'] is not None and not row['failed']
  claim, = summary['claims']
  assert claim['verdict'].split(' ')[0] in ('reproduced', 'not', 'inconclusive')
  assert summary['provenance']['command'].startswith('python scripts/ablate.py sw_table3')
  assert summary['train_seconds'] > 0
  text = (folder / 'sw_table3.md').read_text()
  assert '| paper claim |' in text and 'paired by seed' in text
  assert os.path.getsize(folder / 'sw_table3.png') > 10_000
  capsys.readouterr()

  assert ablate.main(argv) == 0  # nothing left to train: every run is skipped
  out = capsys.readouterr().out
  assert out.count(': skip, finished') == 4 and 'Compiled' not in out
  with open(folder / 'sw_table3.json') as f:
    again = json.load(f)
  assert again['rows'] == summary['rows'] and again['train_seconds'] == summary['train_seconds']

  # --summarize trains nothing: a third seed, never run, is left out of the summary, but a
  # diverged one is a failed result.
  os.makedirs(folder / 'init_1.0' / 'seed_2')
  with open(folder / 'init_1.0' / 'seed_2' / 'ablate_run.json', 'w') as f:
    json.dump({'seconds': 1.0, 'error': 'non-finite loss at step 3'}, f)
  assert ablate.main(argv[:2] + ['--seeds=3', '--summarize'] + argv[3:]) == 0
  out = capsys.readouterr().out
  assert out.count('not finished, left out of the summary') == 1 and 'Compiled' not in out
  assert 'init_1.0 seed 2: skip, failed' in out
  with open(folder / 'sw_table3.json') as f:
    partial = json.load(f)
  assert [r['seeds'] for r in partial['rows']] == [2, 3] and partial['seeds'] == 3
  assert partial['rows'][1]['failed'] == ['non-finite loss at step 3']
  assert partial['rows'][1]['final_by_seed'] == summary['rows'][1]['final_by_seed']
  assert not os.path.exists(folder / 'init_0.1' / 'seed_2')


def test_a_stopped_run_stops_the_sweep(tmp_path, monkeypatch, capsys):
  calls = []
  # train() returns before num_steps only when SIGTERM / SIGINT stopped it.
  monkeypatch.setattr(ablate.train, 'train',
                      lambda config, workdir: calls.append(os.makedirs(workdir) or workdir))
  assert ablate.run_study('sw_table3', scale='smoke', out=str(tmp_path)) is None
  assert len(calls) == 1 and 'stopped; run the same command' in capsys.readouterr().out
  assert not os.path.exists(tmp_path / 'sw_table3' / 'sw_table3.json')
