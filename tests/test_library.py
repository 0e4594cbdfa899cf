"""The prompt library: index, atomic adds, locking, listing, bad input, similarity, ranking."""

import json
import multiprocessing
import os

import numpy as np
import pytest

from jaxprompt import cli
from jaxprompt.methods import library as lib
from jaxprompt.prompts.files import read_prompt, write_prompt


def _prompt(tmp_path, name, value, **meta):
  return write_prompt(str(tmp_path / f'{name}.safetensors'), value, **meta)


def test_similarities_match_direct_numpy():
  rs = np.random.RandomState(0)
  e1, e2 = rs.normal(size=(5, 8)), rs.normal(size=(7, 8))
  m1, m2 = e1.mean(0), e2.mean(0)
  want_avg = m1 @ m2 / (np.linalg.norm(m1) * np.linalg.norm(m2))
  want_tok = np.mean([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in e2] for a in e1])
  assert lib.cosine_average_tokens(e1, e2) == pytest.approx(want_avg, abs=1e-12)
  assert lib.per_token_average_cosine(e1, e2) == pytest.approx(want_tok, abs=1e-12)
  assert lib.per_token_average_cosine(e1, e1) < 1.0 == pytest.approx(lib.cosine_average_tokens(e1, e1))
  with pytest.raises(ValueError, match='8 vs 9'):
    lib.per_token_average_cosine(e1, rs.normal(size=(5, 9)))
  m = lib.similarity_matrix([e1], [e1, e2], 'avg_tokens')
  assert m.shape == (1, 2) and m[0, 0] == pytest.approx(1.0)


def test_add_list_show_prompt_path(tmp_path):
  rs = np.random.RandomState(1)
  d = str(tmp_path / 'lib')
  src = _prompt(tmp_path, 'a', rs.normal(size=(4, 8)), task='task_a', step=30,
                metrics={'accuracy': 75.0}, backbone='/ckpt', backbone_fingerprint='sha256:aaa')
  e = lib.add(d, src, embedding=rs.normal(size=(4, 8)), embedding_steps=10)
  assert e['task'] == 'task_a' and e['steps'] == 30 and e['length'] == 4 and e['width'] == 8
  assert e['embedding_steps'] == 10 and os.path.isfile(e['embedding_path'])
  path = lib.prompt_path(d, 'task_a')
  np.testing.assert_allclose(read_prompt(path).value, read_prompt(src).value)
  assert read_prompt(path).metadata['task'] == 'task_a'
  index = json.load(open(os.path.join(d, 'index.json')))
  assert index['format'] == lib.FORMAT and set(index['entries']) == {'task_a'}
  # A second prompt of the same task needs replace; the old file goes only after the index.
  with pytest.raises(ValueError, match='--replace'):
    lib.add(d, src)
  e2 = lib.add(d, rs.normal(size=(4, 8)), task='task_a', replace=True,
               metadata={'backbone_fingerprint': 'sha256:bbb'})
  assert e2['file'] != e['file'] and not os.path.exists(e['path'])
  # Listing flags another backbone and another width.
  lib.add(d, rs.normal(size=(4, 6)), task='task_narrow',
          metadata={'backbone_fingerprint': 'sha256:aaa'})
  rows = {r['task']: r['status'] for r in lib.describe(d, backbone='sha256:aaa', width=8)}
  assert rows == {'task_a': 'other backbone', 'task_narrow': 'width 6 != 8'}
  with pytest.raises(ValueError, match=r'width 6 does not match width 8'):
    lib.load_prompt(d, 'task_narrow', width=8)


def test_cli_list_add_show_and_bad_input(tmp_path, capsys):
  rs = np.random.RandomState(2)
  d = str(tmp_path / 'lib')
  src = _prompt(tmp_path, 'p', rs.normal(size=(3, 8)), task='t1')
  assert cli.main(['library', 'add', d, '--prompt', src]) == 0
  assert 'added t1' in capsys.readouterr().out
  assert cli.main(['library', 'list', d]) == 0
  out = capsys.readouterr().out
  assert '1 prompt(s)' in out and 't1' in out
  assert cli.main(['library', 'show', d, 't1', '--json']) == 0
  assert json.loads(capsys.readouterr().out)['width'] == 8

  def one_line_error(argv, *needles):
    before = open(os.path.join(d, 'index.json')).read() if os.path.exists(d) else None
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0, err
    for n in needles:
      assert n in err, err
    if before is not None:
      assert open(os.path.join(d, 'index.json')).read() == before  # nothing overwritten

  one_line_error(['library', 'list', str(tmp_path / 'nope')], 'does not exist')
  one_line_error(['library', 'show', d, 't2'], "no prompt for task 't2'")
  one_line_error(['library', 'add', d, '--prompt', src], '--replace')
  os.makedirs(tmp_path / 'notlib')
  (tmp_path / 'notlib' / 'x.txt').write_text('x')
  one_line_error(['library', 'add', str(tmp_path / 'notlib'), '--prompt', src], 'not empty')
  # An index naming a missing file: one line, and --init_from through it fails the same way.
  os.remove(lib.prompt_path(d, 't1'))
  one_line_error(['library', 'show', d, 't1'], 'missing')
  from jaxprompt.prompts.init import resolve_source
  with pytest.raises(ValueError, match='missing'):
    resolve_source(f'{d}:t1')
  rows = lib.describe(d)
  assert rows[0]['status'] == 'missing file'


def test_add_is_atomic_when_the_index_write_fails(tmp_path, monkeypatch):
  rs = np.random.RandomState(3)
  d = str(tmp_path / 'lib')
  lib.add(d, rs.normal(size=(3, 8)), task='keep')
  before = open(os.path.join(d, 'index.json')).read()

  def crash(*a, **k):
    raise OSError('disk full')

  monkeypatch.setattr(lib, '_write_index', crash)
  with pytest.raises(OSError):
    lib.add(d, rs.normal(size=(3, 8)), task='new')
  with pytest.raises(OSError):
    lib.add(d, rs.normal(size=(3, 8)), task='keep', replace=True)
  monkeypatch.undo()
  assert open(os.path.join(d, 'index.json')).read() == before
  for e in lib.entries(d).values():  # the index never names a missing file
    assert os.path.isfile(e['path'])


def _writer(args):
  d, i = args
  rs = np.random.RandomState(i)
  for j in range(5):
    lib.add(d, rs.normal(size=(2, 4)), task=f'w{i}_{j}')
  return i


def test_two_writers_never_lose_entries(tmp_path):
  d = lib.create(str(tmp_path / 'lib'))
  ctx = multiprocessing.get_context('fork')
  with ctx.Pool(3) as pool:
    pool.map(_writer, [(d, i) for i in range(3)])
  assert sorted(lib.entries(d)) == sorted(f'w{i}_{j}' for i in range(3) for j in range(5))


def test_rank_orders_by_similarity_and_rejects_bad_input(tmp_path):
  rs = np.random.RandomState(4)
  d = str(tmp_path / 'lib')
  base = np.tile(rs.normal(size=(1, 8)), (4, 1))  # one direction: both similarities see it
  for name, noise in (('near', 0.1), ('mid', 1.0), ('far', 5.0)):
    lib.add(d, rs.normal(size=(4, 8)), task=name, embedding=base + noise * rs.normal(size=(4, 8)))
  ranking = lib.rank(base, d, 'per_token')
  assert [t for t, _ in ranking] == ['near', 'mid', 'far']
  assert [t for t, _ in lib.rank(base, d, 'avg_tokens')] == ['near', 'mid', 'far']
  assert lib.rank(base, d, k=2) == ranking[:2]
  assert [t for t, _ in lib.rank(base, d, exclude=['near'])] == ['mid', 'far']
  with pytest.raises(ValueError, match='k = 4 is larger than the library'):
    lib.rank(base, d, k=4)
  with pytest.raises(ValueError, match='embedding width 5 does not match.*8'):
    lib.rank(rs.normal(size=(4, 5)), d)
  with pytest.raises(ValueError, match='does not exist'):
    lib.rank(base, str(tmp_path / 'none'))
