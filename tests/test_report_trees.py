"""scripts/report.py --trees (scripts/tree_pictures.py): one PNG per RAIN record from its
--dump_tree data; a record without a dump is a one-line error naming the file."""
import json
import os
import subprocess
import sys

import pytest

from scripts import tree_pictures
from tests import tiny_run

REPO = tiny_run.REPO
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def node(text, n, q, tokens=(5,), children=None):
  made = {'tokens': list(tokens), 'text': text, 'n': float(n), 'fn': int(n), 'q': q,
          'p': 0.1}
  if children is not None:
    made['children'] = children
  return made


def big_record(commits=14, width=15):
  """A hand-made RAIN record: `commits` steps of `width` root children, each with a few
  children of its own (50 simulations a step, one early stop)."""
  dump = []
  for c in range(commits):
    kids = [node(f' tok{c}-{k}\n' if k % 4 == 0 else f'tok{c}-{k} long text here', 15 - k,
                 (k % 5 - 2) / 2, children=[node(f'g{j}', 3 - j, 0.5 - j / 2)
                                             for j in range(3 if k < 5 else 0)])
            for k in range(width)]
    dump.append({'simulations': 50, 'early': c == 2, 'committed': 0, 'children': kids})
  return {'id': 'big/one', 'method': 'rain', 'response': 'x' * 300, 'tree_dump': dump}


def write_records(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def assert_png(path, min_width=600, min_height=300):
  from matplotlib import image
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC
  height, width = image.imread(path).shape[:2]
  assert width >= min_width and height >= min_height


def test_a_picture_of_many_commits_and_children(tmp_path):
  path = tmp_path / 'big.png'
  tree_pictures.draw_tree(big_record(), str(path))
  assert_png(path, min_width=1500)


def test_draw_trees_writes_one_png_per_rain_record(tmp_path):
  results = write_records(tmp_path / 'r.jsonl', [
      {'id': 'v', 'method': 'vanilla', 'response': 'a'}, big_record(commits=3, width=4),
      {**big_record(commits=0), 'id': 7}])
  paths = tree_pictures.draw_trees(str(results), str(tmp_path / 'pics'))
  assert [os.path.basename(p) for p in paths] == ['tree_big_one.png', 'tree_7.png']
  assert_png(paths[0], min_width=1000)
  assert_png(paths[1], min_width=300, min_height=100)  # no commit: a line saying so


def test_ranking_and_the_committed_child_of_an_older_dump():
  step = {'simulations': 5, 'children': [node('a', 2, 0.0), node('b', 3, -1.0),
                                         node('c', 3, 0.5), node('d', 1, 1.0)]}
  assert tree_pictures.committed_index(step) == 2  # most n, ties to the larger q
  kids, committed, hidden = tree_pictures.ranked_children(step, limit=3)
  assert [k['text'] for k in kids] == ['c', 'b', 'a'] and committed == 0 and hidden == 1
  kids, committed, _ = tree_pictures.ranked_children({**step, 'committed': 3}, limit=2)
  assert committed is None  # the committed child is not among the bars shown


def report(*args):
  return subprocess.run([sys.executable, 'scripts/report.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_a_record_without_a_dump_is_a_one_line_error(tmp_path):
  results = write_records(tmp_path / 'plain.jsonl', [
      big_record(commits=1), {'id': 'q', 'method': 'rain', 'response': 'b'}])
  proc = report(f'--trees={results}', f'--out={tmp_path / "pics"}')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"report.py: error: {results}: RAIN record 'q' has no tree_dump: run with --dump_tree"]
  assert not (tmp_path / 'pics').exists()
  vanilla = write_records(tmp_path / 'v.jsonl', [{'id': 1, 'method': 'vanilla'}])
  with pytest.raises(tree_pictures.TreePictureError, match='holds no RAIN records'):
    tree_pictures.draw_trees(str(vanilla), str(tmp_path / 'pics'))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, tiny_llama_32k_dir):
  return tiny_run.shared_run(tmp_path_factory, tiny_llama_32k_dir)


def test_pictures_from_a_tiny_runs_dump(tiny, tmp_path):
  output, _ = tiny
  out = tmp_path / 'trees'
  proc = report(f'--trees={output}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'report.py: 2 tree pictures in' in proc.stderr
  assert sorted(os.listdir(out)) == ['tree_bread.png', 'tree_sky.png']
  for name in os.listdir(out):
    assert_png(out / name)
  records = [r for r in tiny_run.read_records(output) if r['method'] == 'rain']
  assert any(child['children'] for r in records for step in r['tree_dump']
             for child in step['children'])  # the level below was recorded and drawn
