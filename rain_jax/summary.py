"""The end-of-run summary: result records -> Markdown (issue 13).

`python -m rain_jax.run` (process 0, unless --summary=false) prints it to stderr and
writes it beside the results as `<output>.summary.md`. It covers the records of the
examples the run chose, also those an earlier session of the same output answered:

  * Answers side by side per prompt (vanilla | RAIN), one line each, cut at ANSWER_CHARS
    characters (newlines shown as ⏎).
  * Per RAIN prompt, a table of its committed sets (the record's `commits`): the set's
    text and token ids; n (visits), fn (real visits), q (mean value) and p (prior) of the
    committed child; the best alternative (the sibling the commit rule ranks next) with
    its n and q; the simulations of that outer step; whether it ended by early stop.
  * Totals per method (prompts, new tokens, seconds, and for RAIN simulations, judge
    calls, widenings, shared updates), the RAIN/vanilla time ratio, the judgements'
    signs, and a plain sentence when every judgement was 0: the judge never separated
    the options, so RAIN followed the model's priors.

Every number is the records' (rounded for display: n to 2 decimals, q and p to 3,
seconds to 2). Long runs are cut for reading: at most MAX_ANSWERS answer rows,
MAX_SEARCHES prompt tables and MAX_COMMITS rows per table, each cut said in a line; the
totals always cover every record. Pure functions except `write_summary`.
"""
import os

from rain_jax import results

SUFFIX = '.summary.md'
ANSWER_CHARS = 200
SET_CHARS = 40
MAX_ANSWERS = 100
MAX_SEARCHES = 20
MAX_COMMITS = 64
METHOD_ORDER = ('vanilla', 'rain')
METHOD_TITLE = {'vanilla': 'vanilla', 'rain': 'RAIN'}
SEARCH_TOTALS = ('simulations', 'judge_calls', 'widenings', 'shared_updates')
SETTINGS = ('max_T', 'min_T', 'value_threshold', 'c_puct', 'num_candidates', 'max_children',
            'similarity', 'parallel_leaves', 'max_new_tokens')
NO_SEPARATION = ("the judge never separated the options: RAIN followed the model's "
                 "priors")


def summary_path(output: str) -> str:
  """The summary file of a results file: `<output>.summary.md`."""
  return output + SUFFIX


def one_line(text: str, limit: int = ANSWER_CHARS) -> str:
  """`text` as one Markdown table cell: newlines as ⏎, tabs as spaces, '|' escaped, cut
  to `limit` characters (then '…')."""
  flat = text.replace('\r\n', '⏎').replace('\n', '⏎').replace('\r', '⏎').replace('\t', ' ')
  if len(flat) > limit:
    flat = flat[:limit] + '…'
  return flat.replace('|', '\\|')


def quoted(text: str, limit: int = SET_CHARS) -> str:
  """A token set's text in double quotes (so leading and trailing spaces show)."""
  return f'"{one_line(text, limit)}"'


def latest_records(records, keys=None) -> list:
  """One record per (id, method), the last one of `records` winning (a restart that
  answered a pair again appends it). keys: the (id as str, method) pairs to keep, in
  the order given; None keeps every pair in order of first appearance."""
  last = {}
  for record in records:
    last[(str(record['id']), record['method'])] = record
  order = last if keys is None else [k for k in keys if k in last]
  return [last[k] for k in order]


def by_method(records) -> dict:
  """{method: [records]}, methods in METHOD_ORDER then any other, records in order."""
  groups = {}
  for record in records:
    groups.setdefault(record['method'], []).append(record)
  rank = lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)
  return {m: groups[m] for m in sorted(groups, key=rank)}


def judgements(rain_records):
  """(positive, zero, negative) judgement counts summed over RAIN records, or None when
  some record lacks them (written before they were counted)."""
  searches = [r.get('search', {}) for r in rain_records]
  if not searches or any('positive_judgements' not in s for s in searches):
    return None
  positive = sum(s['positive_judgements'] for s in searches)
  negative = sum(s['negative_judgements'] for s in searches)
  return positive, sum(s['judge_calls'] for s in searches) - positive - negative, negative


def method_totals(records) -> dict:
  """{'prompts', 'new_tokens', 'seconds'} of one method's records, plus SEARCH_TOTALS
  when they are RAIN records (the sums of their `search` fields)."""
  totals = {'prompts': len(records),
            'new_tokens': sum(r['num_new_tokens'] for r in records),
            'seconds': sum(r['seconds'] for r in records)}
  if records and all('search' in r for r in records):
    for name in SEARCH_TOTALS:
      totals[name] = sum(r['search'][name] for r in records)
  return totals


def time_ratio(groups):
  """(RAIN seconds / vanilla seconds over the prompts both answered, that count), or
  None without such prompts or with no vanilla time."""
  vanilla = {str(r['id']): r['seconds'] for r in groups.get('vanilla', [])}
  both = [(r['seconds'], vanilla[str(r['id'])]) for r in groups.get('rain', [])
          if str(r['id']) in vanilla]
  spent = sum(v for _, v in both)
  if not both or spent <= 0:
    return None
  return sum(s for s, _ in both) / spent, len(both)


def table(header, rows) -> list:
  """Markdown table lines."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def answers_section(groups, limit=MAX_ANSWERS) -> list:
  """The answers of every prompt, one column per method, in prompt order."""
  ids = list(dict.fromkeys(str(r['id']) for rs in groups.values() for r in rs))
  answer = {(str(r['id']), m): r['response'] for m, rs in groups.items() for r in rs}
  rows = [[one_line(i, 40)] + [one_line(answer[(i, m)]) if (i, m) in answer else '-'
                               for m in groups] for i in ids[:limit]]
  lines = ['## Answers', ''] + table(['id'] + [METHOD_TITLE.get(m, m) for m in groups], rows)
  if len(ids) > limit:
    lines += ['', f'({len(ids) - limit} more prompts in the results file)']
  return lines


def signed(x: float) -> str:
  """x with its sign and 3 decimals ('+0.000', never '-0.000')."""
  text = f'{x:+.3f}'
  return '+0.000' if text == '-0.000' else text


def commit_rows(commits) -> list:
  """Table rows of a RAIN record's `commits` (see engine.commit_summaries)."""
  rows = []
  for number, c in enumerate(commits, 1):
    alt = c.get('alternative')
    rows.append([number, quoted(c['text']), ' '.join(str(t) for t in c['tokens']),
                 f"{c['n']:.2f}", c['fn'], signed(c['q']), f"{c['p']:.3f}",
                 quoted(alt['text']) if alt else '-', f"{alt['n']:.2f}" if alt else '-',
                 signed(alt['q']) if alt else '-', c['simulations'],
                 'yes' if c['early'] else ''])
  return rows


COMMIT_HEADER = ['#', 'committed set', 'ids', 'n', 'fn', 'q', 'p', 'best alternative',
                 'alt n', 'alt q', 'simulations', 'early stop']


def search_heading(record) -> str:
  """'### id: stop reason; sets, simulations, early stops; judgements' of a RAIN record."""
  s = record.get('search', {})
  parts = [f"stop {record['stop_reason']}",
           f"{s.get('committed_sets', '?')} committed sets, {s.get('simulations', '?')} "
           f"simulations, {s.get('early_stops', '?')} early stops"]
  signs = judgements([record])
  if signs:
    parts.append('judgements {} positive, {} zero, {} negative'.format(*signs))
  return f"### {one_line(str(record['id']), 40)}: {'; '.join(parts)}"


def searches_section(rain_records, limit=MAX_SEARCHES, max_commits=MAX_COMMITS) -> list:
  """Per RAIN prompt, the table of its committed sets."""
  lines = ['## RAIN searches', '', 'Per committed set: n = visits, fn = real visits, '
           'q = mean value, p = prior of the committed child; the best alternative is the '
           'sibling with the most visits after it.']
  for record in rain_records[:limit]:
    lines += ['', search_heading(record), '']
    commits = record.get('commits')
    if commits is None:
      lines.append('(no `commits` in this record: it was written before rain_jax recorded '
                   'them)')
      continue
    lines += table(COMMIT_HEADER, commit_rows(commits[:max_commits]))
    if len(commits) > max_commits:
      lines += ['', f'({len(commits) - max_commits} more committed sets in the record)']
  if len(rain_records) > limit:
    lines += ['', f'({len(rain_records) - limit} more RAIN prompts in the results file)']
  return lines


def totals_section(groups) -> list:
  """Totals per method, the time ratio and the judge's signal."""
  header = ['method', 'prompts', 'new tokens', 'seconds', 'simulations', 'judge calls',
            'widenings', 'shared updates']
  rows = []
  for method, records in groups.items():
    t = method_totals(records)
    rows.append([METHOD_TITLE.get(method, method), t['prompts'], t['new_tokens'],
                 f"{t['seconds']:.2f}"] + [t.get(name, '-') for name in SEARCH_TOTALS])
  lines = ['## Totals', ''] + table(header, rows)
  ratio = time_ratio(groups)
  if ratio:
    lines += ['', f'RAIN/vanilla time: {ratio[0]:.2f}x (seconds over the {ratio[1]} prompts '
              f'both answered).']
  if 'rain' in groups:
    lines += [''] + judge_lines(groups['rain'])
  return lines


def judge_lines(rain_records) -> list:
  """The judgements' signs, and the plain sentence when every one was 0."""
  signs = judgements(rain_records)
  if signs is None:
    return ['Judgements: not recorded (some RAIN records were written before rain_jax '
            'counted them).']
  positive, zero, negative = signs
  lines = [f'Judgements: {positive} positive, {zero} zero, {negative} negative.']
  if positive == negative == 0 and zero > 0:
    lines += ['', f'**Every judgement was 0 ({zero} judge calls): {NO_SEPARATION}.**']
  return lines


def header_lines(groups, output=None, config=None) -> list:
  """Title, model and task, prompt counts, RAIN settings and sessions."""
  records = [r for rs in groups.values() for r in rs]
  title = f'# Run summary: {output}' if output else '# Run summary'
  models = sorted({str(r.get('model', '?')) for r in records})
  tasks = sorted({str(r.get('task', '?')) for r in records})
  counts = ', '.join(f'{METHOD_TITLE.get(m, m)} {len(rs)}' for m, rs in groups.items())
  lines = [title, '', f"Model {', '.join(models)}, task {', '.join(tasks)}; answers: "
           f'{counts or "none"}.']
  rain = groups.get('rain')
  if rain and 'rain_config' in rain[0]:
    cfg = rain[0]['rain_config']
    lines.append('RAIN settings: ' + ', '.join(f'{k}={cfg[k]}' for k in SETTINGS if k in cfg)
                 + '.')
  sessions = (config or {}).get('sessions') or []
  if sessions:
    commit = (sessions[-1].get('git') or {}).get('commit')
    lines.append(f'Answered in {len(sessions)} session(s) of this output'
                 + (f'; the last at code commit {commit[:12]}.' if commit else '.'))
  return lines


def summarize(records, config=None, output=None, max_answers=MAX_ANSWERS,
              max_searches=MAX_SEARCHES, max_commits=MAX_COMMITS) -> str:
  """The Markdown summary of result records (list of dicts; one per (id, method), see
  `latest_records`). config: the output's `<output>.config.json` content, or None;
  output: the results file's name for the title."""
  if not records:
    raise ValueError('no records to summarize')
  groups = by_method(records)
  lines = header_lines(groups, output, config) + [''] + answers_section(groups, max_answers)
  if 'rain' in groups:
    lines += [''] + searches_section(groups['rain'], max_searches, max_commits)
  lines += [''] + totals_section(groups)
  if output and any('tree_dump' in r for r in groups.get('rain', [])):
    folder = os.path.splitext(output)[0] + '_trees'
    lines += ['', f'Tree pictures (one PNG per prompt): `python scripts/report.py '
                  f'--trees={output} --out={folder}`']
  return '\n'.join(lines) + '\n'


def write_summary(output: str, text: str) -> str:
  """Writes `text` to `<output>.summary.md` atomically (results.write_text_atomic);
  returns the path."""
  path = summary_path(output)
  results.write_text_atomic(path, text)
  return path
