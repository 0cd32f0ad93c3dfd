"""Every config key with its default and its meaning, read from `dsconv_jax/defaults.py`.

The meaning of a key is the comment written above its assignment in `defaults.get_config()` and at
the end of that line; a one-word heading such as `# Training.` is not part of it. The default is
the value `get_config()` returns, nested keys (`constraints.*`) included. The documentation's configuration reference is rendered from here when the site is
built, so it lists exactly the keys the code has.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
from typing import Any

from dsconv_jax import defaults


@dataclasses.dataclass(frozen=True)
class Key:
  name: str  # Dotted, e.g. 'constraints.max_params'.
  default: Any
  description: str  # '' when defaults.py has no comment for it.


_HEADING = re.compile(r'^[A-Z][a-z]+\.$')  # e.g. 'Training.' above a group of keys.


def _comments_by_line(source: str) -> dict[int, str]:
  """Line number -> the text of the comment on that line (without '#')."""
  comments = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip('#').strip()
  return comments


def _assigned_name(target: ast.expr) -> str | None:
  """'a.b' for the target `config.a.b`, else None."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  if isinstance(target, ast.Name) and target.id == 'config' and parts:
    return '.'.join(reversed(parts))
  return None


def _descriptions(source: str) -> dict[str, str]:
  """Dotted key -> its comment, for every `config.KEY = ...` in `get_config`'s source."""
  lines = source.splitlines()
  comments = _comments_by_line(source)
  function = next(node for node in ast.parse(source).body
                  if isinstance(node, ast.FunctionDef) and node.name == 'get_config')
  described = {}
  for statement in function.body:
    if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
      continue
    name = _assigned_name(statement.targets[0])
    if name is None:
      continue
    above, line = [], statement.lineno - 1
    while line >= 1 and lines[line - 1].strip().startswith('#'):
      if not _HEADING.match(comments[line]):
        above.insert(0, comments[line])
      line -= 1
    described[name] = ' '.join(
        above + [comments[n] for n in range(statement.lineno, statement.end_lineno + 1)
                 if n in comments])
  return described


def _flatten(config, prefix: str = '') -> list[tuple[str, Any]]:
  items = []
  for name, value in config.items():
    dotted = prefix + name
    if hasattr(value, 'items') and len(value):
      items += _flatten(value, dotted + '.')
    else:
      items.append((dotted, value.to_dict() if hasattr(value, 'to_dict') else value))
  return items


def keys() -> list[Key]:
  """Every key of `defaults.get_config()`, in the order defaults.py assigns them."""
  described = _descriptions(inspect.getsource(defaults))
  order = {name: i for i, name in enumerate(described)}
  flat = _flatten(defaults.get_config())
  flat.sort(key=lambda item: order.get(item[0], len(order)))
  return [Key(name, value, described.get(name, '')) for name, value in flat]


def _format_default(value: Any) -> str:
  text = repr(value) if isinstance(value, str) else str(value)
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
    text = f'{value:_}'
  return f'`{text}`'


def markdown() -> str:
  """The configuration reference as a MyST/Markdown table (the documentation's page body)."""
  rows = ['| key | default | meaning |', '| --- | --- | --- |']
  for key in keys():
    meaning = key.description.replace('|', '\\|')
    rows.append(f'| `{key.name}` | {_format_default(key.default)} | {meaning} |')
  return '\n'.join(rows) + '\n'
