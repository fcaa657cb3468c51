"""Paper 004's segmentation as a task: masks through the ops, Dice losses and scores, the mask
cache and its join, the held-out validation split, geometry alignment, and one tiny run of the
U-Net config -> segment -> feature-weighted classifier, with the inference API and bad inputs."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from cxr_jax import evaluate, losses
from cxr_jax import segmentation_metrics as S
from cxr_jax.data import mask_cache, ops, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ ops
def _grid(h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3]: channel k holds r * w + c + 50 k, so every pixel is identifiable."""
  base = np.arange(h * w, dtype=np.uint8).reshape(h, w)
  return np.stack([base, base + 50, base + 100], -1).astype(np.uint8)


def _apply(pp: str, masks: np.ndarray, image: np.ndarray | None = None) -> dict:
  image = masks[..., :1] if image is None else image
  out = ops.get_preprocess_fn(pp)({'image': image, 'masks': masks})
  return {k: np.asarray(v) for k, v in out.items()}


def test_masks_follow_every_geometric_op_hand_checked():
  m = _grid(4, 4)
  # resize, nearest (half-pixel centres): 4 -> 2 samples rows/cols 1 and 3; 2 -> 4 repeats.
  np.testing.assert_array_equal(_apply('resize(2)', m)['masks'][..., 0], [[5, 7], [13, 15]])
  small = np.array([[0, 1], [2, 3]], np.uint8)[..., None].repeat(3, -1)
  np.testing.assert_array_equal(_apply('resize(4)', small)['masks'][..., 2],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  # centre crop: offset floor((4 - 2) / 2) = 1.
  np.testing.assert_array_equal(_apply('center_crop(2)', m)['masks'][..., 1],
                                [[55, 56], [59, 60]])
  # translate by (dy, dx) = (1, -1): content moves down and left, zero fill.
  out = ops.translate({'image': m[..., :1], 'masks': m}, tf.constant(1), tf.constant(-1), 1)
  np.testing.assert_array_equal(np.asarray(out['masks'])[..., 0],
                                [[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]])
  # flip: columns reversed, channels (anatomical sides) kept.
  flipped = np.asarray(ops.flip({'image': m[..., :1], 'masks': m})['masks'])
  np.testing.assert_array_equal(flipped, m[:, ::-1])
  # a quarter turn counter-clockwise (as displayed) is np.rot90, nearest keeps values exact.
  turned = np.asarray(ops.rotate_by({'image': m[..., :1].astype(np.float32), 'masks': m},
                                    tf.constant(math.pi / 2))['masks'])
  np.testing.assert_array_equal(turned, np.rot90(m, 1))
  # A chain: 4 -> 8 repeats each pixel twice, the centre 6 starts at 1; normalize (photometric)
  # leaves the masks as they were.
  out = _apply('resize(8)|center_crop(6)|normalize("zero_one")', m, m[..., :1])
  idx = np.array([0, 1, 1, 2, 2, 3])
  np.testing.assert_array_equal(out['masks'], m[idx][:, idx])
  assert out['masks'].dtype == np.uint8 and out['image'].dtype == np.float32


# ------------------------------------------------------------------------------ losses, scores
def test_soft_dice_and_dice_bce_per_image():
  masks = np.zeros((2, 4, 4, 3), np.float32)
  masks[:, :2] = 1.0
  big = 30.0
  perfect = jnp.where(masks > 0, big, -big)
  assert losses.LOSSES.get('soft_dice') is losses.soft_dice
  loss = losses.soft_dice(perfect, masks)
  assert loss.shape == (2,) and float(loss.max()) < 1e-6
  assert float(losses.soft_dice(-perfect, masks).min()) > 0.9
  # Half-probability everywhere: Dice = (2 * 8 * .5 + 1) / (8 + 16 * .5 + 1) per channel.
  half = losses.soft_dice(jnp.zeros_like(perfect), masks)
  np.testing.assert_allclose(half, 1 - 9 / 17, rtol=1e-6)
  np.testing.assert_allclose(losses.dice_bce(jnp.zeros_like(perfect), masks),
                             1 - 9 / 17 + math.log(2), rtol=1e-6)


def test_dice_jaccard_unions_and_summary_hand_checked():
  names = S.STRUCTURES
  truth = np.zeros((2, 4, 4, 3), bool)
  pred = np.zeros((2, 4, 4, 3), bool)
  truth[0, :2, :2, 0] = True          # left lung: 4 px
  pred[0, :2, :1, 0] = True           # 2 px inside: Dice 2*2/6, Jaccard 2/4
  truth[0, 2:, 2:, 2] = pred[0, 2:, 2:, 2] = True  # heart perfect
  # image 1: everything empty -> 1 (nothing to find, nothing found)
  d, j = S.dice_jaccard(S.with_unions(pred, names), S.with_unions(truth, names))
  assert S.scored_structures(names) == (*names, 'lungs', 'global')
  np.testing.assert_allclose(d[0], [4 / 6, 1.0, 1.0, 4 / 6, 2 * 6 / 14])
  np.testing.assert_allclose(j[0], [0.5, 1.0, 1.0, 0.5, 6 / 8])
  np.testing.assert_allclose(d[1], 1.0)
  m = S.summarize(d, j, np.array([0.1, 0.3]), names, 0.5)
  assert m['dice']['left_lung'] == pytest.approx((4 / 6 + 1) / 2)
  assert m['dice_sd']['left_lung'] == pytest.approx(np.std([4 / 6, 1], ddof=1))
  assert m['dice_loss'] == pytest.approx(0.2)
  flat = S.flat_summary(m)
  assert {'dice_left_lung', 'dice_right_lung', 'dice_heart', 'dice_lungs'} <= set(flat)
  # The checkpoint criterion: smallest validation Dice loss.
  assert evaluate.select_metric(m, 'dice_loss') == (pytest.approx(0.2), False)
  assert evaluate.select_metric(m, 'dice/heart').higher_is_better
  with pytest.raises(ValueError, match='Unknown metric'):
    evaluate.select_metric(m, 'dice_score')


# ------------------------------------------------------------------------------ the mask cache
def _write_cache(directory, ids_by_split, size=(8, 8), shard_size=2):
  writer = mask_cache.MaskCacheWriter(directory, S.STRUCTURES, size, shard_size=shard_size,
                                      meta={'threshold': 0.5})
  rng = np.random.default_rng(0)
  truth = {}
  for split, ids in ids_by_split.items():
    masks = rng.random((len(ids), *size, 3)) > 0.5
    for k in writer.missing_shards(split, len(ids)):
      sl = slice(k * shard_size, (k + 1) * shard_size)
      writer.write_shard(split, k, len(ids), ids[sl], masks[sl])
    writer.finish_split(split, len(ids))
    truth.update(dict(zip(ids, masks, strict=True)))
  writer.finish()
  return truth


def test_mask_cache_round_trip_resume_and_errors(tmp_path):
  import tensorflow_datasets as tfds
  cache_dir = tmp_path / 'cache'
  with pytest.raises(mask_cache.MaskCacheError, match='segment'):
    mask_cache.MaskCache(cache_dir)
  ids = [f'im{i}' for i in range(5)]
  truth = _write_cache(cache_dir, {'train': ids[:3], 'test': ids[3:]})
  cache = mask_cache.MaskCache(cache_dir)
  assert cache.structures == S.STRUCTURES and cache.image_size == (8, 8)
  got = cache.lookup(['im4', 'im0'])
  assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
  np.testing.assert_array_equal(got > 0, np.stack([truth['im4'], truth['im0']]))
  with pytest.raises(KeyError, match="im9"):
    cache.lookup(['im9'])
  # TFDS reads it as a data set of its own.
  ds = tfds.builder_from_directory(str(cache_dir)).as_dataset(split='train')
  assert [ex['image_id'].decode() for ex in tfds.as_numpy(ds)] == ids[:3]
  # Resumable: a lost shard is the only one missing; a 2-channel cache cannot be a PNG.
  writer = mask_cache.MaskCacheWriter(cache_dir, S.STRUCTURES, (8, 8), shard_size=2, meta={})
  writer.shard_path('train', 1, 2).unlink()
  assert writer.missing_shards('train', 3) == [1]
  with pytest.raises(ValueError, match='1, 3 or 4'):
    mask_cache.MaskCacheWriter(cache_dir, ('a', 'b'), (8, 8), shard_size=2, meta={})
  with pytest.raises(ValueError, match='slices'):
    writer.shard_path('train[:50%]', 0, 1)


def _phantom_cfg(data_dir, **kw):
  return ml_collections.ConfigDict({
      'name': 'cxr_phantom/tiny', 'data_dir': data_dir, 'train_split': 'train',
      'target': 'labels', 'inputs': ('masks',), 'structures': S.STRUCTURES,
      'pp_eval': 'decode|resize(80)|center_crop(56)|grayscale_to_rgb|normalize("imagenet")',
      'shuffle_buffer': 100, **kw})


def _gt_cache(phantom_data_dir, directory, splits=('train', 'test')):
  """A mask cache holding the phantom's own ground-truth masks."""
  import tensorflow_datasets as tfds
  builder = tfds.builder('cxr_phantom/tiny', data_dir=phantom_data_dir)
  writer = mask_cache.MaskCacheWriter(directory, S.STRUCTURES, (64, 64), shard_size=16,
                                      meta={})
  for split in splits:
    exs = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    ids = [ex['image_id'].decode() for ex in exs]
    masks = np.stack([ex['masks'] for ex in exs]) > 0
    for k in range(writer.num_shards(len(ids))):
      writer.write_shard(split, k, len(ids), ids[k * 16:(k + 1) * 16], masks[k * 16:(k + 1) * 16])
    writer.finish_split(split, len(ids))
  writer.finish()


def test_cached_masks_line_up_with_the_classifier_input(phantom_data_dir, tmp_path):
  # The cache holds masks in the stored image's frame; the classifier's preprocessing (resize +
  # centre crop here) moves them with the image: the batch equals the data set's own masks
  # put through the same preprocessing, pixel for pixel.
  _gt_cache(phantom_data_dir, tmp_path / 'cache')
  cached = list(pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir, mask_cache=str(
      tmp_path / 'cache')), 'test', global_batch_size=8))
  own = list(pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir), 'test',
                                     global_batch_size=8))
  assert cached[0]['masks'].shape == (8, 56, 56, 3) and cached[0]['masks'].dtype == np.float32
  np.testing.assert_array_equal(cached[0]['masks'], own[0]['masks'])
  np.testing.assert_array_equal(cached[0]['image_id'], own[0]['image_id'])
  # A split the cache lacks is named with example ids; masks of another size are refused.
  with pytest.raises(mask_cache.MaskCacheError, match="split 'validation'.*phantom_"):
    pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir, mask_cache=str(tmp_path / 'cache')),
                            'validation', global_batch_size=8)
  _write_cache(tmp_path / 'small', {'test': ['x']}, size=(8, 8))
  with pytest.raises(ValueError, match=r'masks of size \[8, 8\].*images of \[64, 64\]'):
    pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir, mask_cache=str(tmp_path / 'small')),
                            'test', global_batch_size=8)
  with pytest.raises(ValueError, match='config.data.structures'):
    pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir, mask_cache=str(tmp_path / 'cache'),
                                         structures=('left_lung', 'right_lung', 'lungs')),
                            'test', global_batch_size=8)


def test_validation_held_out_of_the_train_split(phantom_data_dir):
  cfg = _phantom_cfg(phantom_data_dir, inputs=(), target='masks', validation_holdout=0.25,
                     pp_eval='decode')
  held = {i for b in pipeline.make_eval_iter(cfg, pipeline.HOLDOUT_SPLIT, global_batch_size=8)
          for i, m in zip(b['image_id'], b['mask'], strict=True) if m}
  train = pipeline.make_train_iter(cfg, global_batch_size=8, seed=0)
  kept = {i for b in pipeline.make_eval_iter(cfg, 'train', global_batch_size=8)
          for i, m in zip(b['image_id'], b['mask'], strict=True) if m}
  assert held and not held & kept and len(held | kept) == 24
  assert train.num_examples == len(kept)
  with pytest.raises(ValueError, match='validation_holdout'):
    pipeline.make_eval_iter(_phantom_cfg(phantom_data_dir, target='masks', inputs=()),
                            pipeline.HOLDOUT_SPLIT, global_batch_size=8)


# ------------------------------------------------------------------------------ end to end
def _load_config(rel: str, arg='demo'):
  from cxr_jax.config_lib import load_sibling
  return load_sibling(str(ROOT / rel), pathlib.Path(rel).name).get_config(arg)


def _tiny_unet(config, data_dir):
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = data_dir
  config.model.base_width = 4
  config.model.depth = 2
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 2
  config.eval_every_steps = config.checkpoint_every_steps = 2
  return config


def test_unet_run_segment_and_feature_weighted_classifier(phantom_data_dir, tmp_path):
  from cxr_jax import inference, stages
  from cxr_jax import segment as segment_cli

  # 1. The U-Net config (demo, tiny): train, Dice/Jaccard, report with the flat keys.
  unet_dir = tmp_path / 'unet'
  stages.run(_tiny_unet(_load_config('configs/lung_heart_unet.py'), phantom_data_dir), unet_dir)
  metrics = json.loads((unet_dir / 'report' / 'metrics.json').read_text())
  for s in ('left_lung', 'right_lung', 'heart', 'lungs'):
    assert 0.0 <= metrics[f'dice_{s}'] <= 1.0 and f'jaccard_{s}' in metrics
  assert metrics['num_examples'] == 8 and metrics['split'] == 'test'
  report = (unet_dir / 'report' / 'report.md').read_text()
  assert '| Structure | Dice (mean ± sd) |' in report and '](segmentation/' in report
  info = json.loads((unet_dir / 'train_segmenter' / 'model.json').read_text())
  assert info['task'] == 'segmentation' and info['class_names'] == list(S.STRUCTURES)

  # 2. The inference API the viewer uses: any size in, the same size out.
  seg = inference.load_segmenter(unet_dir)
  assert seg.structures == S.STRUCTURES
  probs = seg.segment(np.random.default_rng(0).random((2, 50, 70)))
  assert probs.shape == (2, 50, 70, 3) and 0.0 <= probs.min() <= probs.max() <= 1.0
  assert seg.global_mask(np.zeros((1, 32, 32))).shape == (1, 32, 32)
  with pytest.raises(inference.RunError, match='segmentation model.*not a classifier'):
    inference.load_predictor(unet_dir)

  # 3. The CLI caches masks keyed by image id, resumably; a bad run is a usage error.
  out = tmp_path / 'masks'
  args = [f'--workdir={unet_dir}', '--data=cxr_phantom/tiny', f'--data_dir={phantom_data_dir}',
          '--splits=test', f'--output={out}', '--batch_size=8', '--shard_size=3',
          '--no_progress']
  assert segment_cli.main(args) == 0
  cache = mask_cache.MaskCache(out)
  assert cache.splits == {'test': {'num_examples': 8, 'num_shards': 3}}
  some_id, first = next(cache.read('test'))
  np.testing.assert_array_equal(cache.lookup([some_id])[0], first)
  shard = out / 'cxr_jax_masks-test.tfrecord-00001-of-00003'
  before = {p.name: p.stat().st_mtime_ns for p in out.glob('*.tfrecord-*')}
  shard.unlink()
  assert segment_cli.main(args) == 0
  after = {p.name: p.stat().st_mtime_ns for p in out.glob('*.tfrecord-*')}
  assert {k for k in after if after[k] != before.get(k)} == {shard.name}
  np.testing.assert_array_equal(mask_cache.MaskCache(out).lookup([some_id])[0], first)
  assert segment_cli.main([*args[:1], '--data=no_such_set', *args[2:]]) == 2

  # 4. The feature-weighted classifier, masks from that run: a later stage without the segment
  # stage's masks fails naming it; then segment -> train -> evaluate -> report.
  config = _load_config('configs/lung_heart/msa_densenet_fw.py')
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = phantom_data_dir
  config.data.pp_train = config.data.pp_eval = 'decode|grayscale_to_rgb|normalize("imagenet")'
  config.stages = ('segment', 'train_classifier', 'evaluate', 'report')
  config.stage_overrides = ml_collections.ConfigDict()
  config.segment.source = str(unet_dir)
  config.segment.batch_size = 8
  config.model.block_config = (1, 1, 1, 1)
  config.model.growth_rate = 4
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 2
  config.eval_every_steps = config.checkpoint_every_steps = 2
  fw_dir = tmp_path / 'fw'
  with pytest.raises(mask_cache.MaskCacheError, match=r'fw/segment.*segment'):
    stages.run(config, fw_dir, only=['train_classifier'])
  stages.run(config, fw_dir)
  cache = mask_cache.MaskCache(fw_dir / 'segment')
  assert sorted(cache.splits) == ['test', 'train', 'validation']
  info = json.loads((fw_dir / 'train_classifier' / 'model.json').read_text())
  assert info['inputs'] == {'masks': [64, 64, 3]} and info['task'] == 'classification'
  assert 'mean_auroc' in json.loads((fw_dir / 'report' / 'metrics.json').read_text())['models'][
      'Ours']
  with pytest.raises(inference.RunError, match='a classifier'):
    inference.load_segmenter(fw_dir, 'train_classifier')
  with pytest.raises(inference.RunError, match='no trained segmentation model'):
    inference.load_segmenter(fw_dir)


def test_feature_weighting_model_needs_masks_of_its_input():
  from cxr_jax.models import build_model
  model = build_model(ml_collections.ConfigDict({
      'name': 'densenet121', 'growth_rate': 4, 'block_config': (1, 1, 1, 1),
      'num_init_features': 8, 'input_attention': 'multiscale', 'feature_weighting': True}),
      num_classes=2)
  x = jnp.ones((1, 64, 64, 3))
  with pytest.raises(ValueError, match=r'masks= of shape \(1, 64, 64, 3\).*got none'):
    model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'got \(1, 32, 32, 3\)'):
    model.init(jax.random.key(0), x, masks=jnp.ones((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r'got \(1, 64, 64, 2\)'):
    model.init(jax.random.key(0), x, masks=jnp.ones((1, 64, 64, 2)))


def test_unet_masks_give_paper_003_its_lung_roi(phantom_data_dir, tmp_path):
  # Paper 003's lung ROI for a data set without masks: the lungs come from a U-Net's mask
  # cache (`masks=unet`). The cache here holds one known rectangle per lung, so the crop and
  # the masking are checked exactly against the stored images.
  import tensorflow_datasets as tfds

  from cxr_jax import config_lib
  tb = config_lib.load_sibling(str(pathlib.Path(__file__).parents[1] / 'configs/tb/x.py'),
                               'custom_cnn.py')
  config = tb.get_config('roi=crop,masks=unet')
  assert 'sources=(\'masks\',)' in config.data.pp_eval and 'masks' in config.data.pp_keys
  assert "('lung_mask', 'masks')" in tb.get_config('masks=both').data.pp_train
  with pytest.raises(ValueError, match='masks must be one of'):
    tb.get_config('masks=atlas')

  builder = tfds.builder('cxr_phantom/tiny', data_dir=phantom_data_dir)
  exs = list(tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False)))[:8]
  ids = [ex['image_id'].decode() for ex in exs]
  rect = np.zeros((8, 64, 64, 3), bool)
  rect[:, 10:40, 6:28, 0] = True   # left lung
  rect[:, 12:44, 36:58, 1] = True  # right lung (its box reaches down to row 43)
  rect[:, 30:50, 20:44, 2] = True  # heart: not a lung, outside the ROI's box
  writer = mask_cache.MaskCacheWriter(tmp_path / 'unet', S.STRUCTURES, (64, 64), shard_size=8,
                                      meta={})
  writer.write_shard('test', 0, 8, ids, rect)
  writer.finish_split('test', 8)
  writer.finish()
  raw = np.stack([ex['image'] for ex in exs]).astype(np.float32)  # [8, 64, 64, 1]
  for mode, expected in [('crop', raw[:, 10:44, 6:58]),
                         ('mask', raw * (rect[..., 0] | rect[..., 1])[..., None])]:
    cfg = ml_collections.ConfigDict({
        'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir, 'target': 'label',
        'classes': ('normal', 'abnormal'), 'pp_keys': ('labels', 'masks', 'image_id'),
        'mask_cache': str(tmp_path / 'unet'), 'structures': S.STRUCTURES,
        'pp_eval': f'decode|label_from_findings|lung_roi("{mode}", sources=("masks",))'})
    batch = next(iter(pipeline.make_eval_iter(cfg, 'test', global_batch_size=8)))
    assert [i.decode() if isinstance(i, bytes) else str(i) for i in batch['image_id']] == ids
    np.testing.assert_array_equal(batch['image'], expected)
