r"""Paper 003: AlexNet fine-tuned from ImageNet weights, only its last FC replaced (2-way).

Section II-C: "the last three layers" of Matlab's AlexNet (fc8, softmax, classification
output) are replaced by a new 2-way FC, a softmax and a classification layer: in our
torchvision-layout AlexNet that is the head `classifier_6`; fc6/fc7 keep their ImageNet
weights (`init_from.checkpoint`; the head keeps this run's initialisation). The new layer
learns faster: `optimizer.lr_multipliers={'classifier_6': 20.0}` (the paper gives no factor;
20 is Matlab's transfer-learning example, whose wording the paper follows). lr 1e-3, 60 epochs,
input 227 x 227 (Matlab's AlexNet), ImageNet normalisation. The rest: configs/tb/_common.py.

Weights: torchvision's `alexnet` state dict converted once:
  python -m cxr_jax.tools.import_weights --source=torchvision --arch=alexnet \
      --input=alexnet-owt-7be5be79.pth --output=weights/torchvision_alexnet
Run: python -m cxr_jax.main --config=configs/tb/alexnet.py --workdir=workdir/tb_alexnet
Demo (synthetic, from scratch, fc 256): python -m cxr_jax.main --config=configs/tb/alexnet.py:demo
"""

import ml_collections

from cxr_jax import config_lib

_common = config_lib.load_sibling(__file__, '_common.py')
SIZE = 227
WEIGHTS = 'weights/torchvision_alexnet'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict({'name': 'alexnet'})
  config = _common.base('tb_alexnet', model, SIZE, 'imagenet')
  config.init_from.checkpoint = WEIGHTS
  config.optimizer.lr_multipliers = ml_collections.ConfigDict({'classifier_6': 20.0})
  return _common.finish(config, arg, apply_demo, SIZE, 'imagenet')


def apply_demo(config: ml_collections.ConfigDict, roi: str = 'crop') -> None:
  _common.phantom_demo(config, 128, 'imagenet', roi)
  config.init_from.checkpoint = ''
  config.model.hidden = 256
  config.optimizer.learning_rate = 1e-2
