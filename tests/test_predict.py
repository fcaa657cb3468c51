"""`python -m cxr_jax.predict` end to end on a tiny trained run, plus its building blocks."""

import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from cxr_jax import imageio, inference, layout, predict


@pytest.fixture(scope='module')
def run_dir(tiny_run_dir) -> str:
  return tiny_run_dir


@pytest.fixture(scope='module')
def predictor(run_dir) -> inference.Predictor:
  return inference.load_predictor(run_dir)


@pytest.fixture
def shared_data_or_none():
  """../shared/data where present; the parts of a test that need it are skipped otherwise."""
  return SHARED_DATA if SHARED_DATA.is_dir() else None


def _images(folder, with_bad: bool = True) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (80, 70), dtype=np.uint8)).save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 65536, (90, 90), dtype=np.uint16)).save(folder / 'b16.png')
  (folder / 'sub').mkdir(exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
      folder / 'sub' / 'c.jpg')
  (folder / 'notes.txt').write_text('not an image, not scanned')
  names = ['a.png', 'b16.png', 'sub/c.jpg']
  if with_bad:
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    names.append('broken.png')
  return names


def _cli(argv: list[str]) -> int:
  return predict.main(['predict', *argv])


def test_cli_folder_with_a_bad_file(run_dir, tmp_path, capsys, shared_data_or_none):
  folder = tmp_path / 'in'
  names = _images(folder)
  if shared_data_or_none is not None:  # the real DICOM and two NIH box images
    shutil.copy(shared_data_or_none / 'dicom' / 'RG1_UNCR.dcm', folder)
    for name in ('00000072_000.png', '00000032_037.png'):
      shutil.copy(shared_data_or_none / 'nih_bbox' / 'images' / name, folder)
    names += ['RG1_UNCR.dcm', '00000072_000.png', '00000032_037.png']
  assert _cli([f'--workdir={run_dir}', '--explain=none', str(folder)]) == 1
  err = capsys.readouterr().err
  assert 'broken.png' in err and 'FAILED' in err
  out = pathlib.Path(layout.Run(run_dir).predictions_dir)
  info = layout.Run(run_dir).stage('train_classifier').read_model_info()
  for name in names:
    if name == 'broken.png':
      assert not (out / f'{name}.json').exists()
      continue
    record = json.loads((out / f'{name}.json').read_text())
    assert sorted(record['probabilities']) == sorted(info['class_names'])
    probs = record['probabilities']
    assert all(0.0 < p < 1.0 for p in probs.values())
    assert set(record['findings']) == {c for c, p in probs.items() if p > info['threshold']}
    assert record['stage'] == 'train_classifier' and record['overlays'] == []
    assert record['threshold_source'] == 'scalar'
    assert record['image'].endswith(name)
  if shared_data_or_none is not None:
    dicom = json.loads((out / 'RG1_UNCR.dcm.json').read_text())['image_meta']
    assert dicom['photometric_interpretation'] == 'MONOCHROME1'
  assert (out / 'sub' / 'c.jpg.json').exists()  # sub-folders mirrored
  assert not list(out.rglob('*.png'))  # --explain=none: JSON only


def test_cli_usage_errors(run_dir, tmp_path, capsys):
  _images(tmp_path / 'in', with_bad=False)
  assert _cli([f'--workdir={run_dir}']) == 2  # no image argument
  assert _cli([f'--workdir={tmp_path / "nope"}', str(tmp_path / 'in')]) == 2
  assert 'no such folder' in capsys.readouterr().err
  (tmp_path / 'empty').mkdir()
  assert _cli([f'--workdir={run_dir}', str(tmp_path / 'empty')]) == 2
  assert _cli([f'--workdir={run_dir}', '--stage=train_attention', str(tmp_path / 'in')]) == 2
  assert "['train_classifier']" in capsys.readouterr().err


def test_single_file_pda_with_boxes(run_dir, predictor, tmp_path, monkeypatch):
  monkeypatch.setattr(inference, 'load_predictor', lambda workdir, stage=None: predictor)
  names = _images(tmp_path / 'ref', with_bad=False)
  image = tmp_path / 'ref' / names[0]
  boxes = tmp_path / 'boxes.csv'
  boxes.write_text('image,finding_label,x,y,w,h\na.png,Infiltrate,256,128,512,256\n')
  out = tmp_path / 'out'
  code = _cli([f'--workdir={run_dir}', f'--output={out}', '--explain=pda',
               f'--pda_reference={tmp_path / "ref"}', f'--boxes={boxes}',
               '--classes=Infiltration,Mass', str(image)])
  assert code == 0
  record = json.loads((out / 'a.png.json').read_text())
  assert record['overlays'] == [str(out / 'a.png.pda.png')]
  assert Image.open(out / 'a.png.pda.png').format == 'PNG'


def test_pda_heatmaps_shape_and_box_scaling(predictor, tmp_path):
  _images(tmp_path / 'ref', with_bad=False)
  settings = inference.PDASettings(num_samples=3, num_reference=4)
  images = [predictor.preprocess(imageio.read_image(p)[0])
            for p in predict.list_images(tmp_path / 'ref')]
  ref = inference.reference_maps(predictor, settings, images)
  assert ref.shape[0] == 3 and ref.ndim == 4
  sampler = inference.fit_pda_sampler(settings, ref)
  x = predictor.preprocess(np.full((64, 64), 0.5, np.float32))
  feats = predictor.feature_maps(predictor.run(x)[1])[0]
  rel = inference.pda_heatmaps(predictor, x, sampler, settings, jax.random.key(0))
  assert rel.shape == (len(predictor.class_names), *feats.shape[:2])
  assert np.all(np.isfinite(rel))
  # Pixel level: windows over the 64 x 64 input, the whole network re-evaluated.
  pixels = inference.PDASettings(level='pixels', window=16, stride=16, num_samples=2,
                                 num_reference=4)
  ref = inference.reference_maps(predictor, pixels, images)
  assert ref.shape[1:] == x.shape
  rel = inference.pda_heatmaps(predictor, x, inference.fit_pda_sampler(pixels, ref), pixels,
                               jax.random.key(0))
  assert rel.shape == (len(predictor.class_names), 64, 64) and np.all(np.isfinite(rel))
  with pytest.raises(inference.RunError, match="config.explain.level='voxels'"):
    inference.PDASettings.from_config({'level': 'voxels'})
  boxes = predict.read_boxes(str(_write(tmp_path / 'b.csv',
                                        'image,finding_label,x,y,w,h\n'
                                        'dir/q.png,Infiltrate,512,0,256,1024\n')), 1024)
  assert boxes == {'q.png': [('Infiltration', (0.5, 0.0, 0.25, 1.0))]}


def _write(path, text):
  path.write_text(text)
  return path


def test_preprocess_matches_training_quantisation(predictor):
  from cxr_jax.data import ops
  h, w, _ = predictor.image_shape
  u8 = np.random.default_rng(1).integers(0, 256, (h, w), dtype=np.uint8)
  x = predictor.preprocess(u8.astype(np.float32) / 255.0)
  ref = ops.get_preprocess_fn(predictor.info.pp_eval)({'image': u8[..., None]})['image']
  np.testing.assert_allclose(x, np.asarray(ref), atol=1e-6)
  assert inference.default_stage(predictor.workdir) == 'train_classifier'
  assert predictor.thresholds.shape == (len(predictor.class_names),)
  assert predict.resolve_explain('auto', predictor) == 'none'
  with pytest.raises(inference.RunError, match='has no attention'):
    predict.resolve_explain('attention', predictor)


class _TinyAttentionModel(nn.Module):
  """Stands in for an attention model: sows 'attention' [B, T, h, w] and has `attend`."""
  num_steps: int = 2

  def attend(self, features):
    return {}

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    feats = nn.Conv(4, (3, 3), strides=(8, 8))(x)  # [B, h, w, 4]
    b, h, w, _ = feats.shape
    scores = nn.Dense(self.num_steps)(feats).reshape(b, h * w, self.num_steps)
    attention = jax.nn.softmax(scores, axis=1).transpose(0, 2, 1).reshape(b, -1, h, w)
    self.sow('intermediates', 'attention', attention)
    return nn.Dense(3)(feats.mean(axis=(1, 2)))


def test_attention_overlay(tmp_path):
  """--explain=attention: one panel per attention step, weights from the sown map."""
  model = _TinyAttentionModel()
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))

  info = inference.ModelInfo(
      class_names=('A', 'B', 'C'), image_shape=(32, 32, 3),
      pp_eval='decode|grayscale_to_rgb|normalize("minus_one_one")',
      model={'name': 'tiny_attention'})
  p = inference.Predictor(tmp_path, 'train_attention', model, variables, info,
                          inference.OperatingPoint(np.full(3, 0.5), 'scalar'))
  assert predict.resolve_explain('auto', p) == 'attention'
  Image.fromarray(np.full((50, 40), 90, np.uint8)).save(tmp_path / 'x.png')
  record = predict.predict_image(p, str(tmp_path / 'x.png'), str(tmp_path / 'o' / 'x.png'),
                                 explain='attention')
  maps = p.attention_maps(p.run(p.preprocess(np.zeros((50, 40), np.float32)))[1])[0]
  assert maps.shape == (2, 4, 4)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  assert record['overlays'] == [str(tmp_path / 'o' / 'x.png.attention.png')]
  assert Image.open(record['overlays'][0]).format == 'PNG'


@pytest.mark.parametrize('method', ['cam', 'grad_cam'])
def test_cli_cam_heat_maps_and_boxes_in_image_pixels(run_dir, tmp_path, method):
  folder = tmp_path / 'in'
  _images(folder, with_bad=False)
  out = tmp_path / 'out'
  assert _cli([f'--workdir={run_dir}', f'--output={out}', f'--explain={method}',
               '--classes=Cardiomegaly,Nodule', str(folder / 'a.png')]) == 0
  record = json.loads((out / 'a.png.json').read_text())
  assert set(record['boxes']) == {'Cardiomegaly', 'Nodule'}
  for found in record['boxes'].values():
    assert len(found) == 1  # mode 'largest'
    x, y, w, h = found[0]
    # a.png is 70 wide, 80 high: boxes come back in its pixels, not the model's 64 x 64.
    assert 0 <= x and 0 <= y and x + w <= 70 + 1e-6 and y + h <= 80 + 1e-6 and w > 0 and h > 0
  assert record['overlays'] == [str(out / f'a.png.{method}.png')]
  assert (out / f'a.png.{method}.png').stat().st_size > 1000


def test_pda_laplace_n_is_the_training_split_size(predictor):
  # The tiny phantom's train split: 24 images (config.explain.laplace_n = 0 by default).
  assert predictor.info.num_train_examples == 24
  assert inference.laplace_n(predictor, inference.PDASettings()) == 24
  assert inference.laplace_n(predictor, inference.PDASettings(laplace_n=500)) == 500
  imported = dataclasses.replace(predictor, info=dataclasses.replace(predictor.info,
                                                                     num_train_examples=None))
  assert inference.laplace_n(imported, inference.PDASettings()) == \
      inference.explanations.FALLBACK_LAPLACE_N
