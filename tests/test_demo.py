"""End to end: the README's demo command (shrunk to the tiny phantom) through every stage."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'cxr_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_demo_command_end_to_end(phantom_data_dir, tmp_path):
  workdir = tmp_path / 'demo'
  args = ['--config=configs/mobilenet_baseline.py:demo', f'--workdir={workdir}',
          '--config.data.name=cxr_phantom/tiny', f'--config.data.data_dir={phantom_data_dir}',
          '--config.data.drop_no_finding=False', '--config.batch_size=8',
          '--config.eval_batch_size=8', '--config.num_train_steps=4',
          '--config.eval_every_steps=2', '--config.log_every_steps=1',
          '--config.explain.num_images=1', '--config.explain.window=4',
          '--config.explain.stride=4', '--config.explain.num_reference=4',
          '--config.explain.num_samples=2']
  out = _run(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  # Progress and stage lines reach the terminal.
  assert 'step 4/4 loss' in out.stderr and 'steps/s, ETA' in out.stderr
  assert 'Stage report done' in out.stderr

  report = workdir / 'report'
  metrics = json.loads((report / 'metrics.json').read_text())
  model = metrics['models']['Without Attention']
  assert set(model) >= {'binary_accuracy', 'f1', 'mean_auroc', 'mae', 'auroc'}
  table = (report / 'report.md').read_text()
  assert '| Model | Binary Accuracy | F1-Score | Average AUC | MAE |' in table
  assert '| Without Attention |' in table
  assert (report / 'roc.png').stat().st_size > 1000
  # Fig. 2: PDA heat maps of the explain stage, copied into the report and linked from it.
  heatmaps = sorted((report / 'heatmaps').glob('*.pda.png'))
  assert len(heatmaps) == 1 and f'](heatmaps/{heatmaps[0].name})' in table
  # Explained images come from the test split (never trained on or selected with), and have
  # ground-truth boxes; the report says which split.
  index = json.loads((workdir / 'explain' / 'index.json').read_text())
  assert index['split'] == 'test'
  import tensorflow_datasets as tfds
  test_ids = {ex['image_id'].decode() for ex in tfds.as_numpy(tfds.builder(
      'cxr_phantom/tiny', data_dir=phantom_data_dir).as_dataset(split='test'))}
  assert len(index['images']) == 1 and index['images'][0]['image_id'] in test_ids
  assert "on 'test' split images (never trained on or selected with)" in table
  # PDA's Laplace correction uses the training split's size (24 tiny phantom images).
  info = json.loads((workdir / 'train_classifier' / 'model.json').read_text())
  assert info['num_train_examples'] == 24
  assert (workdir / 'train_classifier' / 'best').is_dir()
  assert (workdir / 'train_classifier' / 'logs').is_dir()
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == 8
  # The viewer's OOD gate of the model (stage fit_ood).
  from cxr_jax import layout
  gate = layout.Run(workdir).read_ood_gate('train_classifier')
  assert gate is not None and gate[1]['num_train'] == 24

  # The same command again: every stage is skipped.
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  # train_classifier, evaluate, fit_ood, explain, report
  assert again.stderr.count('already finished') == 5
