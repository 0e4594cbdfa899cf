"""The plots a run and a study write are for looking at: readable size, full titles, units."""

import json

import numpy as np


def _png_size(path) -> tuple[int, int]:
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n'
  return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def test_training_plot_names_the_task_method_and_metric(tmp_path, monkeypatch):
  from jaxprompt.train import summaries
  (tmp_path / 'manifest.json').write_text(json.dumps({'method': 'prompt_tuning',
                                                      'task': 'lab_has_dog'}))
  rows = [{'step': s, 'split': 'train', 'loss_per_token': 1.0 / s} for s in (1, 2, 3)]
  rows += [{'step': 3, 'split': 'eval', 'accuracy': 75.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  titles = []
  import matplotlib.axes
  original = matplotlib.axes.Axes.set_title
  monkeypatch.setattr(matplotlib.axes.Axes, 'set_title',
                      lambda self, text, *a, **k: titles.append(text) or original(
                          self, text, *a, **k))
  path = summaries.plot_run(str(tmp_path))
  assert titles == ['prompt_tuning on lab_has_dog: train loss and validation accuracy (%)']
  width, height = _png_size(path)
  assert width >= 640 and height >= 400


def test_heatmap_is_readable_whatever_the_matrix_size(tmp_path):
  from jaxprompt.methods import transferability as tr
  names = ['lab_has_dog', 'lab_count_numbers', 'lab_first_word']
  path = tr.heatmap(str(tmp_path / 'm.png'), np.eye(3), names, names,
                    "zero-shot transfer: score / target's own prompt score, a long title that "
                    'must wrap rather than be clipped', value_label='relative score')
  width, height = _png_size(path)
  assert width >= 700 and height >= 520  # was 291 x 258 for a 3 x 3 matrix


def test_xprompt_masks_legend_matches_the_data(tmp_path):
  """Kept pieces are drawn in the legend's 'kept' colour, pruned ones in its 'pruned' colour:
  with a quarter of the pieces kept, the kept colour covers a third of the pruned colour's area."""
  import matplotlib.image
  from matplotlib.colors import to_rgb
  from jaxprompt.methods import xprompt
  token = np.array([1, 0, 0, 0], np.float32)  # one token of four kept, all its pieces
  piece = np.ones((4, 8), np.float32)
  path = xprompt.draw_masks({0.75: (token, piece)}, str(tmp_path / 'masks.png'))
  image = matplotlib.image.imread(path)[..., :3]

  def area(colour):
    return int(np.all(np.abs(image - np.asarray(to_rgb(colour))) < 0.02, axis=-1).sum())

  kept, pruned = area(xprompt.MASK_COLOURS['kept']), area(xprompt.MASK_COLOURS['pruned'])
  assert kept > 100 and pruned > 100
  assert 0.25 < kept / pruned < 0.45, (kept, pruned)
