"""Attention branches that sit on a backbone's spatial feature maps.

Each module takes annotation vectors, i.e. a feature map [B, h, w, C] (the last map before global
average pooling), and returns class logits together with the attention it paid, so the same
weights serve classification and visualisation. A config wires a module to a backbone; the
modules know nothing about the backbone or the data.

- `lstm_attention.LSTMAttention`: the recurrent soft attention of paper 000 (Saednia et al.),
  after Show, Attend and Tell (Xu et al. 2015) and the class-feedback of Ba et al. 2014.
- `squeeze_excite.SqueezeExcite`: paper 001's feature attention (SE in every ResNet block).
- `space_attention.SpaceAttentionHead`: paper 001's space attention (global vector tiled and
  concatenated to the local features; 1 x 1 classifier; class score maps as heat maps).
- `multiscale.MultiScaleAttention`: paper 004's multi-scale spatial attention, which sits on
  the input image instead (image, 5 x 5 and 9 x 9 convolutions; channel max and mean; sigmoid
  map multiplied into the image).
- `feature_weighting`: paper 004's F_l = F_g (x) M_g, the lung/heart mask pooled to the feature
  grid and multiplied into the last feature map.
"""
