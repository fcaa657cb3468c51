"""Localisation metrics: IoU / IoBB, accuracy at T, class means, tables in the papers' layouts."""

import csv
import io
import json

import numpy as np
import pytest

from cxr_jax import reporting
from cxr_jax.explain import localization as loc

GT = (0.0, 0.0, 10.0, 10.0)


def _rec(cls, iou_width, predicted=True, image_id='img'):
  """A record whose predicted box (0, 0, w, 10) lies inside GT: IoU = w / 10, IoBB = 1."""
  pred = [] if iou_width is None else [(0.0, 0.0, iou_width, 10.0)]
  return {'image_id': image_id, 'class': cls, 'gt': GT, 'pred': pred, 'prob': 0.9,
          'predicted': predicted}


def _records():
  # One image per box: the boxes of one image and class would share their predicted boxes.
  return [
      _rec('Mass', 2.5, image_id='m1'), _rec('Mass', 5.5, image_id='m2'),
      _rec('Mass', 8.0, image_id='m3'),  # IoU 0.25, 0.55, 0.8
      _rec('Nodule', 1.0, image_id='n1'),  # IoU exactly 0.1 (10 / 100), IoBB 1
      _rec('Nodule', None, image_id='n2'),  # nothing predicted: IoU = IoBB = 0
  ]


CLASSES = ('Atelectasis', 'Mass', 'Nodule')


def test_iou_and_iobb_of_a_shifted_box():
  pred = (5.0, 0.0, 10.0, 10.0)
  # Overlap x in [5, 10), y in [0, 10): 5 * 10 = 50; union 100 + 100 - 50 = 150.
  assert loc.iou(GT, pred) == pytest.approx(50 / 150)
  assert loc.iobb(GT, pred) == pytest.approx(50 / 100)
  # Shifted diagonally by (2, 3): overlap 8 * 7 = 56, union 200 - 56 = 144.
  assert loc.iou(GT, (2.0, 3.0, 10.0, 10.0)) == pytest.approx(56 / 144)
  # A predicted box inside the GT: IoBB 1 however small; IoU its area ratio.
  assert loc.iobb(GT, (2.0, 2.0, 2.0, 2.0)) == 1.0
  assert loc.iou(GT, (2.0, 2.0, 2.0, 2.0)) == pytest.approx(4 / 100)
  assert loc.iou(GT, (20.0, 0.0, 5.0, 5.0)) == 0.0  # disjoint
  assert loc.iou(GT, (10.0, 0.0, 5.0, 5.0)) == 0.0  # touching edges only


def test_zero_area_boxes():
  empty = (3.0, 3.0, 0.0, 5.0)
  assert loc.iou(GT, empty) == 0.0 and loc.iobb(GT, empty) == 0.0
  assert loc.iou(empty, empty) == 0.0
  assert loc.iou((1.0, 1.0, -2.0, 3.0), GT) == 0.0  # negative size counts as empty
  np.testing.assert_array_equal(loc.pairwise_iou([empty], [empty, GT]), [[0.0, 0.0]])
  np.testing.assert_array_equal(loc.pairwise_iobb([GT], [empty]), [[0.0]])
  assert loc.pairwise_iou(np.zeros((0, 4)), [GT]).shape == (0, 1)
  assert loc.pairwise_iou([GT], np.zeros((0, 4))).shape == (1, 0)


def test_pairwise_matches_scalar_on_random_boxes():
  rng = np.random.default_rng(0)
  gts = np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(0, 30, (7, 2))], axis=1)
  preds = np.concatenate([rng.uniform(0, 50, (9, 2)), rng.uniform(0, 30, (9, 2))], axis=1)
  preds[0, 2] = 0.0  # a zero-area box among them
  preds[1] = gts[0]  # an identical box
  got_iou, got_iobb = loc.pairwise_iou(gts, preds), loc.pairwise_iobb(gts, preds)
  assert got_iou.shape == got_iobb.shape == (7, 9)
  want_iou = [[loc.iou(tuple(g), tuple(p)) for p in preds] for g in gts]
  want_iobb = [[loc.iobb(tuple(g), tuple(p)) for p in preds] for g in gts]
  np.testing.assert_allclose(got_iou, want_iou, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(got_iobb, want_iobb, rtol=1e-12, atol=1e-15)
  assert got_iou[0, 1] == 1.0 and (got_iou[:, 0] == 0).all()
  assert (got_iou > 0).any() and (got_iou <= got_iobb + 1e-12).all()  # IoU <= IoBB


def test_best_overlap():
  assert loc.best_overlap(GT, []) == (0.0, 0.0)
  # Each measure takes its own best box: IoU from the big one, IoBB from the small inner one.
  iou, iobb = loc.best_overlap(GT, [(5.0, 0.0, 10.0, 10.0), (1.0, 1.0, 1.0, 1.0)])
  assert iou == pytest.approx(1 / 3) and iobb == 1.0


def test_box_from_normalized():
  box = loc.box_from_normalized((0.25, 0.5, 0.75, 1.0), height=200, width=100)
  assert box == (50.0, 50.0, 50.0, 100.0)


def test_accuracy_per_class_and_class_mean():
  m = loc.localization_metrics(_records(), CLASSES, iou_thresholds=(0.1, 0.3, 0.5, 0.7))
  json.dumps(m, allow_nan=False)  # JSON-serialisable as it is
  assert m['class_names'] == ['Mass', 'Nodule']  # Atelectasis has no box
  assert m['iou_thresholds'] == [0.1, 0.3, 0.5, 0.7] and m['num_boxes'] == 5
  mass, nodule = m['per_class']['Mass'], m['per_class']['Nodule']
  assert mass['num_boxes'] == 3 and nodule['num_boxes'] == 2
  # Mass IoUs 0.25, 0.55, 0.8: > 0.3 and > 0.5 two of three, > 0.7 one of three.
  assert mass['acc_iou'] == pytest.approx({'0.1': 1.0, '0.3': 2 / 3, '0.5': 2 / 3, '0.7': 1 / 3})
  assert mass['mean_iou'] == pytest.approx((0.25 + 0.55 + 0.8) / 3)
  assert mass['mean_iobb'] == 1.0 and mass['acc_iobb']['0.7'] == 1.0
  # Nodule IoUs 0.1 (not > 0.1: strictly above) and 0; IoBBs 1 and 0.
  assert nodule['acc_iou'] == {'0.1': 0.0, '0.3': 0.0, '0.5': 0.0, '0.7': 0.0}
  assert nodule['mean_iou'] == pytest.approx(0.05)
  assert nodule['mean_iobb'] == 0.5 and nodule['acc_iobb']['0.7'] == 0.5
  # Mean: over the two classes (paper 002); pooled: over the five boxes (paper 004).
  mean, pooled = m['mean'], m['pooled']
  assert mean['num_boxes'] == pooled['num_boxes'] == 5
  assert mean['acc_iou']['0.3'] == pytest.approx((2 / 3 + 0) / 2)
  assert mean['acc_iou']['0.7'] == pytest.approx((1 / 3 + 0) / 2)
  assert mean['mean_iou'] == pytest.approx(((0.25 + 0.55 + 0.8) / 3 + 0.05) / 2)
  assert mean['acc_iobb']['0.5'] == pytest.approx((1.0 + 0.5) / 2)
  assert pooled['acc_iou']['0.3'] == pytest.approx(2 / 5)
  assert pooled['mean_iou'] == pytest.approx((0.25 + 0.55 + 0.8 + 0.1) / 5)


def test_default_thresholds_and_keys():
  m = loc.localization_metrics(_records(), CLASSES)
  assert list(m['per_class']['Mass']['acc_iou']) == ['0.1', '0.2', '0.3', '0.4', '0.5', '0.6',
                                                      '0.7']
  assert m['require_prediction'] is False


def test_require_prediction_counts_unpredicted_as_miss():
  records = _records()
  records[2] = _rec('Mass', 8.0, predicted=False, image_id='m3')  # the 0.8 box, not predicted
  off = loc.localization_metrics(records, CLASSES)
  on = loc.localization_metrics(records, CLASSES, require_prediction=True)
  assert off['per_class']['Mass']['acc_iou']['0.7'] == pytest.approx(1 / 3)  # boxes still count
  assert on['require_prediction'] is True
  mass = on['per_class']['Mass']
  assert mass['num_boxes'] == 3  # same denominator
  assert mass['acc_iou']['0.7'] == 0.0 and mass['acc_iou']['0.5'] == pytest.approx(1 / 3)
  assert mass['mean_iou'] == pytest.approx((0.25 + 0.55) / 3)
  assert mass['mean_iobb'] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="'predicted'"):
    loc.localization_metrics([{'class': 'Mass', 'gt': GT, 'pred': []}], CLASSES,
                             require_prediction=True)


def test_unknown_class_and_no_boxes():
  with pytest.raises(ValueError, match="'Hernia'"):
    loc.localization_metrics([_rec('Hernia', 5.0)], CLASSES)
  m = loc.localization_metrics([], CLASSES)
  json.dumps(m, allow_nan=False)
  assert m['class_names'] == [] and m['num_boxes'] == 0 and m['per_class'] == {}
  assert m['mean']['mean_iou'] is None and m['mean']['acc_iou']['0.3'] is None


def _results():
  ours = loc.localization_metrics(_records(), CLASSES)
  better = _records()
  better[0] = _rec('Mass', 9.0, image_id='m1')  # 0.25 -> 0.9
  return {'ResNet-50': ours, 'Ours': loc.localization_metrics(better, CLASSES)}


def test_markdown_tables():
  text = reporting.localization_markdown(_results())
  lines = text.splitlines()
  # Paper 002 Table 1: threshold on the first row of its group only.
  # AFP: class mean of false positives per heat map. ResNet-50 at 0.3: Mass 1/3 (the 0.25
  # box), Nodule 1/2 (the 0.1 box) -> 5/12; at 0.7: Mass 2/3 -> 7/12.
  assert '| T(IoU) | Model | Mas. | Nod. | Mean | AFP |' in lines
  assert '| 0.3 | ResNet-50 | 0.67 | 0.00 | 0.33 | 0.417 |' in lines
  assert '|  | Ours | 1.00 | 0.00 | 0.50 | 0.250 |' in lines  # Ours: Mass IoUs 0.9, 0.55, 0.8
  assert '| 0.7 | ResNet-50 | 0.33 | 0.00 | 0.17 | 0.583 |' in lines
  assert '|  | Ours | 0.67 | 0.00 | 0.33 | 0.417 |' in lines
  assert [line.split(' | ')[0] for line in lines if 'ResNet-50 |' in line][:3] == [
      '| 0.3', '| 0.5', '| 0.7']
  assert 'Abbreviations: Mas. = Mass, Nod. = Nodule.' in text
  # Paper 004 Table 3: mean IoU, 4 decimals; class mean and all-box mean.
  assert '| Model | Mas. | Nod. | Mean | All boxes |' in lines
  assert '| ResNet-50 | 0.5333 | 0.0500 | 0.2917 | 0.3400 |' in lines
  assert '| Ours | 0.7500 | 0.0500 | 0.4000 | 0.4700 |' in lines
  # T(IoBB): all Mass predictions lie inside the GT.
  assert '| T(IoBB) | Model | Mas. | Nod. | Mean | AFP |' in lines
  assert '| 0.5 | ResNet-50 | 1.00 | 0.50 | 0.75 | 0.000 |' in lines
  assert text.count('ResNet-50: 5 boxes in 5 heat maps, 4 predicted boxes') == 3


def test_markdown_tables_full_names_and_missing_values():
  no_abbrev = loc.localization_metrics(
      [_rec('Mass', 5.5), _rec('Hernia', 8.0)], ('Mass', 'Hernia'))
  text = reporting.localization_markdown({'A': no_abbrev, 'B': loc.localization_metrics(
      [_rec('Mass', 2.5)], ('Mass',))}, thresholds=(0.5,))
  assert '| T(IoU) | Model | Mass | Hernia | Mean | AFP |' in text.splitlines()
  assert '|  | B | 0.00 | n/a | 0.00 | 1.000 |' in text.splitlines()
  assert 'Abbreviations' not in text
  with pytest.raises(ValueError, match='at least one'):
    reporting.localization_markdown({})


def test_csv_table():
  text = reporting.localization_csv(_results())
  rows = list(csv.DictReader(io.StringIO(text)))
  assert list(rows[0]) == ['model', 'class', 'metric', 'threshold', 'value']

  def value(model, cls, metric, threshold=''):
    [row] = [r for r in rows if (r['model'], r['class'], r['metric'], r['threshold']) ==
             (model, cls, metric, threshold)]
    return row['value']

  assert value('ResNet-50', 'Mass', 'num_boxes') == '3'
  assert float(value('ResNet-50', 'Mass', 'acc_iou', '0.3')) == pytest.approx(2 / 3)
  assert float(value('Ours', 'Mean', 'mean_iou')) == pytest.approx(0.4)
  assert float(value('Ours', 'All boxes', 'acc_iobb', '0.7')) == pytest.approx(4 / 5)
  assert value('ResNet-50', 'Mean', 'num_groups') == '5'
  assert value('ResNet-50', 'All boxes', 'num_pred_boxes') == '4'
  assert float(value('ResNet-50', 'Mass', 'afp_iou', '0.3')) == pytest.approx(1 / 3)
  assert float(value('ResNet-50', 'All boxes', 'afp_iou', '0.7')) == pytest.approx(3 / 5)
  assert float(value('Ours', 'Mean', 'afp_iobb', '0.7')) == 0.0
  # 2 models x 4 groups (2 classes, Mean, All boxes) x (5 + 4 x 7) rows, plus the header.
  assert len(rows) == 2 * 4 * 33
