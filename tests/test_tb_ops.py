"""Paper 003's preprocessing ops (lung ROI, CLAHE, a label from findings) and the pipeline's
preprocessing-only features and splits by image id."""

import json

import numpy as np
import pytest
import tensorflow as tf
from skimage import exposure

from cxr_jax.data import ops, pipeline


def _image(h=48, w=40, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  base = 60 + 80 * np.sin(x / 5.0) ** 2 + 40 * (y / h)
  return np.clip(base + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)[..., None]


@pytest.mark.parametrize('clip,tiles', [(0.01, 8), (0.03, (4, 2))])
def test_clahe_equals_scikit_image_eagerly_and_in_tf_data(clip, tiles):
  img = _image()
  ty, tx = (tiles, tiles) if isinstance(tiles, int) else tiles
  want = np.round(exposure.equalize_adapthist(
      img[..., 0], kernel_size=(48 // ty, 40 // tx), clip_limit=clip) * 255).astype(np.uint8)
  fn = ops.get_preprocess_fn(f'clahe({clip}, {tiles!r})')
  np.testing.assert_array_equal(fn({'image': img})['image'].numpy()[..., 0], want)
  ds = tf.data.Dataset.from_tensors({'image': img}).map(fn)
  out = next(iter(ds))['image']
  assert out.shape == (48, 40, 1) and out.dtype == tf.uint8
  np.testing.assert_array_equal(out.numpy()[..., 0], want)
  assert np.std(want) > np.std(img)  # contrast went up
  with pytest.raises(ValueError, match='uint8'):
    fn({'image': img.astype(np.float32)})
  with pytest.raises(ValueError, match='clip_limit'):
    ops.get_preprocess_fn('clahe(0)')


def test_lung_roi_crop_mask_and_fallback_source():
  img = _image()
  lungs = np.zeros((48, 40, 1), np.uint8)
  lungs[10:30, 5:25] = 255
  lungs[12, 4] = 255  # the box spans every lung pixel
  f = {'image': img, 'lung_mask': lungs, 'image_id': 'x.png'}
  crop = ops.get_preprocess_fn('lung_roi("crop")')(f)
  np.testing.assert_array_equal(crop['image'].numpy(), img[10:30, 4:25])
  np.testing.assert_array_equal(crop['lung_mask'].numpy(), lungs[10:30, 4:25])
  wide = ops.get_preprocess_fn('lung_roi("crop", margin=0.1)')(f)['image']
  assert wide.shape == (30, 29, 1)  # 5 / 4 px wider on each side, clipped at the left
  masked = ops.get_preprocess_fn('lung_roi("mask")')(f)['image'].numpy()
  np.testing.assert_array_equal(masked, img * (lungs > 0))
  both = ops.get_preprocess_fn('lung_roi("crop_mask")|resize(16)')(f)['image']
  assert both.shape == (16, 16, 1)
  # The first non-empty source wins; 'masks' contributes its lung channels only.
  masks = np.zeros((48, 40, 3), np.uint8)
  masks[20:40, 10:20, 0] = 255
  masks[:, :, 2] = 255  # the heart channel is not lung
  g = {'image': img, 'lung_mask': np.zeros_like(lungs), 'masks': masks}
  out = ops.get_preprocess_fn('lung_roi(sources=("lung_mask", "masks"))')(g)['image']
  np.testing.assert_array_equal(out.numpy(), img[20:40, 10:20])


def test_lung_roi_refuses_images_without_masks_by_name():
  img = _image()
  f = {'image': img, 'lung_mask': np.zeros((48, 40, 1), np.uint8),
       'image_id': 'MCUCXR_0042_1.png'}
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)no lung mask for image.*MCUCXR_0042_1\.png.*lung_roi\(sources'):
    ops.get_preprocess_fn('lung_roi')(f)
  with pytest.raises(ValueError, match=r"mask feature\(s\) \['lung_mask'\].*config.data.pp_keys"):
    ops.get_preprocess_fn('lung_roi')({'image': img})
  with pytest.raises(ValueError, match='mode must be one of'):
    ops.get_preprocess_fn('lung_roi("box")')


def test_label_from_findings():
  labels = np.zeros(14, np.float32)
  fn = ops.get_preprocess_fn('label_from_findings')
  assert int(fn({'image': _image(), 'labels': labels})['label']) == 0
  labels[3] = 1
  assert int(fn({'image': _image(), 'labels': labels})['label']) == 1
  only = ops.get_preprocess_fn('label_from_findings(("Effusion",))')
  assert int(only({'image': _image(), 'labels': labels})['label']) == 0  # index 3 is not it
  assert 'label' not in fn({'image': _image()})  # an unlabelled image passes


def test_pipeline_split_ids_and_pp_keys(phantom_data_dir, tmp_path):
  ids_file = tmp_path / 'split_ids.json'
  src = pipeline.make_eval_iter({'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir,
                                 'target': 'labels', 'pp_eval': ''}, 'train',
                                global_batch_size=24)
  all_ids = [i for b in src for i, m in zip(b['image_id'], b['mask'], strict=True) if m]
  chosen = all_ids[3:8]
  ids_file.write_text(json.dumps({'source_split': 'train', 'splits': {'test': chosen}}))
  cfg = {'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir, 'target': 'label',
         'classes': ('normal', 'abnormal'), 'split_ids': str(ids_file),
         'pp_keys': ('labels', 'masks'), 'pp_eval': 'label_from_findings|lung_roi(sources='
         '"masks")|resize(32)'}
  data = pipeline.make_eval_iter(cfg, 'test', global_batch_size=4)
  assert data.num_examples == 5
  batches = list(data)
  got = [i for b in batches for i, m in zip(b['image_id'], b['mask'], strict=True) if m]
  assert got == chosen
  assert set(batches[0]) == {'image', 'label', 'mask', 'image_id'}  # pp_keys not batched
  assert batches[0]['image'].shape == (4, 32, 32, 1)
  with pytest.raises(ValueError, match="no split 'train'"):
    pipeline.make_eval_iter(cfg, 'train', global_batch_size=4)
