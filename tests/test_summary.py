"""rain_jax/summary.py and `rain_jax.run --summary`: every number the summary shows is read
back from its Markdown and compared with the records it was made from (hand-made records,
and the session's tiny real run, tests/tiny_run.py), the no-separation sentence appears exactly
when every judgement was 0, and the file is written (or not, with --summary=false)."""
import json
import re
import shutil

import pytest

from rain_jax import summary
from tests import tiny_run


# ----------------------------------------------------------------- reading a summary


def cells(line):
  """The cells of a Markdown table line, '\\|' unescaped."""
  parts = re.split(r'(?<!\\)\|', line.strip())[1:-1]
  return [p.strip().replace('\\|', '|') for p in parts]


def table_after(lines, start):
  """(header, rows) of the first table at or after lines[start]."""
  i = start
  while not lines[i].startswith('|'):
    i += 1
  rows = []
  for line in lines[i + 2:]:
    if not line.startswith('|'):
      break
    rows.append(cells(line))
  return cells(lines[i]), rows


def close(cell, value, digits):
  """A displayed number equals the record's value rounded to `digits` decimals."""
  return abs(float(cell) - value) <= 0.5 * 10 ** -digits + 1e-9


def assert_summary_matches(text, records):
  """Every number and text of `text` is the records' (one record per (id, method))."""
  lines = text.splitlines()
  groups = summary.by_method(records)
  # Answers: one row per prompt, a column per method.
  header, rows = table_after(lines, lines.index('## Answers'))
  assert header == ['id'] + [summary.METHOD_TITLE[m] for m in groups]
  answers = {(str(r['id']), r['method']): r['response'] for r in records}
  assert len(rows) == len({str(r['id']) for r in records})
  for row in rows:
    for method, cell in zip(groups, row[1:]):
      want = answers.get((row[0], method))
      assert cell == ('-' if want is None else
                      summary.one_line(want).replace('\\|', '|').strip())
  # Per RAIN prompt: the heading's counts and one row per committed set.
  for record in groups.get('rain', []):
    s = record['search']
    name = summary.one_line(str(record['id']), 40)
    at = next(i for i, line in enumerate(lines) if line.startswith(f'### {name}:'))
    heading = re.fullmatch(
        r'### (.+): stop (\w+); (\d+) committed sets, (\d+) simulations, (\d+) early stops; '
        r'judgements (\d+) positive, (\d+) zero, (\d+) negative', lines[at])
    assert heading, lines[at]
    assert heading.group(2) == record['stop_reason']
    assert [int(g) for g in heading.groups()[2:]] == [
        s['committed_sets'], s['simulations'], s['early_stops'], s['positive_judgements'],
        s['judge_calls'] - s['positive_judgements'] - s['negative_judgements'],
        s['negative_judgements']]
    header, rows = table_after(lines, at)
    assert header == summary.COMMIT_HEADER
    assert len(rows) == len(record['commits'])
    for number, (row, c) in enumerate(zip(rows, record['commits']), 1):
      cell = dict(zip(header, row))
      assert int(cell['#']) == number
      assert cell['committed set'] == summary.quoted(c['text']).replace('\\|', '|')
      assert [int(t) for t in cell['ids'].split()] == c['tokens']
      assert close(cell['n'], c['n'], 2) and int(cell['fn']) == c['fn']
      assert close(cell['q'], c['q'], 3) and close(cell['p'], c['p'], 3)
      assert int(cell['simulations']) == c['simulations']
      assert (cell['early stop'] == 'yes') == c['early']
      alt = c['alternative']
      if alt is None:
        assert (cell['best alternative'], cell['alt n'], cell['alt q']) == ('-', '-', '-')
      else:
        assert cell['best alternative'] == summary.quoted(alt['text']).replace('\\|', '|')
        assert close(cell['alt n'], alt['n'], 2) and close(cell['alt q'], alt['q'], 3)
  # Totals per method.
  header, rows = table_after(lines, lines.index('## Totals'))
  for row, (method, group) in zip(rows, groups.items()):
    cell = dict(zip(header, row))
    assert cell['method'] == summary.METHOD_TITLE[method]
    assert int(cell['prompts']) == len(group)
    assert int(cell['new tokens']) == sum(r['num_new_tokens'] for r in group)
    assert close(cell['seconds'], sum(r['seconds'] for r in group), 2)
    for column, name in (('simulations', 'simulations'), ('judge calls', 'judge_calls'),
                         ('widenings', 'widenings'), ('shared updates', 'shared_updates')):
      if method == 'rain':
        assert int(cell[column]) == sum(r['search'][name] for r in group)
      else:
        assert cell[column] == '-'
  if 'rain' in groups:
    rain = groups['rain']
    positive = sum(r['search']['positive_judgements'] for r in rain)
    negative = sum(r['search']['negative_judgements'] for r in rain)
    zero = sum(r['search']['judge_calls'] for r in rain) - positive - negative
    assert f'Judgements: {positive} positive, {zero} zero, {negative} negative.' in lines
    assert (summary.NO_SEPARATION in text) == (positive == negative == 0 and zero > 0)
  if 'rain' in groups and 'vanilla' in groups:
    vanilla = {str(r['id']): r['seconds'] for r in groups['vanilla']}
    both = [r for r in groups['rain'] if str(r['id']) in vanilla]
    ratio = sum(r['seconds'] for r in both) / sum(vanilla[str(r['id'])] for r in both)
    line = next(line for line in lines if line.startswith('RAIN/vanilla time: '))
    assert close(re.match(r'RAIN/vanilla time: ([\d.]+)x', line).group(1), ratio, 2)
    assert f'over the {len(both)} prompts' in line


# ---------------------------------------------------------------- hand-made records


def commit(tokens, text, n, q, sims, early=False, alternative=None, fn=None, p=0.25):
  return {'tokens': tokens, 'text': text, 'n': n, 'fn': int(n) if fn is None else fn,
          'q': q, 'p': p, 'simulations': sims, 'early': early, 'alternative': alternative}


def rain_record(rid, response, commits, seconds, positive, negative, **search):
  sims = sum(c['simulations'] for c in commits)
  return {'id': rid, 'task': 'hh', 'method': 'rain', 'model': 'tiny', 'response': response,
          'num_new_tokens': sum(len(c['tokens']) for c in commits), 'seconds': seconds,
          'stop_reason': 'max_new_tokens', 'rain_config': {'max_T': 15, 'min_T': 6},
          'search': {'simulations': sims, 'committed_sets': len(commits),
                     'judge_calls': sims, 'early_stops': sum(c['early'] for c in commits),
                     'widenings': search.get('widenings', 0),
                     'shared_updates': search.get('shared_updates', 0),
                     'positive_judgements': positive, 'negative_judgements': negative},
          'commits': commits}


def vanilla_record(rid, response, seconds, tokens=6):
  return {'id': rid, 'task': 'hh', 'method': 'vanilla', 'model': 'tiny',
          'response': response, 'num_new_tokens': tokens, 'seconds': seconds,
          'stop_reason': 'max_new_tokens'}


LONG = 'word | ' * 60 + 'end'


def hand_made(positive=3, negative=1):
  """Two prompts with both methods; odd texts (newline, '|', > 200 characters)."""
  return [
      vanilla_record(0, 'I am sorry.\nI cannot help.', 0.5),
      vanilla_record('p|1', LONG, 0.25, tokens=9),
      rain_record(0, 'Sure | here', [
          commit([306], ' I', 12.2, 0.0, 15, alternative={'text': ' Sure', 'n': 3.0,
                                                          'q': -0.3333333}),
          commit([29871, 13], ' |\n', 7.0, 0.81234, 9, early=True, fn=7,
                 alternative=None)], 12.0, positive, negative, widenings=2,
          shared_updates=5),
      rain_record('p|1', LONG, [commit([1, 2, 3], 'abc', 20.0, -0.5, 50,
                                       alternative={'text': 'x\ny', 'n': 19.5, 'q': 1.0})],
                  7.5, 0, 0),
  ]


def test_numbers_equal_hand_made_records():
  records = hand_made()
  text = summary.summarize(records, output='out/x.jsonl')
  assert text.startswith('# Run summary: out/x.jsonl\n')
  assert_summary_matches(text, records)
  assert 'RAIN/vanilla time: 26.00x' in text  # (12 + 7.5) / (0.5 + 0.25)
  assert 'I am sorry.⏎I cannot help.' in text and LONG[:200].replace('|', '\\|') + '…' in text


@pytest.mark.parametrize('positive,negative,sentence', [(0, 0, True), (1, 0, False),
                                                         (0, 2, False)])
def test_the_sentence_appears_iff_every_judgement_was_zero(positive, negative, sentence):
  records = hand_made(positive, negative)
  text = summary.summarize(records)
  assert (summary.NO_SEPARATION in text) is sentence
  assert_summary_matches(text, records)
  if sentence:
    assert "Every judgement was 0 (74 judge calls): the judge never separated the options: " \
        "RAIN followed the model's priors." in text


def test_vanilla_only_and_old_records():
  """No RAIN section without RAIN; records written before the counts and `commits`
  existed are said so, and no sentence is guessed."""
  vanilla = [vanilla_record(0, 'a', 1.0)]
  text = summary.summarize(vanilla)
  assert '## RAIN searches' not in text and 'Judgements' not in text
  assert_summary_matches(text, vanilla)
  old = hand_made(0, 0)[2]
  old = {**old, 'search': {k: v for k, v in old['search'].items()
                           if not k.endswith('_judgements')}}
  del old['commits']
  text = summary.summarize([old])
  assert 'Judgements: not recorded' in text and summary.NO_SEPARATION not in text
  assert '(no `commits` in this record' in text


def test_cuts_are_said_and_totals_cover_everything():
  records = hand_made()
  text = summary.summarize(records, max_answers=1, max_searches=1, max_commits=1)
  assert '(1 more prompts in the results file)' in text
  assert '(1 more RAIN prompts in the results file)' in text
  assert '(1 more committed sets in the record)' in text
  lines = text.splitlines()
  _, rows = table_after(lines, lines.index('## Totals'))
  assert [row[1] for row in rows] == ['2', '2']


def test_latest_records_keeps_the_last_answer_of_each_chosen_pair():
  a1, a2 = vanilla_record(0, 'first', 1.0), vanilla_record(0, 'again', 1.0)
  b = vanilla_record(1, 'b', 1.0)
  c = rain_record(0, 'r', [], 1.0, 0, 0)
  assert summary.latest_records([a1, b, c, a2]) == [a2, b, c]
  assert summary.latest_records([a1, b, c, a2], [('1', 'vanilla'), ('0', 'vanilla'),
                                                 ('7', 'rain')]) == [b, a2]


def test_one_line_and_quoted():
  assert summary.one_line('a\nb\r\nc|d\te', 100) == 'a⏎b⏎c\\|d e'
  assert summary.one_line('x' * 5, 3) == 'xxx…'
  assert summary.quoted(' the') == '" the"'


def test_write_summary_replaces_the_file_atomically(tmp_path):
  output = str(tmp_path / 'sub' / 'out.jsonl')
  path = summary.write_summary(output, 'one\n')
  assert path == output + '.summary.md' and open(path).read() == 'one\n'
  summary.write_summary(output, 'two\n')
  assert open(path).read() == 'two\n'
  assert sorted(p.name for p in (tmp_path / 'sub').iterdir()) == ['out.jsonl.summary.md']


def test_no_records_is_an_error():
  with pytest.raises(ValueError, match='no records'):
    summary.summarize([])


# ------------------------------------------------------------------------ a real run


def assert_commits_are_the_dump(record):
  """A record's `commits` against its tree dump, its search counts and its answer."""
  dump, commits, s = record['tree_dump'], record['commits'], record['search']
  assert len(commits) == len(dump) == s['committed_sets']
  for c, step in zip(commits, dump):
    kids = step['children']
    chosen = kids[step['committed']]
    assert {k: c[k] for k in ('tokens', 'text', 'n', 'fn', 'q', 'p')} == \
        {k: chosen[k] for k in ('tokens', 'text', 'n', 'fn', 'q', 'p')}
    assert (c['simulations'], c['early']) == (step['simulations'], step['early'])
    others = [k for i, k in enumerate(kids) if i != step['committed']]
    best = max(others, key=lambda k: (k['n'], k['q']), default=None)
    assert c['alternative'] == (None if best is None else
                                {'text': best['text'], 'n': best['n'], 'q': best['q']})
    # The commit rule: nothing beats the committed child on (n, q).
    assert all((k['n'], k['q']) <= (chosen['n'], chosen['q']) for k in kids)
    for child in kids:
      assert len(child['children']) <= 10
      assert [g['n'] for g in child['children']] == sorted(
          (g['n'] for g in child['children']), reverse=True)
  assert [t for c in commits for t in c['tokens']] == record['response_ids']
  assert sum(c['simulations'] for c in commits) == s['simulations']
  assert sum(c['early'] for c in commits) == s['early_stops']
  assert 0 <= s['positive_judgements'] + s['negative_judgements'] <= s['judge_calls']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, tiny_llama_32k_dir):
  return tiny_run.shared_run(tmp_path_factory, tiny_llama_32k_dir)


def test_a_tiny_runs_summary_is_its_records(tiny):
  output, proc = tiny
  records = tiny_run.read_records(output)
  assert sorted((r['id'], r['method']) for r in records) == [
      ('bread', 'rain'), ('bread', 'vanilla'), ('sky', 'rain'), ('sky', 'vanilla')]
  for record in records:
    if record['method'] == 'rain':
      assert_commits_are_the_dump(record)
  text = (output.parent / (output.name + '.summary.md')).read_text()
  assert text in proc.stderr
  assert text.startswith(f'# Run summary: {output}\n')
  assert_summary_matches(text, records)


@pytest.mark.slow
def test_summary_false_writes_none_and_a_resume_summarizes_earlier_answers(
    tiny, tmp_path, tiny_llama_32k_dir):
  output, _ = tiny
  copy = tmp_path / 'out.jsonl'
  for suffix in ('', '.config.json'):
    shutil.copy(str(output) + suffix, str(copy) + suffix)
  inputs = output.parent
  _, quiet = tiny_run.run_cli(inputs, tiny_llama_32k_dir, '--summary=false', output=copy)
  assert not (tmp_path / 'out.jsonl.summary.md').exists()
  assert '# Run summary' not in quiet.stderr
  _, loud = tiny_run.run_cli(inputs, tiny_llama_32k_dir, output=copy)
  text = (tmp_path / 'out.jsonl.summary.md').read_text()
  assert text in loud.stderr
  records = tiny_run.read_records(copy)
  assert len(records) == 4  # nothing answered again: the summary is of the first session's
  assert_summary_matches(text, records)
  assert 'Answered in 3 session(s) of this output' in text
  assert json.loads((tmp_path / 'out.jsonl.config.json').read_text())['sessions'][-1][
      'flags']['summary'] is True
