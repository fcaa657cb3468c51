r"""Paper 003: VGG19 fine-tuned from ImageNet weights, only its last FC replaced (2-way).

As configs/tb/alexnet.py (head `classifier_6` new, learning-rate multiplier 20, fc6/fc7
transferred, lr 1e-3, 60 epochs), at VGG's native 224 x 224. Fig. 2 shows conv1_2 and
conv3_4, Fig. 3/4 the last convolution conv5 (= conv5_4). The rest: configs/tb/_common.py.

Weights: python -m cxr_jax.tools.import_weights --source=torchvision --arch=vgg19 \
      --input=vgg19-*.pth --output=weights/torchvision_vgg19
Run: python -m cxr_jax.main --config=configs/tb/vgg19.py --workdir=workdir/tb_vgg19
Demo (synthetic, from scratch, 1/8 widths, fc 128, 64 px):
  python -m cxr_jax.main --config=configs/tb/vgg19.py:demo
"""

import ml_collections

from cxr_jax import config_lib

_common = config_lib.load_sibling(__file__, '_common.py')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return _common.vgg('vgg19', ('conv1_2', 'conv3_4'), arg)
