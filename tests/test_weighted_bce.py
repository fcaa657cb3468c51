"""Paper 002's weighted BCE (eq. 10): by hand, without positives, and over the global batch."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cxr_jax import losses, optim, parallel
from cxr_jax import train_step as train
from cxr_jax.config_lib import base_config
from cxr_jax.models.mobilenet import MobileNetV1

LN2 = math.log(2.0)


def _nll(logit: float, label: int) -> float:
  p = 1 / (1 + math.exp(-logit))
  return -math.log(p) if label else -math.log(1 - p)


def test_all_entries_by_hand():
  logits = jnp.array([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
  labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  # |P| = 2, |N| = 4 over the 6 entries: w_P = 6 / 2 = 3, w_N = 6 / 4 = 1.5.
  want = [(3 * _nll(0.0, 1) + 1.5 * _nll(1.0, 0) + 1.5 * _nll(-2.0, 0)) / 3,
          (1.5 * _nll(0.5, 0) + 1.5 * _nll(0.0, 0) + 3 * _nll(3.0, 1)) / 3]
  np.testing.assert_allclose(losses.get_loss('weighted_bce')(logits, labels), want, rtol=1e-6)
  terms = losses.weighted_bce_terms(logits, labels)
  np.testing.assert_allclose(float(terms.sum()), 3 * sum(want), rtol=1e-6)  # eq. 10's L


def test_per_class_counts_by_hand():
  logits = jnp.zeros((4, 2))
  labels = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  # Class 0: |P| = 1, |N| = 3 -> w_P = 4, w_N = 4/3; class 1: |P| = 2, |N| = 2 -> 2 and 2.
  got = losses.get_loss('weighted_bce_per_class')(logits, labels)
  want = np.array([4 + 2, 4 / 3 + 2, 4 / 3 + 2, 4 / 3 + 2]) * LN2 / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_batch_without_positives_weighs_negatives_by_one():
  logits = jnp.array([[0.3, -1.0], [2.0, 0.0]])
  labels = jnp.zeros((2, 2))
  # |P| = 0: no positive term (w_P never multiplies anything); w_N = 4 / 4 = 1: plain BCE.
  got = losses.get_loss('weighted_bce')(logits, labels)
  np.testing.assert_allclose(got, losses.get_loss('sigmoid_bce')(logits, labels), rtol=1e-6)
  assert np.all(np.isfinite(got))
  per_class = losses.get_loss('weighted_bce_per_class')(logits, labels)
  np.testing.assert_allclose(per_class, got, rtol=1e-6)
  # And the mirror image: only positives.
  ones = jnp.ones((2, 2))
  np.testing.assert_allclose(losses.get_loss('weighted_bce')(logits, ones),
                             losses.get_loss('sigmoid_bce')(logits, ones), rtol=1e-6)


def _sharded_mean(num_devices: int, logits: np.ndarray, labels: np.ndarray, name: str) -> float:
  mesh = parallel.make_mesh(num_devices)
  fn = losses.get_loss(name)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P('data'), P('data')), out_specs=P())
  def mean_loss(lg, lb):
    return jax.lax.pmean(jnp.mean(fn(lg, lb)), 'data')

  sharding = parallel.batch_sharded(mesh)
  return float(mean_loss(jax.device_put(logits, sharding), jax.device_put(labels, sharding)))


@pytest.mark.parametrize('name', ['weighted_bce', 'weighted_bce_per_class'])
def test_counts_are_global_8_devices_equal_1(name):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 5)).astype(np.float32)
  labels = np.zeros((16, 5), np.float32)
  labels[:3, 0] = 1  # positives on 2 of the 8 shards only: local counts would differ
  labels[5, 2] = labels[14, 4] = 1
  one = _sharded_mean(1, logits, labels, name)
  eight = _sharded_mean(8, logits, labels, name)
  np.testing.assert_allclose(eight, one, rtol=1e-6)
  np.testing.assert_allclose(one, float(jnp.mean(losses.get_loss(name)(logits, labels))),
                             rtol=1e-6)


def test_train_step_with_weighted_bce_8_devices_equal_1():
  def run(num_devices):
    mesh = parallel.make_mesh(num_devices)
    model = MobileNetV1(num_classes=4, blocks=((8, 1),), bn_axis_name=parallel.DATA_AXIS)
    cfg = base_config().optimizer
    cfg.name, cfg.learning_rate = 'adam', 1e-3
    tx = optim.build_optimizer(cfg, 10)
    state = train.create_train_state(model, tx, (16, 16, 1), jax.random.key(0), mesh)
    step = train.make_train_step(model, tx, losses.get_loss('weighted_bce'), mesh)
    rng = np.random.default_rng(1)
    batch = {'image': rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
             'labels': np.zeros((8, 4), np.float32)}
    batch['labels'][0, 1] = 1
    state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(0))
    return float(metrics['loss']), jax.device_get(state.params)

  (l1, p1), (l8, p8) = run(1), run(8)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
