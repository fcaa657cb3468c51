"""Average false positives (AFP, Wang et al. 2017 Table 3) of `localization_metrics`."""

import json

import numpy as np
import pytest

from cxr_jax import reporting
from cxr_jax.explain import localization as loc

T = (0.1, 0.3, 0.5, 0.7)
CLASSES = ('Mass', 'Nodule')
GT = (0.0, 0.0, 10.0, 10.0)
EXACT = (0.0, 0.0, 10.0, 10.0)  # IoU = IoBB = 1 with GT
HALF = (5.0, 0.0, 10.0, 10.0)  # with GT: IoU 50 / 150 = 1/3, IoBB 50 / 100 = 0.5
FAR = (20.0, 20.0, 5.0, 5.0)  # overlaps GT nowhere


def _rec(image_id, cls, gt, pred, predicted=True):
  return {'image_id': image_id, 'class': cls, 'gt': gt, 'pred': list(pred), 'prob': 0.9,
          'predicted': predicted}


def _afp(summary, key):
  return [summary[key][loc.threshold_key(t)] for t in T]


def test_false_positives_of_one_heat_map():
  fp = loc.false_positives([GT], [EXACT, HALF, FAR], T)
  assert fp.shape == (2, 4) and fp.dtype == np.int64
  # IoU: FAR is a false positive at every T; HALF (1/3) once T >= 1/3.
  np.testing.assert_array_equal(fp[0], [1, 1, 2, 2])
  # IoBB: HALF's 0.5 is not > 0.5, so it is a false positive at T = 0.5 already.
  np.testing.assert_array_equal(fp[1], [1, 1, 2, 2])
  np.testing.assert_array_equal(loc.false_positives([GT], [], T), np.zeros((2, 4)))
  # A zero-area box overlaps nothing.
  np.testing.assert_array_equal(loc.false_positives([GT], [(1.0, 1.0, 0.0, 3.0)], T),
                                np.ones((2, 4)))


def test_three_boxes_one_matching():
  m = loc.localization_metrics([_rec('a', 'Mass', GT, [EXACT, HALF, FAR])], CLASSES,
                               iou_thresholds=T)
  json.dumps(m, allow_nan=False)
  mass = m['per_class']['Mass']
  assert mass['num_groups'] == 1 and mass['num_pred_boxes'] == 3
  assert _afp(mass, 'afp_iou') == [1.0, 1.0, 2.0, 2.0]
  assert _afp(mass, 'afp_iobb') == [1.0, 1.0, 2.0, 2.0]
  assert mass['acc_iou'] == {'0.1': 1.0, '0.3': 1.0, '0.5': 1.0, '0.7': 1.0}  # unchanged
  assert m['pooled']['afp_iou'] == mass['afp_iou'] and m['mean']['afp_iou'] == mass['afp_iou']


def test_second_ground_truth_box_of_the_group_clears_its_match():
  # Two experts' boxes of one image and class share the predicted boxes: FAR now matches one.
  pred = [EXACT, HALF, FAR]
  m = loc.localization_metrics([_rec('a', 'Mass', GT, pred), _rec('a', 'Mass', FAR, pred)],
                               CLASSES, iou_thresholds=T)
  mass = m['per_class']['Mass']
  assert mass['num_boxes'] == 2 and mass['num_groups'] == 1 and mass['num_pred_boxes'] == 3
  assert _afp(mass, 'afp_iou') == [0.0, 0.0, 1.0, 1.0]
  assert _afp(mass, 'afp_iobb') == [0.0, 0.0, 1.0, 1.0]
  # Records read back from JSON (lists) are the same group.
  again = json.loads(json.dumps([_rec('a', 'Mass', GT, pred), _rec('a', 'Mass', FAR, pred)]))
  assert loc.localization_metrics(again, CLASSES, iou_thresholds=T) == m


def test_two_groups_of_one_image_and_the_class_means():
  records = [
      # Image a, Mass: one match, one box elsewhere (on a's nodule) -> 1 false positive.
      _rec('a', 'Mass', GT, [EXACT, FAR]),
      # Image a, Nodule: its only box lies on the mass, overlapping no nodule box -> 1.
      _rec('a', 'Nodule', FAR, [EXACT]),
      # Image b, Mass: one exact box -> 0.
      _rec('b', 'Mass', GT, [EXACT]),
  ]
  m = loc.localization_metrics(records, CLASSES, iou_thresholds=T)
  mass, nodule = m['per_class']['Mass'], m['per_class']['Nodule']
  assert (mass['num_groups'], mass['num_pred_boxes']) == (2, 3)
  assert (nodule['num_groups'], nodule['num_pred_boxes']) == (1, 1)
  for key in ('afp_iou', 'afp_iobb'):
    assert _afp(mass, key) == [0.5] * 4  # 1 false positive / 2 heat maps
    assert _afp(nodule, key) == [1.0] * 4
    assert _afp(m['mean'], key) == pytest.approx([0.75] * 4, rel=1e-12)
    # Pooled: per (image, class) group, 2 / 3 (not Wang's per image, which would be 2 / 2).
    assert _afp(m['pooled'], key) == pytest.approx([2 / 3] * 4, rel=1e-12)
  assert m['mean']['num_groups'] == m['pooled']['num_groups'] == 3
  assert m['mean']['num_pred_boxes'] == m['pooled']['num_pred_boxes'] == 4
  assert nodule['acc_iou']['0.1'] == 0.0 and mass['acc_iou']['0.7'] == 1.0


def test_only_box_overlaps_nothing_and_no_box():
  records = [_rec('c', 'Mass', GT, [(50.0, 50.0, 5.0, 5.0)]), _rec('d', 'Mass', GT, [])]
  mass = loc.localization_metrics(records, CLASSES, iou_thresholds=T)['per_class']['Mass']
  assert mass['num_pred_boxes'] == 1 and mass['num_groups'] == 2
  assert _afp(mass, 'afp_iou') == _afp(mass, 'afp_iobb') == [0.5] * 4
  assert mass['acc_iou']['0.1'] == 0.0 and mass['mean_iobb'] == 0.0


def test_require_prediction_drops_the_boxes_of_unclaimed_classes():
  records = [_rec('a', 'Mass', GT, [EXACT, FAR], predicted=False),
             _rec('b', 'Mass', GT, [HALF], predicted=True)]
  off = loc.localization_metrics(records, CLASSES, iou_thresholds=T)['per_class']['Mass']
  on = loc.localization_metrics(records, CLASSES, iou_thresholds=T,
                                require_prediction=True)['per_class']['Mass']
  # Off: a's FAR at every T, b's HALF (IoU 1/3, IoBB 0.5) from T = 0.5 -> over 2 heat maps.
  assert off['num_pred_boxes'] == 3
  assert _afp(off, 'afp_iou') == _afp(off, 'afp_iobb') == [0.5, 0.5, 1.0, 1.0]
  # On: a's boxes are not claimed, its heat map stays in the denominator.
  assert on['num_groups'] == 2 and on['num_pred_boxes'] == 1
  assert _afp(on, 'afp_iou') == _afp(on, 'afp_iobb') == [0.0, 0.0, 0.5, 0.5]
  assert on['acc_iou']['0.1'] == 0.5 and off['acc_iou']['0.1'] == 1.0


def test_inconsistent_groups_raise_and_records_without_image_id():
  with pytest.raises(ValueError, match=r"records 0 and 1 \('a', 'Mass'\).*'pred' differ"):
    loc.localization_metrics([_rec('a', 'Mass', GT, [EXACT]), _rec('a', 'Mass', FAR, [HALF])],
                             CLASSES)
  with pytest.raises(ValueError, match="'predicted' differ"):
    loc.localization_metrics([_rec('a', 'Mass', GT, [EXACT]),
                              _rec('a', 'Mass', FAR, [EXACT], predicted=False)],
                             CLASSES, require_prediction=True)
  # Without require_prediction 'predicted' is not read.
  loc.localization_metrics([_rec('a', 'Mass', GT, [EXACT]),
                            _rec('a', 'Mass', FAR, [EXACT], predicted=False)], CLASSES)
  # No image_id: each record is a heat map of its own.
  records = [{'class': 'Mass', 'gt': GT, 'pred': [FAR]}, {'class': 'Mass', 'gt': GT, 'pred': []}]
  mass = loc.localization_metrics(records, CLASSES, iou_thresholds=T)['per_class']['Mass']
  assert mass['num_groups'] == 2 and _afp(mass, 'afp_iou') == [0.5] * 4


def test_no_boxes_and_tables_of_results_without_afp():
  m = loc.localization_metrics([], CLASSES, iou_thresholds=T)
  assert m['mean']['num_groups'] == m['pooled']['num_groups'] == 0
  assert m['mean']['afp_iou']['0.3'] is None and m['pooled']['afp_iobb']['0.7'] is None
  # localization.json written before AFP existed: the tables leave AFP out.
  m = loc.localization_metrics([_rec('a', 'Mass', GT, [EXACT, FAR])], CLASSES)
  old = json.loads(json.dumps(m))
  for summary in (*old['per_class'].values(), old['mean'], old['pooled']):
    for key in ('num_groups', 'num_pred_boxes', 'afp_iou', 'afp_iobb'):
      del summary[key]
  text = reporting.localization_markdown({'old': old, 'new': m})
  assert '| 0.3 | old | 1.00 | 1.00 | n/a |' in text.splitlines()
  assert '|  | new | 1.00 | 1.00 | 1.000 |' in text.splitlines()
  only_old = reporting.localization_markdown({'old': old})
  assert '| T(IoU) | Model | Mas. | Mean |' in only_old.splitlines() and 'AFP' not in only_old
  assert 'old: 1 boxes.' in only_old
  csv_text = reporting.localization_csv({'old': old})
  assert 'afp' not in csv_text and 'num_groups' not in csv_text
