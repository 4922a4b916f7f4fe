"""Reports: result files -> a Markdown table, a CSV and PNG plots.

  python3 scripts/report.py --results=out/sweeps/maxT --out=out/sweeps/maxT/report
  python3 scripts/report.py --results=a.jsonl,b.jsonl --scores=scores.jsonl --out=report
  python3 scripts/report.py --trees=out/demo.jsonl --out=out/demo_trees

--results takes result files (JSONL from `python -m rain_jax.run`) and folders (every
*.jsonl below them). Rows are per (model, task, setting, method); the setting of a file
is its sweep run's axis values other than model/task/flagfile (from the manifest.json of
scripts/sweep.py in a given folder), else the answer flags that differ between the
files' `<file>.config.json` sidecars. Shards (`<run>.shard<i>-of-<n>.jsonl`) of a run
are merged; an (id, method) found twice in one group counts once.

Distilled answers (python -m rain_jax.train, then a run of the trained model; the chain
of scripts/sweep.py --train): a result file whose sidecar's --checkpoint is the `model`
folder of a training output (its parent holds train_config.json) gives rows of method
distilled-vanilla (distilled-rain for RAIN answers), next to the rows of the model it
was trained from: that model's name, and the setting of the run whose answers it was
trained on (the first --data file). A `training` column then says how (objective,
steps, LoRA rank or full). The .jsonl files of a training output (metrics.jsonl) are
not result files.

Columns: n (answers), mean new tokens, mean seconds per prompt (the records' `seconds`:
batch wall time / batch size, compile time excluded), RAIN/vanilla time ratio (on RAIN
rows: mean RAIN seconds / mean vanilla seconds over the prompts both answered in the
group), mean simulations per committed token set (all simulations / all committed sets
of the group's RAIN answers), then the mean of every metric in --scores.

Scores (--scores, e.g. the --scores_out of scripts/evaluate.py): JSONL lines with "id"
and "method", optionally "model", "task" and "run" (a sweep run name or a result file's
stem) to narrow which answers they score. Every other number or true/false in a line is
a metric (nested objects give dotted names: {"bleu": {"diff": 0.2}} -> "bleu.diff");
text and lists are ignored. A score applies to every answer it matches, so give scores
of several models' answers a "model" field (or report them separately). Distilled
answers take the lines whose "method" is distilled-vanilla (distilled-rain), and lines
of their own method (vanilla) only when they name the distilled file's "run"
(`<run>.distilled`), so scores of the starting model's answers never reach them.

Plots (need matplotlib: `pip install -e .[report]`; --noplots skips them): mean seconds
per prompt, RAIN/vanilla time ratio, simulations per committed set, and each metric,
against model size (parameters, from the sidecars; model names in order when unknown);
distilled rows are series of their own (dotted).

Tree pictures (--trees=RESULTS.jsonl, also matplotlib): one PNG per RAIN record of a run
made with --dump_tree, `tree_<id>.png` in --out: the committed path, and per commit the
root's children with their visits and values (scripts/tree_pictures.py). A RAIN record
without a tree dump is a one-line error.
"""
import collections
import csv
import glob
import json
import os
import re
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from rain_jax import flag_table, results  # noqa: E402  (after the path set-up)
from scripts import tree_pictures  # noqa: E402

FLAGS = flags.FLAGS

SHARD_SUFFIX = re.compile(r'\.shard\d+-of-\d+$')
# Answer flags that name what a row is of, not a setting that tells rows apart.
IDENTITY_FLAGS = flag_table.IDENTITY_FLAGS
IDENTITY_AXES = frozenset({'model', 'task', 'flagfile'})
SCORE_KEYS = frozenset({'id', 'method', 'model', 'task', 'run'})
DISTILLED = 'distilled-'  # method prefix of the answers of a trained model
METHODS = ('vanilla', 'rain', DISTILLED + 'vanilla', DISTILLED + 'rain')
BASE_COLUMNS = ['model', 'parameters', 'task', 'setting', 'method', 'n', 'mean_new_tokens',
                'mean_seconds', 'time_ratio_rain_vs_vanilla', 'simulations_per_set']
TRAINING_COLUMN = 'training'  # after 'method', when a row is of distilled answers
TRAIN_CONFIG = 'train_config.json'  # rain_jax.train's record of a training output
DEFAULT_MODEL = 'smollm2-135m-instruct'  # rain_jax.train's model without a weight source


class ReportError(ValueError):
  """Bad report input."""


def run_name(path: str) -> str:
  """A result file's run: its file name without .jsonl and any shard suffix."""
  return SHARD_SUFFIX.sub('', os.path.splitext(os.path.basename(path))[0])


def in_training_output(path: str, root: str) -> bool:
  """True when `path` lies in a rain_jax.train output folder (one holding
  train_config.json) at or below `root`."""
  folder, root = os.path.dirname(os.path.abspath(path)), os.path.abspath(root)
  while True:
    if os.path.isfile(os.path.join(folder, TRAIN_CONFIG)):
      return True
    if folder == root or os.path.dirname(folder) == folder:
      return False
    folder = os.path.dirname(folder)


def find_result_files(paths):
  """(sorted result files, {run name: settings} from the manifests of given folders)."""
  files, settings = set(), {}
  for path in paths:
    if os.path.isdir(path):
      files.update(f for f in glob.glob(os.path.join(path, '**', '*.jsonl'), recursive=True)
                   if not in_training_output(f, path))
      manifest = os.path.join(path, 'manifest.json')
      if os.path.isfile(manifest):
        with open(manifest, encoding='utf-8') as f:
          for run in json.load(f)['runs']:
            settings[run['name']] = {axis: label for axis, label in run['settings'].items()
                                     if axis not in IDENTITY_AXES}
    elif os.path.isfile(path):
      files.add(path)
    else:
      raise ReportError(f'--results: {path} does not exist')
  if not files:
    raise ReportError(f'--results: no .jsonl result files in {", ".join(paths)}')
  return sorted(files), settings


def sidecar_settings(files):
  """{file: settings} from the answer flags that differ between the files' sidecars."""
  configs = {}
  for path in files:
    saved = results.read_config(path)
    configs[path] = saved['config'] if saved else {}
  names = set().union(*configs.values()) - IDENTITY_FLAGS
  varying = sorted(n for n in names
                   if len({json.dumps(c.get(n)) for c in configs.values()}) > 1)
  return {path: {n: str(configs[path].get(n)) for n in varying} for path in files}


def resolve(path: str):
  """`path` as given, else (relative) from the repository root, where sweeps run; None
  when neither exists."""
  for candidate in (path, os.path.join(REPO, path)):
    if os.path.exists(candidate):
      return candidate
  return None


def training_of(path: str):
  """The training behind a result file's answers, or None: {'folder', 'config' (the
  train flags), 'model' (the name of the model it started from), 'data' ([files]),
  'label'} when the sidecar's --checkpoint is a training output's model folder."""
  saved = results.read_config(path)
  checkpoint = saved and saved['config'].get('checkpoint')
  if not checkpoint or '://' in str(checkpoint):
    return None
  folder = os.path.dirname(os.path.normpath(str(checkpoint)))
  config_file = resolve(os.path.join(folder, TRAIN_CONFIG))
  if config_file is None:
    if os.path.basename(os.path.normpath(str(checkpoint))) == 'model':
      print(f'report.py: {path}: its --checkpoint {checkpoint} looks like a training '
            f'output, but {os.path.join(folder, TRAIN_CONFIG)} is not here; its answers '
            f'are not marked distilled', file=sys.stderr)
    return None
  with open(config_file, encoding='utf-8') as f:
    config = json.load(f)['config']
  summary_file = os.path.join(os.path.dirname(config_file), 'summary.json')
  model = None
  if os.path.isfile(summary_file):
    with open(summary_file, encoding='utf-8') as f:
      model = json.load(f).get('model')
  if not model:  # as rain_jax.loading names it: the registry name, else the folder's
    source = config.get('checkpoint') or config.get('hf_dir') or config.get('gguf')
    model = config.get('model') or (os.path.basename(os.path.normpath(str(source)))
                                    if source else DEFAULT_MODEL)
  lora = config.get('lora_rank')
  steps = config.get('steps')
  label = (f'{config.get("objective")}, {steps} step{"" if steps == 1 else "s"}, '
           + (f'LoRA r={lora}' if lora else 'full'))
  return {'folder': os.path.normpath(folder), 'config': config, 'model': str(model),
          'data': [p.strip() for p in str(config.get('data') or '').split(',') if p.strip()],
          'label': label}


def trainings_of(files):
  """{result file: training (training_of) or None}; a label that two training folders
  share gets the folder added."""
  trainings = {path: training_of(path) for path in files}
  folders = collections.defaultdict(set)
  for training in filter(None, trainings.values()):
    folders[training['label']].add(training['folder'])
  for training in filter(None, trainings.values()):
    if len(folders[training['label']]) > 1:
      training['label'] += f' ({training["folder"]})'
  return trainings


def model_parameters(files, trainings=None):
  """{model name: parameter count} from the sidecars' latest sessions (a distilled
  file's count goes to the model it was trained from)."""
  sizes = {}
  for path in files:
    saved = results.read_config(path)
    training = (trainings or {}).get(path)
    if saved and saved['sessions']:
      session = saved['sessions'][-1]
      if session.get('model') and session.get('model_parameters'):
        if training:
          sizes.setdefault(training['model'], session['model_parameters'])
        else:
          sizes[session['model']] = session['model_parameters']
  return sizes


def setting_label(settings: dict) -> str:
  return ', '.join(f'{k}={v}' for k, v in settings.items())


def file_settings(path, training, files, manifest_settings, from_sidecars):
  """A result file's settings: its sweep run's, else its sidecar's; a distilled file
  takes those of the results it was trained on (its first --data file)."""
  run = run_name(path)
  if training and training['data']:
    data = training['data'][0]
    if run_name(data) in manifest_settings:
      return manifest_settings[run_name(data)]
    found = resolve(data)
    same = [f for f in files if found and os.path.realpath(f) == os.path.realpath(found)]
    if same:
      return from_sidecars[same[0]]
  return manifest_settings.get(run, from_sidecars[path])


def load_answers(files, manifest_settings, trainings=None):
  """{(model, task, setting, method, training): {id: record}} with record['_run'] = run
  name; training is '' except for distilled answers (the training's label)."""
  from_sidecars = sidecar_settings(files)
  trainings = trainings or {}
  groups = collections.defaultdict(dict)
  duplicates = 0
  for path in files:
    run = run_name(path)
    training = trainings.get(path)
    settings = file_settings(path, training, files, manifest_settings, from_sidecars)
    for record in results.read_records(path):
      if training:
        key = (training['model'], str(record['task']), setting_label(settings),
               DISTILLED + record['method'], training['label'])
      else:
        key = (str(record['model']), str(record['task']), setting_label(settings),
               record['method'], '')
      answer_id = str(record['id'])
      if answer_id in groups[key]:
        duplicates += 1
        continue
      groups[key][answer_id] = dict(record, _run=run)
  if duplicates:
    print(f'report.py: {duplicates} repeated (id, method) answers counted once',
          file=sys.stderr)
  return groups


def numeric_fields(line: dict, prefix: str = '') -> dict:
  """{metric: float} of a score line: its numbers and booleans, nested names dotted."""
  fields = {}
  for key, value in line.items():
    if not prefix and key in SCORE_KEYS:
      continue
    if isinstance(value, dict):
      fields.update(numeric_fields(value, f'{prefix}{key}.'))
    elif isinstance(value, (int, float, bool)):
      fields[prefix + key] = float(value)
  return fields


def read_scores(paths):
  """Score lines from JSONL files: [{'match': {key: value}, 'metrics': {name: float}}]."""
  scores = []
  for path in paths:
    if not os.path.isfile(path):
      raise ReportError(f'--scores: {path} does not exist')
    try:
      rows = list(results.read_jsonl_objects(path))
    except ValueError as e:
      raise ReportError(str(e)) from None
    for number, row in rows:
      if 'id' not in row or 'method' not in row:
        raise ReportError(f'{path}:{number}: a score line needs "id" and "method"')
      scores.append({'match': {k: str(row[k]) for k in SCORE_KEYS if k in row},
                     'metrics': numeric_fields(row)})
  return scores


def attach_scores(groups, scores):
  """Adds record['_metrics'] = {name: value} from every score line matching the record."""
  by_answer = collections.defaultdict(list)
  for score in scores:
    by_answer[(score['match']['id'], score['match']['method'])].append(score)
  for (model, task, _, method, _), answers in groups.items():
    for answer_id, record in answers.items():
      fields = {'model': model, 'task': task, 'run': record['_run']}
      record['_metrics'] = {}
      candidates = by_answer.get((answer_id, method), [])
      if method != record['method']:  # distilled: lines of 'vanilla' only with their run
        candidates = candidates + [s for s in by_answer.get((answer_id, record['method']), [])
                                   if 'run' in s['match']]
      for score in candidates:
        if all(score['match'].get(k, v) == v for k, v in fields.items()):
          record['_metrics'].update(score['metrics'])


def mean(values):
  values = list(values)
  return sum(values) / len(values) if values else None


def summarize(groups, sizes):
  """Table rows (dicts with BASE_COLUMNS and metric names), sorted; and the metric names."""
  metrics = sorted({m for answers in groups.values() for r in answers.values()
                    for m in r.get('_metrics', {})})
  rows = []
  for (model, task, setting, method, training), answers in groups.items():
    records = list(answers.values())
    row = {'model': model, 'parameters': sizes.get(model), 'task': task, 'setting': setting,
           'method': method, TRAINING_COLUMN: training, 'n': len(records),
           'mean_new_tokens': mean(r['num_new_tokens'] for r in records),
           'mean_seconds': mean(r['seconds'] for r in records),
           'time_ratio_rain_vs_vanilla': None, 'simulations_per_set': None}
    if method.endswith('rain'):  # against the vanilla answers of the same model
      vanilla = groups.get((model, task, setting, method[:-len('rain')] + 'vanilla',
                            training), {})
      common = sorted(set(answers) & set(vanilla))
      if common:
        vanilla_seconds = mean(vanilla[i]['seconds'] for i in common)
        if vanilla_seconds:
          row['time_ratio_rain_vs_vanilla'] = (
              mean(answers[i]['seconds'] for i in common) / vanilla_seconds)
      sets = sum(r['search']['committed_sets'] for r in records if 'search' in r)
      if sets:
        row['simulations_per_set'] = sum(
            r['search']['simulations'] for r in records if 'search' in r) / sets
    for metric in metrics:
      row[metric] = mean(r['_metrics'][metric] for r in records
                         if metric in r.get('_metrics', {}))
    rows.append(row)
  order = {m: i for i, m in enumerate(METHODS)}
  rows.sort(key=lambda r: (r['parameters'] or 0, r['model'], r['task'], r['setting'],
                           order.get(r['method'], len(order)), r['method'],
                           r[TRAINING_COLUMN]))
  return rows, metrics


def table_columns(rows, metrics):
  """BASE_COLUMNS (with the training column after 'method' when a row is distilled),
  then the metrics."""
  columns = list(BASE_COLUMNS)
  if any(row.get(TRAINING_COLUMN) for row in rows):
    columns.insert(columns.index('method') + 1, TRAINING_COLUMN)
  return columns + metrics


def human_count(n) -> str:
  """135000000 -> '135M'."""
  if n is None:
    return ''
  for size, suffix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
    if n >= size:
      return f'{n / size:.3g}{suffix}'
  return str(n)


def format_cell(value, column) -> str:
  if value is None:
    return ''
  if column == 'parameters':
    return human_count(value)
  if isinstance(value, float):
    return f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'
  return str(value)


COLUMN_TITLES = {
    'model': 'model', 'parameters': 'params', 'task': 'task', 'setting': 'setting',
    'method': 'method', TRAINING_COLUMN: 'training', 'n': 'n', 'mean_new_tokens': 'new tokens',
    'mean_seconds': 's / prompt', 'time_ratio_rain_vs_vanilla': 'RAIN / vanilla time',
    'simulations_per_set': 'sims / set',
}


def write_csv(path, rows, columns):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: '' if row.get(c) is None else row[c] for c in columns})


def markdown(rows, columns, sources, plots):
  """The report's Markdown text."""
  lines = ['# rain_jax results', '',
           f'From {len(sources)} result file(s): ' + ', '.join(f'`{s}`' for s in sources),
           '', '| ' + ' | '.join(COLUMN_TITLES.get(c, c) for c in columns) + ' |',
           '|' + '|'.join(' --- ' for _ in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(format_cell(row.get(c), c) for c in columns) + ' |')
  lines += ['', 's / prompt: batch wall time / batch size, compile time excluded. '
            'RAIN / vanilla time: over the prompts both methods answered in the row\'s '
            'group. sims / set: simulations per committed token set (RAIN).']
  if TRAINING_COLUMN in columns:
    lines[-1] += (' distilled-vanilla: vanilla answers of the model trained (python -m '
                  'rain_jax.train, as the training column says) on the RAIN answers of '
                  'its row\'s setting.')
  if plots:
    lines += [''] + [f'![{name}]({name})' for name in plots]
  return '\n'.join(lines) + '\n'


def x_axis(rows, sizes):
  """How the plots lay out their x axis: (mode, categories).

  'size': several models, all of known size (log scale of parameters); 'model': several
  models, some of unknown size (model names in order); 'setting': one model (its
  settings side by side).
  """
  models = sorted({r['model'] for r in rows}, key=lambda m: (sizes.get(m) or 0, m))
  if len(models) > 1:
    return ('size' if all(sizes.get(m) for m in models) else 'model'), models
  settings = list(dict.fromkeys(r['setting'] for r in rows))
  return 'setting', settings


def plot_series(rows, value, methods, mode, categories, sizes):
  """{series key: [(x, y)]} of the rows' `value`; the key is (task, setting, method),
  or (task, method) when the settings are on the x axis."""
  series = collections.defaultdict(list)
  for row in rows:
    if row['method'] not in methods or row.get(value) is None:
      continue
    method = row['method'] + (f': {row[TRAINING_COLUMN]}' if row.get(TRAINING_COLUMN)
                              else '')
    if mode == 'setting':
      key, x = (row['task'], method), categories.index(row['setting'])
    else:
      key = (row['task'], row['setting'], method)
      x = sizes[row['model']] if mode == 'size' else categories.index(row['model'])
    series[key].append((x, row[value]))
  return {k: sorted(v) for k, v in sorted(series.items())}


def series_label(key, methods):
  *parts, method = key
  label = ', '.join(p for p in parts if p)
  if len(methods) > 1:
    label += f' ({"RAIN" if method == "rain" else method})'
  return label


def draw(path, rows, value, methods, sizes, title, ylabel, reference_line=None):
  """One PNG: `value` against model size (or settings, for one model), a line per series.

  Categorical x positions are dodged a little per series so that equal values stay
  visible; a y range over more than 30x is drawn on a log scale.
  """
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  mode, categories = x_axis(rows, sizes)
  series = plot_series(rows, value, methods, mode, categories, sizes)
  if not series:
    return False
  fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  groups = sorted({key[:-1] for key in series})
  for number, (key, points) in enumerate(series.items()):
    method = key[-1]
    xs, ys = zip(*points)
    if mode != 'size':
      xs = [x + 0.05 * (number - (len(series) - 1) / 2) for x in xs]
    distilled = method.startswith(DISTILLED)
    ax.plot(xs, ys, marker='^' if distilled else 'o' if method == 'rain' else 's',
            markersize=7, linestyle=':' if distilled else '-' if method == 'rain' else '--',
            color=colors[groups.index(key[:-1]) % len(colors)],
            label=series_label(key, methods))
  if reference_line is not None:
    ax.axhline(reference_line, color='gray', linewidth=1, linestyle=':',
               label=f'y = {reference_line:g}')
  if mode == 'size':
    ticks = [sizes[m] for m in categories]
    ax.set_xscale('log')
    ax.set_xlim(min(ticks) / 2, max(ticks) * 2)
    ax.minorticks_off()
    ax.set_xticks(ticks)
    ax.set_xticklabels([f'{m}\n{human_count(sizes[m])}' for m in categories], fontsize=9)
    ax.set_xlabel('model (parameters, log scale)')
  else:
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels([c or 'default' for c in categories], fontsize=9)
    ax.set_xlabel('model' if mode == 'model' else 'setting')
  if mode == 'setting':
    model = rows[0]['model']
    size = human_count(sizes.get(model))
    title += f' - {model}' + (f' ({size} parameters)' if size else '')
  values = [y for points in series.values() for _, y in points]
  if min(values) > 0 and max(values) / min(values) > 30:
    ax.set_yscale('log')
    ylabel += ' (log scale)'
  elif min(values) >= 0:
    ax.set_ylim(0, max(values) * 1.15 or 1)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, axis='y', alpha=0.3)
  ax.legend(fontsize=9, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def draw_plots(out, rows, metrics, sizes):
  """Writes the PNGs into `out`; returns their file names."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ReportError('the plots need matplotlib: pip install -e ".[report]" (or pass '
                      '--noplots)') from None
  specs = [
      ('seconds_per_prompt.png', 'mean_seconds', METHODS,
       'Mean wall time per prompt', 'seconds per prompt', None),
      ('time_ratio.png', 'time_ratio_rain_vs_vanilla', ('rain',),
       'RAIN wall time relative to vanilla decoding', 'RAIN / vanilla wall time (×)', 1.0),
      ('simulations_per_set.png', 'simulations_per_set', ('rain',),
       'RAIN search effort', 'simulations per committed token set', None),
  ]
  specs += [(f'metric_{safe_file(m)}.png', m, METHODS, f'{m} by method',
             f'mean {m}', None) for m in metrics]
  written = []
  for name, value, methods, title, ylabel, line in specs:
    if draw(os.path.join(out, name), rows, value, methods, sizes, title, ylabel, line):
      written.append(name)
  return written


def safe_file(text):
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text)


def make_report(result_paths, score_paths, out, plots=True):
  """Writes report.md, report.csv (and PNGs) into `out`; returns (rows, plot names)."""
  files, manifest_settings = find_result_files(result_paths)
  trainings = trainings_of(files)
  groups = load_answers(files, manifest_settings, trainings)
  if not groups:
    raise ReportError('the result files hold no answers')
  attach_scores(groups, read_scores(score_paths))
  sizes = model_parameters(files, trainings)
  rows, metrics = summarize(groups, sizes)
  columns = table_columns(rows, metrics)
  os.makedirs(out, exist_ok=True)
  plot_names = draw_plots(out, rows, metrics, sizes) if plots else []
  write_csv(os.path.join(out, 'report.csv'), rows, columns)
  with open(os.path.join(out, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(rows, columns, files, plot_names))
  return rows, plot_names


def define_flags():
  """Defines the command-line flags (only when run as a script)."""
  flags.DEFINE_list('results', [], 'Result files and/or folders.')
  flags.DEFINE_list('scores', [], 'Score files (JSONL) to join on (model, task, run, id, '
                    'method).')
  flags.DEFINE_string('out', None, 'Report folder: report.md, report.csv, *.png.')
  flags.DEFINE_bool('plots', True, 'Draw PNG plots (needs matplotlib).')
  flags.DEFINE_string('trees', None, 'A results file of a run with --dump_tree: draw one '
                      'tree picture (PNG) per RAIN record into --out (needs matplotlib).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not (FLAGS.results or FLAGS.trees) or not FLAGS.out:
    raise app.UsageError('--out and --results (a report) or --trees (tree pictures) are '
                         'required')
  try:
    if FLAGS.trees:
      pictures = tree_pictures.draw_trees(FLAGS.trees, FLAGS.out)
      print(f'report.py: {len(pictures)} tree pictures in {FLAGS.out}', file=sys.stderr)
    if FLAGS.results:
      rows, plot_names = make_report(FLAGS.results, FLAGS.scores, FLAGS.out, FLAGS.plots)
      print(f'report.py: {len(rows)} rows, {len(plot_names)} plots in {FLAGS.out}',
            file=sys.stderr)
  except (ReportError, ValueError, OSError) as e:
    print(f'report.py: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
