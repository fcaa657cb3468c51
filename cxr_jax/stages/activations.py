"""The `activations` stage: paper 003's figures for the run's model(s), for the report.

For each `config.report_models` stage: Fig. 2 (the filters of `config.activations.filter_layers`
as weights or activation-maximisation images, and the FC3 class visualisation) once, and Fig.
3 + 4 (the post-ReLU activations of `config.activations.layer` as a grid, the strongest channel,
its discrete-jet heat map over the image) on the first `num_images` images of the test split,
abnormal (positive-class) images first as the paper feeds abnormal X-rays. The images are the
model's inputs (after the eval preprocessing: lung ROI, CLAHE, resize), so the maps line up
with what the network saw. Files: `layout.Run.activations_dir`.
"""

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import inference, layout
from cxr_jax.data import pipeline
from cxr_jax.explain import activations as A
from cxr_jax.inference import activations as act
from cxr_jax.io_utils import atomic_write_files
from cxr_jax.stages.base import STAGES, is_chief

DEFAULTS = {'filter_layers': ('conv1', 'conv3'), 'layer': 'conv5', 'num_images': 2,
            'num_filters': 16, 'steps': 30, 'threshold': A.DEFAULT_THRESHOLD,
            'color_steps': A.DEFAULT_STEPS, 'alpha': A.DEFAULT_ALPHA, 'channel': -1}


def settings_of(config: ml_collections.ConfigDict) -> dict:
  """config.activations over DEFAULTS."""
  given = config.get('activations')
  return {**DEFAULTS, **(given.to_dict() if given is not None else {})}


def test_images(config: ml_collections.ConfigDict, n: int) -> list[tuple[str, int, np.ndarray]]:
  """(image id, class index, preprocessed image [H, W, C]) of up to n test images, positives
  (the last class) first."""
  split = config.data.eval_splits.get('test', 'test')
  data = pipeline.make_eval_iter(config.data, split, global_batch_size=config.eval_batch_size)
  found = []
  k = len(config.data.classes)
  for batch in data:
    for i in np.nonzero(batch['mask'] > 0)[0]:
      label = int(batch['label'][i]) if 'label' in batch else 0
      found.append((str(batch['image_id'][i]), label, np.asarray(batch['image'][i])))
  positive = max(k - 1, 1) if k > 1 else 1
  found.sort(key=lambda f: f[1] != positive)  # stable: file order within each group
  return found[:n]


@STAGES.register('activations')
def activations_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes the figures and `activations.json` (index) under activations/."""
  if not is_chief():
    return
  run = layout.Run(workdir)
  s = settings_of(config)
  settings = act.ActivationSettings(layer=s['layer'], threshold=float(s['threshold']),
                                    steps=int(s['color_steps']), alpha=float(s['alpha']))
  images = test_images(config, int(s['num_images']))
  files, index = {}, {'layer': s['layer'], 'filter_layers': list(s['filter_layers']),
                      'models': {}}
  for stage, label in config.report_models:
    predictor = inference.load_predictor(workdir, stage)
    fig2 = [[(layer, act.filter_panel(predictor, layer, num=int(s['num_filters']),
                                      steps=int(s['steps'])))
             for layer in s['filter_layers']] + act.class_visualization(predictor,
                                                                         steps=int(s['steps']))]
    name = f'{stage}.filters.png'
    files[name] = A.png_bytes(A.figure(fig2, row_labels=[label], suptitle=(
        f'{label}: filters of {", ".join(s["filter_layers"])} and the FC3 class '
        'visualisation')))
    entries = []
    for image_id, cls, x in images:
      channel = None if int(s['channel']) < 0 else int(s['channel'])
      panels, chosen = act.activation_panels(predictor, x, settings, channel=channel)
      probs = predictor.probabilities(predictor.forward(x[None])[0])[0]
      stem = image_id.rsplit('.', 1)[0]
      fig_name = f'{stage}.{stem}.activations.png'
      title = (f'{label}: {image_id} ({predictor.class_names[cls]}; p = '
               + ', '.join(f'{c} {p:.2f}' for c, p in zip(predictor.class_names, probs,
                                                          strict=True)) + ')')
      files[fig_name] = A.png_bytes(A.figure([panels], suptitle=title))
      entries.append({'image_id': image_id, 'label': predictor.class_names[cls],
                      'channel': chosen, 'file': fig_name})
    index['models'][label] = {'stage': stage, 'filters': name, 'images': entries}
    logging.info('activations: %s, %d images.', label, len(entries))
  atomic_write_files({run.activations_dir / name: data for name, data in files.items()})
  run.write_activations_index(index)
