"""The package's shape: imports point one way (no cycle among dsconv_jax modules)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'dsconv_jax')


def import_graph():
  """module -> the dsconv_jax modules it imports, at the top or inside functions."""
  graph = {}
  for name in sorted(os.listdir(PACKAGE)):
    if not name.endswith('.py'):
      continue
    module = name[:-3]
    with open(os.path.join(PACKAGE, name)) as f:
      tree = ast.parse(f.read())
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'dsconv_jax':
        targets |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('dsconv_jax.'):
        targets.add(node.module.split('.')[1])
      elif isinstance(node, ast.Import):
        targets |= {a.name.split('.')[1] for a in node.names if a.name.startswith('dsconv_jax.')}
    graph[module] = targets - {module}
  return graph


def find_cycle(graph):
  """A list of modules forming a cycle, or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, path + [nxt])
        if cycle:
          return cycle
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_no_import_cycle_among_package_modules():
  graph = import_graph()
  assert {'train', 'experiment', 'steps', 'layers', 'models'} <= set(graph)
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']


def test_library_modules_do_not_import_entry_points():
  entry_points = {'main', 'summary', 'bench', 'throughput', 'compare', 'predict', 'evaluate',
                  'export'}
  graph = import_graph()
  for module, targets in graph.items():
    if module not in entry_points:
      assert not targets & entry_points, (module, targets & entry_points)


def test_the_package_imports_no_private_jax_module():
  """jax._src changes without notice between releases; the package uses JAX's public API."""
  import re
  for name in sorted(os.listdir(PACKAGE)):
    if name.endswith('.py'):
      with open(os.path.join(PACKAGE, name)) as f:
        text = f.read()
      assert not re.search(r'^\s*(from jax\._src\b|import jax\._src\b)', text, re.M), name
