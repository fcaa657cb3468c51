import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import optim
from cxr_jax.config_lib import base_config


def _opt(**overrides):
  cfg = base_config().optimizer
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _run(tx, params, grads, steps):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  return params, state


def test_step_schedule_divides_lr_at_boundaries():
  cfg = _opt(name='sgd', learning_rate=0.01, kwargs={'momentum': 0.0})
  cfg.schedule = {'name': 'step', 'boundaries': (2,), 'factor': 0.1}
  tx = optim.build_optimizer(cfg, 10)
  params = {'w': jnp.zeros(())}
  grads = {'w': jnp.ones(())}
  # lr 0.01 for steps 0,1 then 0.001: after 4 steps w = -(0.01*2 + 0.001*2).
  params, _ = _run(tx, params, grads, 4)
  np.testing.assert_allclose(params['w'], -0.022, rtol=1e-6)


def test_l2_weight_decay_is_added_to_gradient():
  cfg = _opt(name='sgd', learning_rate=0.1, weight_decay=0.5, kwargs={'momentum': 0.0})
  tx = optim.build_optimizer(cfg, 1)
  params, _ = _run(tx, {'w': jnp.full((), 2.0)}, {'w': jnp.ones(())}, 1)
  np.testing.assert_allclose(params['w'], 2.0 - 0.1 * (1.0 + 0.5 * 2.0), rtol=1e-6)


def test_decoupled_weight_decay_matches_adamw():
  import optax
  cfg = _opt(name='adam', learning_rate=0.01, weight_decay=0.1, decoupled=True,
             kwargs={'eps': 1e-8})
  ours = optim.build_optimizer(cfg, 5)
  ref = optax.adamw(0.01, eps=1e-8, weight_decay=0.1)
  p0 = {'w': jnp.array([1.0, -2.0, 3.0])}
  g = {'w': jnp.array([0.3, 0.1, -0.2])}
  a, _ = _run(ours, p0, g, 3)
  b, _ = _run(ref, p0, g, 3)
  np.testing.assert_allclose(a['w'], b['w'], rtol=1e-6)


def test_kernel_only_decay_mask():
  cfg = _opt(name='sgd', learning_rate=1.0, weight_decay=1.0, decay_mask='kernels',
             kwargs={'momentum': 0.0})
  tx = optim.build_optimizer(cfg, 1)
  p = {'dense': {'kernel': jnp.ones(()), 'bias': jnp.ones(())}}
  g = jax.tree.map(jnp.zeros_like, p)
  out, _ = _run(tx, p, g, 1)
  assert float(out['dense']['kernel']) == 0.0 and float(out['dense']['bias']) == 1.0


def test_plateau_scale_in_state_scales_updates():
  cfg = _opt(name='sgd', learning_rate=1.0, kwargs={'momentum': 0.0})
  tx = optim.build_optimizer(cfg, 1)
  state = tx.init({'w': jnp.zeros(())})
  assert optim.plateau_scale(state) == 1.0
  state = optim.set_plateau_scale(state, 0.1)
  updates, _ = tx.update({'w': jnp.ones(())}, state, {'w': jnp.zeros(())})
  np.testing.assert_allclose(updates['w'], -0.1, rtol=1e-6)


def test_plateau_update_sequence():
  s = optim.PlateauState()
  kw = dict(mode='min', patience=2, factor=0.1, cooldown=1, max_reductions=2)
  factors = []
  for loss in [1.0, 0.9, 0.95, 0.92, 0.93, 0.94, 0.96, 0.97, 0.98, 0.99, 1.0]:
    s, f = optim.plateau_update(s, loss, **kw)
    factors.append(f)
  # best 0.9 at eval 2; two bad evals -> reduce at eval 4; cooldown eats eval 5; two more bad
  # evals -> second reduction at eval 7; max_reductions=2 stops further ones.
  assert factors == [None, None, None, 0.1, None, None, 0.1, None, None, None, None]
  assert s.reductions == 2 and s.best == 0.9


def test_plateau_mode_max():
  s, f = optim.plateau_update(optim.PlateauState(best=0.8), 0.85, mode='max', patience=1,
                              factor=0.5, cooldown=0, max_reductions=1)
  assert f is None and s.best == 0.85
  s, f = optim.plateau_update(s, 0.84, mode='max', patience=1, factor=0.5, cooldown=0,
                              max_reductions=1)
  assert f == 0.5


def test_unknown_optimizer_lists_names():
  with pytest.raises(ValueError, match='valid names: adam, sgd'):
    optim.build_optimizer(_opt(name='rmsprop'), 1)


def test_frozen_prefixes_get_no_update():
  cfg = _opt(name='adam', learning_rate=0.1, weight_decay=0.1, frozen=('backbone',))
  tx = optim.build_optimizer(cfg, 1)
  p = {'backbone': {'conv': {'kernel': jnp.ones(3)}}, 'attention': {'w': jnp.ones(3)},
       'backbone_extra': {'w': jnp.ones(3)}}
  g = jax.tree.map(jnp.ones_like, p)
  out, _ = _run(tx, p, g, 2)
  np.testing.assert_array_equal(out['backbone']['conv']['kernel'], 1.0)
  assert float(out['attention']['w'][0]) < 1.0
  assert float(out['backbone_extra']['w'][0]) < 1.0  # a prefix means a whole path component


def test_plateau_scale_with_frozen_parameters():
  cfg = _opt(name='sgd', learning_rate=1.0, kwargs={'momentum': 0.0}, frozen=('a',))
  tx = optim.build_optimizer(cfg, 1)
  p = {'a': jnp.zeros(()), 'b': jnp.zeros(())}
  state = optim.set_plateau_scale(tx.init(p), 0.5)
  updates, _ = tx.update({'a': jnp.ones(()), 'b': jnp.ones(())}, state, p)
  assert float(updates['a']) == 0.0 and float(updates['b']) == -0.5


def test_step_schedule_in_epochs():
  # Paper 001: lr / 10 after 20 epochs; here 2 epochs of 10.5 steps -> boundary at step 21.
  sched = optim.SCHEDULES.get('step')(0.01, 100, boundary_epochs=(2.0,), steps_per_epoch=10.5)
  assert float(sched(20)) == pytest.approx(0.01) and float(sched(21)) == pytest.approx(0.001)
  both = optim.SCHEDULES.get('step')(1.0, 100, boundaries=(5,), boundary_epochs=(1.0,),
                                     steps_per_epoch=10)
  assert [float(both(s)) for s in (4, 5, 9, 10)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
  with pytest.raises(ValueError, match='steps per epoch'):
    optim.SCHEDULES.get('step')(0.01, 100, boundary_epochs=(2.0,))
