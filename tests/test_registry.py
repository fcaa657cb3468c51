import pytest

from cxr_jax.registry import Registry


def test_register_and_get():
  reg = Registry('widget')
  reg.register('a')(1)
  reg.register('b')(2)
  assert reg.get('a') == 1 and reg.get('b') == 2
  assert reg.names() == ['a', 'b'] and 'a' in reg and 'c' not in reg


def test_unknown_name_lists_valid_names():
  reg = Registry('widget')
  reg.register('alpha')(1)
  reg.register('beta')(2)
  with pytest.raises(ValueError, match=r"Unknown widget 'gamma'; valid names: alpha, beta"):
    reg.get('gamma')


def test_duplicate_registration_fails():
  reg = Registry('widget')
  reg.register('a')(1)
  with pytest.raises(ValueError, match='already registered'):
    reg.register('a')(2)


def test_project_registries_list_names():
  from cxr_jax import losses, optim, stages
  from cxr_jax.evaluators import EVALUATORS
  from cxr_jax.models import MODELS
  for reg, known in [(MODELS, 'mobilenet_v1'), (losses.LOSSES, 'sigmoid_bce'),
                     (optim.OPTIMIZERS, 'adam'), (optim.SCHEDULES, 'step'),
                     (EVALUATORS, 'multilabel_classification'),
                     (stages.STAGES, 'train_classifier')]:
    with pytest.raises(ValueError, match=known):
      reg.get('no-such-thing')
