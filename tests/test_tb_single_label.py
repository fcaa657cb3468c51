"""Paper 003's single-label path: losses on class indices, the metrics with bootstrap intervals
(against scikit-learn), threshold choice, metric selection, folds, lr_multipliers checks."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from cxr_jax import config_lib, evaluate, losses, optim, single_label
from cxr_jax.data import folds
from cxr_jax.evaluators import EVALUATORS, Predictions


def _binary(n=60, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  p = np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1)
  p[:5] = 0.5  # ties
  return y, np.stack([1 - p, p], 1)


def test_losses_take_class_indices():
  logits = jnp.array([[0.3, -1.0], [2.0, 0.5], [0.0, 0.1]])
  idx = jnp.array([1, 0, 1])
  onehot = jnp.eye(2)[idx]
  np.testing.assert_allclose(losses.softmax_ce(logits, idx), losses.softmax_ce(logits, onehot),
                             rtol=1e-6)
  one = logits[:, :1]
  np.testing.assert_allclose(losses.sigmoid_bce(one, idx),
                             optax.sigmoid_binary_cross_entropy(one[:, 0], idx * 1.0),
                             rtol=1e-6)
  assert losses.output_activation('softmax_ce') == 'softmax'
  np.testing.assert_allclose(losses.probabilities(logits, 'softmax').sum(-1), 1.0, rtol=1e-6)


def test_binary_metrics_match_sklearn_and_intervals_hold_the_estimate():
  y, probs = _binary()
  t = 0.55
  m = single_label.compute_metrics(y, probs, ('normal', 'tb'), threshold=[1 - t, t])
  pred = probs[:, 1] > t
  assert m['threshold'] == t and m['positive_class'] == 'tb'
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
  assert m['auroc'] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
  assert m['sensitivity'] == pytest.approx(skm.recall_score(y, pred))
  assert m['specificity'] == pytest.approx(skm.recall_score(1 - y, ~pred))
  assert m['f1'] == pytest.approx(skm.f1_score(y, pred))
  assert m['precision'] == pytest.approx(skm.precision_score(y, pred))
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert m['confusion'] == [[tn, fp], [fn, tp]]
  for key in single_label.CI_METRICS:
    lo, hi = m['ci'][key]
    assert lo <= m[key] + 1e-9 and m[key] <= hi + 1e-9 and hi - lo > 0, key
  again = single_label.compute_metrics(y, probs, ('normal', 'tb'), threshold=t)
  assert again['ci'] == m['ci']  # seeded
  # One sigmoid output: the same numbers from [N, 1].
  one = single_label.compute_metrics(y[:, None] * 1.0, probs[:, 1:], ('tb',), threshold=t)
  assert one['accuracy'] == m['accuracy'] and one['auroc'] == m['auroc']


def test_multiclass_metrics_match_sklearn():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 50)
  logits = rng.normal(size=(50, 3)) + 1.5 * np.eye(3)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  m = single_label.compute_metrics(np.eye(3)[y], probs, ('a', 'b', 'c'), bootstrap=50)
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
  assert m['auroc'] == pytest.approx(skm.roc_auc_score(y, probs, multi_class='ovr'))
  assert m['f1'] == pytest.approx(skm.f1_score(y, probs.argmax(1), average='macro'))
  assert m['per_class']['b']['support'] == int((y == 1).sum())


def test_undefined_auroc_is_none_and_folds_aggregate():
  m = single_label.compute_metrics(np.zeros(4, int), np.full((4, 2), 0.5), ('normal', 'tb'),
                                   bootstrap=20)
  assert m['auroc'] is None and m['sensitivity'] is None and m['ci']['auroc'] == [None, None]
  agg = single_label.aggregate_folds([{'accuracy': 0.5, 'auroc': None},
                                      {'accuracy': 0.7, 'auroc': 0.8}])
  assert agg['accuracy']['mean'] == pytest.approx(0.6)
  assert agg['accuracy']['sd'] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert agg['auroc'] == {'mean': 0.8, 'sd': None, 'n': 1, 'values': [None, 0.8]}


def test_evaluator_labels_thresholds_and_metric_selection():
  cls = EVALUATORS.get('single_label_classification')
  ev = cls.__new__(cls)
  ev.class_names, ev.threshold, ev.threshold_rule = ('normal', 'tb'), 'per_class', 'max_f1'
  np.testing.assert_array_equal(ev._labels({'label': np.array([1, 0])}), [[0, 1], [1, 0]])
  y, probs = _binary()
  preds = Predictions([str(i) for i in range(len(y))], np.eye(2)[y].astype(np.float32), probs)
  t = ev.choose_thresholds(preds)
  assert t[0] == pytest.approx(1 - t[1])
  assert t[1] == pytest.approx(single_label.choose_threshold(y, probs, 'max_f1'))
  m = ev.metrics(preds)
  assert m['threshold'] == pytest.approx(t[1])
  value = evaluate.select_metric(m, 'accuracy', scalars=cls.SCALAR_METRICS)
  assert value.value == m['accuracy'] and value.higher_is_better
  with pytest.raises(ValueError, match="Unknown metric 'mean_auroc'.*accuracy, auroc"):
    evaluate.select_metric(m, 'mean_auroc', scalars=cls.SCALAR_METRICS)


def test_validate_checks_single_label_names():
  config = config_lib.base_config()
  config.evaluator = 'single_label_classification'
  config.data.target = 'label'
  config.data.classes = ('normal', 'tb')
  config.best_metric = 'accuracy'
  config_lib.validate(config)
  config.best_metric = 'mean_auroc'
  with pytest.raises(ValueError, match='config.best_metric: Unknown metric'):
    config_lib.validate(config)


def test_unmatched_lr_multiplier_prefix_is_an_error():
  cfg = config_lib.base_config().optimizer
  cfg.lr_multipliers = ml_collections.ConfigDict({'fc8': 10.0})
  params = {'classifier_6': {'kernel': jnp.zeros(2)}, 'features_0': {'kernel': jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"lr_multipliers: \['fc8'\] match no parameter.*"
                     r"classifier_6"):
    optim.build_optimizer(cfg, 10).init(params)
  cfg.lr_multipliers = ml_collections.ConfigDict({'classifier_6': 1.0})  # all-ones path too
  optim.build_optimizer(cfg, 10).init(params)
  cfg.lr_multipliers = ml_collections.ConfigDict({'classifier_7': 1.0})
  with pytest.raises(ValueError, match='classifier_7'):
    optim.build_optimizer(cfg, 10).init(params)


def test_folds_are_stratified_grouped_and_partition_the_pool():
  rng = np.random.default_rng(0)
  patients = np.repeat(np.arange(40), 2)  # two images per patient
  labels = np.repeat(rng.integers(0, 2, 40), 2)
  fold = folds.assign_folds(labels, patients, 5, seed=3)
  for p in np.unique(patients):
    assert len(set(fold[patients == p])) == 1
  rate = labels.mean()
  for i in range(5):
    assert abs(labels[fold == i].mean() - rate) < 0.25
  examples = {'image_id': np.array([f'im{i}' for i in range(80)]), 'label': labels,
              'patient_id': patients}
  s = folds.fold_splits(examples, fold, 4, 5, 'train+test')['splits']
  every = s['train'] + s['validation'] + s['test']
  assert sorted(every) == sorted(examples['image_id'].tolist()) and len(set(every)) == 80
  assert set(s['test']) == set(examples['image_id'][fold == 4])
  assert set(s['validation']) == set(examples['image_id'][fold == 0])
  with pytest.raises(ValueError, match='at least 3'):
    folds.assign_folds(labels, patients, 2, 0)
