"""The package's layering: arrows point down, one module owns the workdir's file layout, and the
inference layer imports without TensorFlow."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'cxr_jax'
# The command lines and stages: nothing below them may import them.
TOP = ('cxr_jax.main', 'cxr_jax.predict', 'cxr_jax.report', 'cxr_jax.serve', 'cxr_jax.stages',
       'cxr_jax.segment')
# Libraries: models, attention, explanations, data, metrics, losses.
LIBRARY_DIRS = ('explain', 'attention', 'models', 'data')
LIBRARY_MODULES = ('metrics.py', 'losses.py', 'evaluate.py', 'reporting.py', 'layout.py',
                   'io_utils.py', 'checkpoints.py', 'hard_examples.py', 'optim.py', 'ood.py')
# (`python -m cxr_jax.report --out` writes its own comparison files into a folder of the user's,
# not into a workdir.)
WORKDIR_FILE_NAMES = ('config.json', 'model.json', 'DONE.json', 'thresholds.json',
                      'hard_examples.json', 'localization.json', 'records.jsonl', 'index.json',
                      'report.md', 'import.json', 'thresholds.csv', 'metrics_{', 'predictions_{')


def _modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(PACKAGE.parent).with_suffix('')
    name = '.'.join(rel.parts).removesuffix('.__init__')
    yield name, path, ast.parse(path.read_text())


def _imports(tree: ast.AST) -> set[str]:
  """Every cxr_jax module a file imports (at any depth: lazy imports count too)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f'{node.module}.{a.name}' for a in node.names}
  return {m for m in found if m.startswith('cxr_jax')}


def _is_under(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + '.') for p in prefixes)


def test_libraries_never_import_command_lines_stages_or_the_training_loop():
  bad = []
  for name, path, tree in _modules():
    rel = path.relative_to(PACKAGE)
    is_library = rel.parts[0] in LIBRARY_DIRS or (len(rel.parts) == 1 and
                                                  rel.name in LIBRARY_MODULES)
    banned = TOP + ('cxr_jax.train', 'cxr_jax.inference') if is_library else ()
    if name.startswith('cxr_jax.inference'):
      banned = TOP + ('cxr_jax.train',)
    bad += [f'{name} imports {m}' for m in _imports(tree) if _is_under(m, banned)]
  assert not bad, bad


def test_only_the_training_stages_import_the_training_loop():
  users = sorted(name for name, _, tree in _modules()
                 if any(_is_under(m, ('cxr_jax.train',)) and m != 'cxr_jax.train_step'
                        for m in _imports(tree)))
  assert users == ['cxr_jax.stages.training'], users


def test_explain_modules_import_neither_predict_nor_train():
  for name, _, tree in _modules():
    if name.startswith('cxr_jax.explain'):
      assert not {m for m in _imports(tree)
                  if _is_under(m, ('cxr_jax.predict', 'cxr_jax.train'))}, name


def _strings(tree: ast.AST):
  """String constants; an f-string is given with '{' standing for its fields."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      yield node.value
    elif isinstance(node, ast.JoinedStr):
      yield ''.join(v.value if isinstance(v, ast.Constant) else '{' for v in node.values)


@pytest.mark.parametrize('file_name', WORKDIR_FILE_NAMES)
def test_workdir_file_names_are_spelled_in_one_module(file_name):
  spelled = sorted(name for name, _, tree in _modules()
                   if any(file_name in s for s in _strings(tree)))
  assert spelled == ['cxr_jax.layout'], (file_name, spelled)


def test_inference_imports_without_tensorflow():
  code = ('import sys, cxr_jax.inference; '
          "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'; print('ok')")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]
