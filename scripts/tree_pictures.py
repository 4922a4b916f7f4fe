"""Tree pictures: one PNG per RAIN record from its `--dump_tree` data (issue 13).

  python3 scripts/report.py --trees=out/demo.jsonl --out=out/demo_trees

Each picture shows one prompt's search. Along the top, the committed path: one box per
committed set, coloured by the committed child's q. Below, one panel per commit: the
root's children at that commit as horizontal bars (length = visits n, colour = q on a
diverging red-yellow-green scale with a colour bar; the committed child outlined in
black and its label bold; each bar labelled with n and q), the most visited first.
Under each child's bar a thin stacked bar splits the visits of its own children (the
level below, `children` of a dumped child: at most search.GRANDCHILDREN_RECORDED, most
visited first), coloured by their q. Panel titles give the step's simulations and
whether it ended by early stop. At most MAX_COMMITS panels and MAX_CHILDREN bars a
panel (the title says what was left out); readable at 50 simulations, 10 children and
about 10 commits.

Needs matplotlib (`pip install -e ".[report]"`), imported when drawing.
"""
import math
import os
import re
import warnings

from rain_jax import results

MAX_COMMITS = 12
MAX_CHILDREN = 10
LABEL_CHARS = 16
COLUMNS = 4
COLORMAP = 'RdYlGn'
MISSING_DUMP = 'run with --dump_tree'


class TreePictureError(ValueError):
  """Result records that cannot be drawn (one line, naming the file)."""


def picture_name(record_id) -> str:
  """The PNG file name of a record's picture."""
  return 'tree_' + (re.sub(r'[^A-Za-z0-9_.-]+', '_', str(record_id)) or 'record') + '.png'


def dumped_records(path) -> list:
  """The RAIN records of results file `path` that carry a tree dump; TreePictureError
  when there are none, or when one lacks `tree_dump`."""
  if not os.path.exists(path):
    raise TreePictureError(f'{path}: no such results file')
  rain = [r for r in results.read_records(path) if r.get('method') == 'rain']
  if not rain:
    raise TreePictureError(f'{path} holds no RAIN records')
  for record in rain:
    if 'tree_dump' not in record:
      raise TreePictureError(f'{path}: RAIN record {record.get("id")!r} has no tree_dump: '
                             f'{MISSING_DUMP}')
  return rain


def short(text: str, limit: int) -> str:
  """One-line text in quotes, cut to `limit` characters (then '…')."""
  flat = text.replace('\n', '⏎').replace('\t', ' ')
  return '"' + (flat[:limit] + '…' if len(flat) > limit else flat) + '"'


def committed_index(step):
  """The index in step['children'] of the committed set: the dump's 'committed', or for
  a dump written before it was recorded the commit rule's pick (most visits n, ties to
  the larger q, then the first); None without children."""
  kids = step['children']
  if 'committed' in step or not kids:
    return step.get('committed')
  return min(range(len(kids)), key=lambda i: (-kids[i]['n'], -kids[i]['q'], i))


def ranked_children(step, limit=MAX_CHILDREN):
  """(children of one dumped commit, most visits first (ties: larger q, then column
  order), at most `limit`; index of the committed one among them or None; how many
  were left out)."""
  kids = step['children']
  order = sorted(range(len(kids)), key=lambda i: (-kids[i]['n'], -kids[i]['q'], i))
  shown = order[:limit]
  committed = committed_index(step)
  place = shown.index(committed) if committed in shown else None
  return [kids[i] for i in shown], place, len(kids) - len(shown)


def value_norm(records):
  """A colour normaliser symmetric around 0 covering every q of the dumps (at least
  [-1, 1])."""
  from matplotlib import colors
  qs = [abs(node['q']) for r in records for step in r['tree_dump']
        for child in step['children'] for node in [child] + child.get('children', [])]
  top = max([1.0] + qs)
  return colors.Normalize(vmin=-top, vmax=top)


def signed(q) -> str:
  """q with its sign and 2 decimals ('+0.00', never '-0.00')."""
  text = f'{q:+.2f}'
  return '+0.00' if text == '-0.00' else text


def luminance(rgba) -> float:
  """Relative brightness in [0, 1] of an RGBA colour (for a readable text colour on it)."""
  red, green, blue = rgba[:3]
  return 0.299 * red + 0.587 * green + 0.114 * blue


def draw_path(ax, steps, cmap, norm):
  """The committed path as a row of boxes (text of each committed set) with arrows."""
  ax.set_axis_off()
  ax.set_xlim(0, len(steps))
  ax.set_ylim(0, 1)
  inches = ax.get_position().width * ax.figure.get_figwidth() / len(steps)
  chars = max(4, int(inches * 11) - 7)  # what fits a box at font size 8 with "12: " and quotes
  for i, step in enumerate(steps):
    index = committed_index(step)
    child = None if index is None else step['children'][index]
    text = short(child['text'], chars) if child else '(none)'
    color = cmap(norm(child['q'])) if child else (1.0, 1.0, 1.0, 1.0)
    ax.text(i + 0.5, 0.5, f'{i + 1}: {text}', ha='center', va='center', fontsize=8,
            color='white' if luminance(color) < 0.45 else 'black',
            bbox={'boxstyle': 'round,pad=0.4', 'facecolor': color, 'edgecolor': 'black'})
    if i + 1 < len(steps):
      ax.annotate('', xy=(i + 1.08, 0.5), xytext=(i + 0.92, 0.5),
                  arrowprops={'arrowstyle': '->', 'color': 'gray'})


def draw_commit(ax, number, step, cmap, norm):
  """One commit's panel: bars of the root's children, thin stacked bars of theirs."""
  kids, committed, hidden = ranked_children(step)
  most = max([child['n'] for child in kids] + [1.0])
  for row, child in enumerate(kids):
    mine = row == committed
    ax.barh(row, child['n'], height=0.5, color=cmap(norm(child['q'])),
            edgecolor='black' if mine else 'gray', linewidth=2.2 if mine else 0.5)
    ax.text(child['n'] + most * 0.02, row, f"n={round(child['n'], 2):g} q={signed(child['q'])}",
            va='center', fontsize=7)
    left = 0.0
    for grand in child.get('children', []):
      ax.barh(row + 0.4, grand['n'], left=left, height=0.2, color=cmap(norm(grand['q'])),
              edgecolor='dimgray', linewidth=0.4)
      left += grand['n']
  ax.set_yticks(range(len(kids)))
  labels = ax.set_yticklabels([short(child['text'], LABEL_CHARS) for child in kids],
                              fontsize=8)
  if committed is not None:
    labels[committed].set_fontweight('bold')
  ax.set_ylim(len(kids) - 0.3 if kids else 0.5, -0.6)
  ax.set_xlim(0, most * 1.45)
  ax.tick_params(axis='x', labelsize=7)
  ax.set_xlabel('visits n', fontsize=7)
  title = f"commit {number}: {step['simulations']} simulations"
  title += ', early stop' if step.get('early') else ''
  title += f', +{hidden} more children' if hidden else ''
  ax.set_title(title, fontsize=8)


# Layout in inches: a panel column (y labels, bars, their labels), the panels' height
# per bar and around them, the strips above (title, caption, committed path).
COLUMN_WIDTH, LABEL_WIDTH, BAR_WIDTH = 4.8, 1.5, 2.6
BAR_HEIGHT, PANEL_EXTRA, PANEL_GAP = 0.42, 0.3, 0.75
TITLE_HEIGHT, PATH_HEIGHT, COLORBAR_WIDTH = 0.8, 0.55, 0.9
CAPTION = ('bars: the root\'s children at each commit (length = visits n, colour = q; '
           'outlined and bold: the committed set); thin bars under them: their own '
           'children\'s visits, coloured by q')


def panel_boxes(count, columns, bars):
  """(figure size (w, h) in inches, the committed path's box, one box per panel); boxes
  are matplotlib's [left, bottom, width, height] figure fractions."""
  rows = max(1, math.ceil(count / columns))
  panel = BAR_HEIGHT * bars + PANEL_EXTRA
  width = COLUMN_WIDTH * columns + COLORBAR_WIDTH
  height = TITLE_HEIGHT + PATH_HEIGHT + rows * (panel + PANEL_GAP)
  path_box = [0.02, 1 - (TITLE_HEIGHT + PATH_HEIGHT) / height,
              COLUMN_WIDTH * columns / width - 0.02, PATH_HEIGHT / height]
  boxes = []
  for i in range(count):
    row, column = divmod(i, columns)
    top = TITLE_HEIGHT + PATH_HEIGHT + PANEL_GAP + row * (panel + PANEL_GAP)
    boxes.append([(COLUMN_WIDTH * column + LABEL_WIDTH) / width, 1 - (top + panel) / height,
                  BAR_WIDTH / width, panel / height])
  return (width, height), path_box, boxes


def draw_tree(record, path, max_commits=MAX_COMMITS):
  """Writes the PNG of one RAIN record (with `tree_dump`) to `path`."""
  plt = pyplot()
  from matplotlib import cm
  steps = record['tree_dump'][:max_commits]
  cmap, norm = plt.get_cmap(COLORMAP), value_norm([record])
  columns = max(1, min(len(steps), COLUMNS))
  bars = max([min(len(s['children']), MAX_CHILDREN) for s in steps] + [1])
  size, path_box, boxes = panel_boxes(len(steps), columns, bars)
  fig = plt.figure(figsize=size, dpi=110)
  total = len(record['tree_dump'])
  fig.text(0.5, 1 - 0.3 / size[1], f"{record['id']}: {short(record.get('response', ''), 90)}"
           + (f'  (first {len(steps)} of {total} commits)' if total > len(steps) else ''),
           ha='center', va='center', fontsize=11)
  fig.text(0.5, 1 - 0.62 / size[1], CAPTION, ha='center', va='center', fontsize=7,
           color='dimgray')
  if steps:
    draw_path(fig.add_axes(path_box), steps, cmap, norm)
  else:
    fig.text(0.5, 0.3, 'no committed set (the search stopped before its first commit)',
             ha='center')
  for i, (step, box) in enumerate(zip(steps, boxes)):
    draw_commit(fig.add_axes(box), i + 1, step, cmap, norm)
  bottom = boxes[-1][1] if boxes else 0.1
  bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_axes(
      [1 - 0.55 / size[0], bottom, 0.15 / size[0], path_box[1] - 0.3 / size[1] - bottom]))
  bar.set_label('q (mean judged value)', fontsize=8)
  bar.ax.tick_params(labelsize=7)
  with warnings.catch_warnings():  # token texts in scripts the default font lacks
    warnings.filterwarnings('ignore', message='Glyph .* missing from', category=UserWarning)
    fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


def pyplot():
  """matplotlib.pyplot on the Agg backend; TreePictureError naming the extra without it."""
  try:
    import matplotlib
  except ImportError:
    raise TreePictureError('the tree pictures need matplotlib: pip install -e ".[report]"'
                           ) from None
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  return plt


def draw_trees(results_path, out) -> list:
  """One PNG per RAIN record of `results_path` into folder `out`; returns their paths."""
  records = dumped_records(results_path)
  pyplot()  # the extra's error before any folder is made
  os.makedirs(out, exist_ok=True)
  paths = []
  for record in records:
    path = os.path.join(out, picture_name(record['id']))
    draw_tree(record, path)
    paths.append(path)
  return paths
