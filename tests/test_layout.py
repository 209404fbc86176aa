"""The package's layering: the library (everything but ``dmax_jax/apps``) is quiet and knows no application."""

import ast
import pathlib

import pytest

from conftest import REPO

PACKAGE = REPO / "dmax_jax"
FORBIDDEN = ("argparse", "absl", "tqdm", "dmax_jax.apps")  # flags, progress bars, the applications


def library_modules():
  return sorted(p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts)


def imports(tree: ast.AST) -> set[str]:
  """Every module an ``import`` / ``from ... import`` statement names, at any depth (function-level too)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _forbidden(name: str) -> bool:
  return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_module_imports_no_cli_and_no_application(path):
  tree = ast.parse(path.read_text(), str(path))
  bad = sorted(n for n in imports(tree) if _forbidden(n))
  assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_module_prints_nothing(path):
  tree = ast.parse(path.read_text(), str(path))
  prints = [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
  streams = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and n.attr in ("stdout", "stderr")
             and isinstance(n.value, ast.Name) and n.value.id == "sys"]
  assert not prints and not streams, f"{path.relative_to(REPO)}: print at {prints}, sys.stdout/stderr at {streams}"


def test_the_check_sees_a_violation(tmp_path):
  tree = ast.parse("def f():\n  from dmax_jax.apps import cli\n  import tqdm.auto\n")
  assert sorted(n for n in imports(tree) if _forbidden(n)) == ["dmax_jax.apps", "dmax_jax.apps.cli", "tqdm.auto"]


def test_library_functions_fit_on_a_screen():
  """No library function is longer than 50 lines (docstring included)."""
  long = []
  for path in library_modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
  assert not long, "\n".join(long)


def test_readme_layout_table_names_every_module():
  readme = (REPO / "README.md").read_text()
  section = readme[readme.index("## Layout"):]
  section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
  missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if p.name != "__init__.py" and f"`{p.name}`" not in section and f"/{p.name}`" not in section]
  folders = [str(p.relative_to(REPO)) for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]  # noqa
  missing += [f for f in folders if f"`{f}/`" not in section]
  assert not missing, f"README's Layout table does not name {missing}"
