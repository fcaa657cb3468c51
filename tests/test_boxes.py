"""Heat map -> boxes: normalisation, thresholding, components, modes, settings from config."""

import inspect

import ml_collections
import numpy as np
import pytest

from cxr_jax.explain import boxes, localization
from cxr_jax.explain.boxes import BoxSettings, heatmap_to_boxes


def _indicator(shape, box):
  """1 inside box (x, y, w, h) in pixels, 0 elsewhere."""
  x, y, w, h = box
  heat = np.zeros(shape)
  heat[y:y + h, x:x + w] = 1.0
  return heat


def _two_blobs() -> np.ndarray:
  heat = np.zeros((20, 30))
  heat[2:5, 3:6] = 1.0  # small blob: 3 x 3 = 9 px, holds the peak
  heat[3, 4] = 2.0
  heat[10:16, 12:20] = 1.5  # large blob: 6 rows x 8 cols = 48 px
  return heat


def test_no_ground_truth_parameter():
  assert tuple(inspect.signature(heatmap_to_boxes).parameters) == ('heat', 'settings')


def test_indicator_of_a_box_gives_that_box():
  gt = (7, 4, 10, 6)
  [pred] = heatmap_to_boxes(_indicator((24, 32), gt), BoxSettings())
  assert pred == (7.0, 4.0, 10.0, 6.0)
  assert localization.iou(gt, pred) == 1.0 and localization.iobb(gt, pred) == 1.0
  assert localization.best_overlap(gt, [pred]) == (1.0, 1.0)


def test_single_pixel_and_full_map():
  heat = np.zeros((5, 6))
  heat[2, 3] = 1.0
  assert heatmap_to_boxes(heat) == [(3.0, 2.0, 1.0, 1.0)]
  # Threshold 0: every pixel passes -> the whole map.
  assert heatmap_to_boxes(heat, BoxSettings(threshold=0.0)) == [(0.0, 0.0, 6.0, 5.0)]


def test_modes_largest_all_peak():
  heat = _two_blobs()
  large, small = (12.0, 10.0, 8.0, 6.0), (3.0, 2.0, 3.0, 3.0)
  # minmax over [0, 2]: the large blob sits at 0.75, the small one at 0.5 (peak 1.0).
  assert heatmap_to_boxes(heat, BoxSettings(mode='largest')) == [large]
  assert heatmap_to_boxes(heat, BoxSettings(mode='all')) == [large, small]  # by area
  assert heatmap_to_boxes(heat, BoxSettings(mode='peak')) == [small]
  # A higher threshold keeps only the peak pixel.
  assert heatmap_to_boxes(heat, BoxSettings(mode='all', threshold=0.8)) == [(4.0, 3.0, 1.0, 1.0)]


def test_min_area():
  heat = _two_blobs()  # 600 px: blobs of 48 px (0.08) and 9 px (0.015)
  assert heatmap_to_boxes(heat, BoxSettings(mode='all', min_area=0.01)) == [
      (12.0, 10.0, 8.0, 6.0), (3.0, 2.0, 3.0, 3.0)]
  assert heatmap_to_boxes(heat, BoxSettings(mode='all', min_area=0.015)) == [
      (12.0, 10.0, 8.0, 6.0), (3.0, 2.0, 3.0, 3.0)]  # 9 px >= 0.015 * 600 = 9: kept
  assert heatmap_to_boxes(heat, BoxSettings(mode='all', min_area=0.02)) == [
      (12.0, 10.0, 8.0, 6.0)]
  # A floor under 'peak' and 'largest' too.
  assert heatmap_to_boxes(heat, BoxSettings(mode='peak', min_area=0.02)) == []
  assert heatmap_to_boxes(heat, BoxSettings(mode='largest', min_area=0.1)) == []


def test_connectivity_on_a_diagonal():
  heat = np.eye(4)
  assert heatmap_to_boxes(heat, BoxSettings(connectivity=8)) == [(0.0, 0.0, 4.0, 4.0)]
  four = heatmap_to_boxes(heat, BoxSettings(connectivity=4, mode='all'))
  assert four == [(float(i), float(i), 1.0, 1.0) for i in range(4)]  # equal areas: by position
  assert heatmap_to_boxes(heat, BoxSettings(connectivity=4)) == [(0.0, 0.0, 1.0, 1.0)]


def test_threshold_edges():
  heat = np.array([[0.0, 0.5, 1.0, 0.49]])
  # >= threshold: the pixel exactly at 0.5 is foreground, 0.49 is not.
  assert heatmap_to_boxes(heat, BoxSettings(threshold=0.5)) == [(1.0, 0.0, 2.0, 1.0)]
  assert heatmap_to_boxes(heat, BoxSettings(threshold=1.0)) == [(2.0, 0.0, 1.0, 1.0)]
  # Raw values with normalize='none': nothing reaches 1.5.
  assert heatmap_to_boxes(heat, BoxSettings(threshold=1.5, normalize='none')) == []
  # 'peak' with nothing over the threshold at the peak -> nothing.
  assert heatmap_to_boxes(heat, BoxSettings(threshold=1.5, normalize='none', mode='peak')) == []


def test_constant_and_empty_maps_give_no_box():
  for how in ('minmax', 'max', 'none'):
    for value in (0.0, 0.7, -2.0):
      settings = BoxSettings(normalize=how, threshold=0.0)
      assert heatmap_to_boxes(np.full((6, 7), value), settings) == []


def test_normalize_heatmap():
  heat = np.array([[-1.0, 0.0], [1.0, 3.0]])
  np.testing.assert_allclose(boxes.normalize_heatmap(heat, 'minmax'), [[0, 0.25], [0.5, 1]])
  np.testing.assert_allclose(boxes.normalize_heatmap(heat, 'max'), [[0, 0], [1 / 3, 1]])
  np.testing.assert_array_equal(boxes.normalize_heatmap(heat, 'none'), heat)
  assert boxes.normalize_heatmap(heat, 'minmax').dtype == np.float64
  np.testing.assert_array_equal(boxes.normalize_heatmap(np.full((2, 3), 5.0)), np.zeros((2, 3)))
  np.testing.assert_array_equal(boxes.normalize_heatmap(-np.ones((2, 2)), 'max'), np.zeros((2, 2)))
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match='NaN or inf'):
      heatmap_to_boxes(np.array([[0.0, bad]]))
  with pytest.raises(ValueError, match=r'\[H, W\]'):
    boxes.normalize_heatmap(np.zeros((2, 2, 1)))
  with pytest.raises(ValueError, match='valid'):
    boxes.normalize_heatmap(heat, 'z')


def test_max_normalisation_keeps_zero_meaning_no_evidence():
  # Signed map (e.g. PDA): negative evidence is clipped, the positive blob is found.
  heat = np.full((6, 6), -3.0)
  heat[1:3, 2:5] = 4.0
  heat[4, 4] = 1.0  # 1/4 = 0.25 of the max: below 0.5
  assert heatmap_to_boxes(heat, BoxSettings(normalize='max', mode='all')) == [
      (2.0, 1.0, 3.0, 2.0)]


def test_deterministic_order_ties_by_position():
  heat = np.zeros((10, 10))
  heat[6:8, 1:3] = 1.0  # 4 px, lower
  heat[1:3, 7:9] = 1.0  # 4 px, upper right
  heat[1:3, 1:3] = 1.0  # 4 px, upper left
  assert heatmap_to_boxes(heat, BoxSettings(mode='all')) == [
      (1.0, 1.0, 2.0, 2.0), (7.0, 1.0, 2.0, 2.0), (1.0, 6.0, 2.0, 2.0)]


def test_scale_boxes():
  assert boxes.scale_boxes([(1, 2, 3, 4)], 32.0, 16.0) == [(32.0, 32.0, 96.0, 64.0)]
  # A 7 x 7 feature-map box scaled to a 224 x 224 image covers the same cells' blocks.
  [b] = heatmap_to_boxes(_indicator((7, 7), (2, 3, 2, 1)))
  assert boxes.scale_boxes([b], 224 / 7, 224 / 7) == [(64.0, 96.0, 64.0, 32.0)]


def test_settings_from_config_and_validation():
  assert BoxSettings.from_config(None) == BoxSettings()
  s = BoxSettings.from_config({'threshold': 1, 'mode': 'all', 'connectivity': 4})
  assert s.threshold == 1.0 and isinstance(s.threshold, float) and s.mode == 'all'
  assert BoxSettings.from_config(s.to_dict()) == s
  assert s.to_dict() == {'threshold': 1.0, 'normalize': 'minmax', 'mode': 'all',
                         'min_area': 0.0, 'connectivity': 4,
                         'thresholds': (60 / 255, 180 / 255)}
  assert BoxSettings.from_config(ml_collections.ConfigDict({'mode': 'peak'})).mode == 'peak'
  cases = [
      ({'thresh': 0.5}, r'config\.localize\.boxes\.thresh: unknown key; valid keys: threshold'),
      ({'mode': 'biggest'}, r"config\.localize\.boxes\.mode='biggest'; valid: 'largest', 'all'"),
      ({'normalize': 'z'}, r"config\.localize\.boxes\.normalize='z'; valid: 'minmax'"),
      ({'connectivity': 6}, r'config\.localize\.boxes\.connectivity=6; valid: 4, 8'),
      ({'connectivity': True}, r'config\.localize\.boxes\.connectivity'),
      ({'threshold': 1.5}, r'config\.localize\.boxes\.threshold=1\.5: must be in \[0, 1\]'),
      ({'threshold': 'high'}, r'config\.localize\.boxes\.threshold.*number'),
      ({'threshold': float('nan')}, r'config\.localize\.boxes\.threshold.*finite'),
      ({'min_area': -0.1}, r'config\.localize\.boxes\.min_area'),
  ]
  for cfg, match in cases:
    with pytest.raises(ValueError, match=match):
      BoxSettings.from_config(cfg)
  assert BoxSettings.from_config({'threshold': 1.5, 'normalize': 'none'}).threshold == 1.5
  with pytest.raises(ValueError, match=r'BoxSettings\.mode'):
    BoxSettings(mode='x')


def _wang_map() -> np.ndarray:
  """A map in [0, 255] (Wang et al.'s scale): a wide halo at 100 around a core at 200, and a
  separate blob at 100 that only the low threshold (60) finds."""
  heat = np.zeros((20, 30))
  heat[2:12, 2:14] = 100.0  # halo: rows 2..11, cols 2..13
  heat[5:8, 6:9] = 200.0  # core: rows 5..7, cols 6..8
  heat[15:17, 20:23] = 100.0  # second blob: 2 x 3 = 6 px
  heat[0, 29] = 255.0  # the maximum, so minmax maps 60 and 180 of 255 to 60/255, 180/255
  return heat


def test_multi_threshold_wang_boxes():
  heat = _wang_map()
  settings = BoxSettings(mode='multi_threshold')
  assert settings.thresholds == pytest.approx((60 / 255, 180 / 255), rel=1e-15)
  halo, blob, peak = (2.0, 2.0, 12.0, 10.0), (20.0, 15.0, 3.0, 2.0), (29.0, 0.0, 1.0, 1.0)
  core = (6.0, 5.0, 3.0, 3.0)
  # Threshold 60/255: halo (120 px), blob (6), peak pixel (1); then 180/255: core (9), peak.
  # The peak pixel's box repeats at 180/255 and is kept once, at its first place.
  assert heatmap_to_boxes(heat, settings) == [halo, blob, peak, core]
  # Order by threshold from low to high, whatever the configured order.
  assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold',
                                            thresholds=(180 / 255, 60 / 255))) == [
      halo, blob, peak, core]
  # min_area applies to every threshold's components: 6 / 600 = 0.01.
  assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold', min_area=0.01)) == [
      halo, blob, core]
  assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold', min_area=0.011)) == [
      halo, core]
  # One threshold: mode 'all' at that threshold; 'threshold' itself is not used.
  for t in (60 / 255, 180 / 255):
    assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold', thresholds=[t],
                                              threshold=0.99)) == heatmap_to_boxes(
        heat, BoxSettings(mode='all', threshold=t))
  # Raw values: Wang et al.'s thresholds on a map already in [0, 255].
  raw = BoxSettings(mode='multi_threshold', normalize='none', thresholds=(60, 180))
  assert heatmap_to_boxes(heat, raw) == [halo, blob, peak, core]
  assert heatmap_to_boxes(np.full((4, 4), 0.3), BoxSettings(mode='multi_threshold')) == []


def test_multi_threshold_drops_exact_duplicates():
  # A plateau: both thresholds give the same single component -> one box.
  heat = _indicator((8, 8), (1, 2, 3, 4))
  assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold')) == [(1.0, 2.0, 3.0, 4.0)]
  assert heatmap_to_boxes(heat, BoxSettings(mode='multi_threshold',
                                            thresholds=(0.2, 0.2, 0.9))) == [(1.0, 2.0, 3.0, 4.0)]


def test_thresholds_setting_from_config_and_validation():
  s = BoxSettings.from_config({'mode': 'multi_threshold', 'thresholds': [0.25, 1]})
  assert s.thresholds == (0.25, 1.0) and all(isinstance(t, float) for t in s.thresholds)
  assert hash(s) == hash(BoxSettings(mode='multi_threshold', thresholds=(0.25, 1.0)))
  assert BoxSettings.from_config(s.to_dict()) == s
  assert BoxSettings(thresholds=[0.1]).thresholds == (0.1,)  # a list, made hashable
  hash(BoxSettings(thresholds=[0.1]))
  # config_lib's base config may have no 'thresholds': the default.
  base = ml_collections.ConfigDict({'threshold': 0.5, 'normalize': 'minmax', 'mode': 'largest',
                                    'min_area': 0.0, 'connectivity': 8})
  assert BoxSettings.from_config(base) == BoxSettings()
  base.thresholds = (0.2, 0.6)
  assert BoxSettings.from_config(base).thresholds == (0.2, 0.6)
  base.thresholds = [0.3]
  assert BoxSettings.from_config(base).thresholds == (0.3,)
  cases = [
      ({'thresholds': ()}, r'config\.localize\.boxes\.thresholds=\(\): must be a non-empty'),
      ({'thresholds': 0.5}, r'config\.localize\.boxes\.thresholds=0\.5: must be a non-empty'),
      ({'thresholds': '0.5'}, r'config\.localize\.boxes\.thresholds'),
      ({'thresholds': (0.2, 'x')}, r"thresholds=\(0\.2, 'x'\): 'x' is not a number"),
      ({'thresholds': (0.2, True)}, r'True is not a number'),
      ({'thresholds': (float('inf'),)}, r'inf is not finite'),
      ({'thresholds': (60, 180)}, r'60 must be in \[0, 1\].*\(60/255, 180/255\)'),
      ({'thresholds': (-0.1,)}, r'-0\.1 must be in \[0, 1\]'),
  ]
  for cfg, match in cases:
    with pytest.raises(ValueError, match=match):
      BoxSettings.from_config(cfg)
  with pytest.raises(ValueError, match=r'BoxSettings\.thresholds'):
    BoxSettings(thresholds=(2.0,))
  assert BoxSettings(thresholds=(60, 180), normalize='none').thresholds == (60.0, 180.0)
