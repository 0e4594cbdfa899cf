"""The floors of the house: no module imports a higher floor, and no import circle.

Every module of `jaxprompt/` is parsed (nothing is imported); every import counts, at module
level or inside a function, `from . import x` included. `from P import name` is an arrow to
the submodule `P.name` when there is one, else to the package `P`. The floors, lowest first,
are those of docs/design.md ("The floors"); a lower floor that needs a higher one at run time
looks it up in a registry the higher floor fills (`jaxprompt.registry`, the method registry,
`prompts.init.register_source_resolver`).
"""

from __future__ import annotations

import ast
import os

import jaxprompt

PACKAGE_DIR = os.path.dirname(jaxprompt.__file__)

# (floor, module prefixes); a module belongs to the floor of its longest matching prefix.
FLOORS = (
    (0, ('jaxprompt.config', 'jaxprompt.flags', 'jaxprompt.host', 'jaxprompt.registry',
         'jaxprompt.version')),
    (1, ('jaxprompt.model',)),
    (2, ('jaxprompt.data', 'jaxprompt.prompts', 'jaxprompt.checkpoints')),
    (3, ('jaxprompt.train',)),
    (4, ('jaxprompt.methods', 'jaxprompt.methods.base')),  # the registry and the contract
    (5, ('jaxprompt.tuning', 'jaxprompt.evaluate', 'jaxprompt.plan')),  # the run driver
    (6, ('jaxprompt.methods.',)),  # each method: its mapping, its procedures, its commands
    (7, ('jaxprompt.artefacts', 'jaxprompt.lab')),
    (8, ('jaxprompt', 'jaxprompt.cli', 'jaxprompt.train.__main__')),  # the entry points
)


def module_files() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  root = os.path.dirname(PACKAGE_DIR)
  for directory, _, files in os.walk(PACKAGE_DIR):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(directory, f)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        out[name.removesuffix('.__init__')] = path
  return out


def imports_of(name: str, path: str, modules) -> set[str]:
  """The package's modules that `name` imports, anywhere in its body."""
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  targets = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package
        for _ in range(node.level - 1):
          parent = parent.rpartition('.')[0]
        base = f'{parent}.{base}' if base else parent
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        targets.add(sub if sub in modules else base)
  out = set()
  for target in targets:
    while target and target not in modules:  # `import jaxprompt.x.y` names a module or its package
      target = target.rpartition('.')[0]
    if target.startswith('jaxprompt') and target != name:
      out.add(target)
  return out


def floor_of(name: str) -> int:
  best = None
  for floor, prefixes in FLOORS:
    for prefix in prefixes:
      matches = name == prefix or (name.startswith(prefix) if prefix.endswith('.') else
                                   name.startswith(prefix + '.'))
      if matches and (best is None or len(prefix) > len(best[1])):
        best = (floor, prefix)
  assert best is not None, f'{name}: on no floor; add it to FLOORS and to docs/design.md'
  return best[0]


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_every_kind_of_import(tmp_path):
  graph = import_graph()
  assert 'jaxprompt.lab.world' in graph['jaxprompt.lab.cache']  # from jaxprompt.lab import world
  assert 'jaxprompt.tuning' in graph['jaxprompt.lab.backbone']  # inside a function
  assert 'jaxprompt.registry' in graph['jaxprompt.checkpoints.backbone']  # module level
  fake = tmp_path / 'fake.py'  # as if it were jaxprompt/methods/fake.py
  fake.write_text('import os\nfrom . import spot\n\n\ndef f():\n  from ..lab import world\n'
                  '  from . import register\n  import jaxprompt.train.steps\n')
  assert imports_of('jaxprompt.methods.fake', str(fake), module_files()) == {
      'jaxprompt.methods.spot', 'jaxprompt.lab.world', 'jaxprompt.methods',
      'jaxprompt.train.steps'}


def test_a_circle_and_an_upward_arrow_are_seen():
  assert circles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert floor_of('jaxprompt.lab.backbone') > floor_of('jaxprompt.checkpoints.backbone')
  assert floor_of('jaxprompt.methods.spot') > floor_of('jaxprompt.tuning') > floor_of(
      'jaxprompt.methods.base')
  assert floor_of('jaxprompt.train.__main__') > floor_of('jaxprompt.train.loop')


def test_every_module_has_a_floor():
  for name in import_graph():
    floor_of(name)


def test_no_module_imports_a_higher_floor():
  graph = import_graph()
  upward = sorted(f'{a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})'
                  for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a))
  assert not upward, 'imports up the floors:\n' + '\n'.join(upward)


def test_no_import_circle():
  found = circles(import_graph())
  assert not found, 'import circles:\n' + '\n'.join(' <-> '.join(c) for c in found)


def test_the_floors_are_those_of_the_design_notes():
  with open(os.path.join(os.path.dirname(PACKAGE_DIR), 'docs', 'design.md')) as f:
    text = f.read()
  for floor, prefixes in FLOORS:
    line = next((l for l in text.splitlines() if l.startswith(f'{floor}  ')), None)
    assert line is not None, f'docs/design.md: no line for floor {floor}'
    for prefix in prefixes:
      assert prefix.removeprefix('jaxprompt.').rstrip('.') in line or prefix == 'jaxprompt', (
          f'docs/design.md floor {floor}: {prefix} missing')
