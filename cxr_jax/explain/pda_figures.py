"""The `explain` stage: paper 000's Fig. 2/3, PDA heat maps of every reported model.

For the first `config.explain.num_images` images of `config.explain.split` (the box split by
default, so ground-truth boxes can be drawn), every model of `config.report_models` gets a
Prediction Difference Analysis heat map per ground-truth class (Fig. 2: models side by side, red
expert boxes, detected findings on top); attention models also get their per-step attention maps
(Fig. 3). Level 'features' (what the paper does: windows over the last feature map, only the head
re-evaluated) or 'pixels' (windows over the input, whole network). Figures and `index.json` are
written to `workdir/explain/`; the report stage links them.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cxr_jax import predict
from cxr_jax.data import pipeline
from cxr_jax.explain import overlays
from cxr_jax.io_utils import atomic_write_json

COLORBAR = 'contribution to the decision (bits of evidence)'


def _examples(config: ml_collections.ConfigDict, n: int) -> list[dict[str, Any]]:
  """The first n examples of config.explain.split: grey image [H, W] in [0, 1], labels, boxes."""
  builder = pipeline.get_builder(config.data.name, config.data.data_dir)
  split = config.explain.split
  ds = builder.as_dataset(split=f'{split}[:{n}]', shuffle_files=False)
  names = builder.info.features['objects']['label'].names
  out = []
  for ex in tfds.as_numpy(ds):
    image = ex['image'][..., 0].astype(np.float32) / 255.0
    h, w = image.shape
    boxes = [(names[int(c)], (b[1] * w, b[0] * h, (b[3] - b[1]) * w, (b[2] - b[0]) * h))
             for b, c in zip(ex['objects']['bbox'], ex['objects']['label'], strict=True)]
    out.append({'image_id': ex['image_id'].decode(), 'image': image,
                'labels': ex['labels'], 'boxes': boxes})
  return out


def explain_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes PDA (and attention) figures of `config.report_models` to workdir/explain/."""
  cfg = config.explain
  settings = predict.PDASettings.from_config(cfg.to_dict())
  out_dir = workdir / 'explain'
  examples = _examples(config, cfg.num_images)
  models = []
  for stage, label in config.report_models:
    predictor = predict.load_predictor(workdir, stage)
    sampler = predict.fit_pda_sampler(settings,
                                      predict.reference_data(predictor, settings, None))
    models.append((label, predictor, sampler))
  index = []
  key = jax.random.key(cfg.seed)
  for i, ex in enumerate(examples):
    panels, attention_panels, record = [], [], {'image_id': ex['image_id'], 'models': {}}
    class_names = models[0][1].class_names
    truth = [c for c, y in zip(class_names, ex['labels'][_columns(class_names)], strict=True)
             if y > 0]
    for label, predictor, sampler in models:
      x = predictor.preprocess(ex['image'])
      probs, inter = predictor.run(x)
      findings = [(n, float(p)) for n, p, t in zip(predictor.class_names, probs,
                                                   predictor.thresholds, strict=True) if p > t]
      shown = truth or [predictor.class_names[int(np.argmax(probs))]]
      rel = predict.pda_heatmaps(predictor, x, sampler, settings, jax.random.fold_in(key, i))
      for c in shown:
        k = predictor.class_names.index(c)
        panels.append(overlays.Panel(
            rel[k], title=f'{label}: {c} (p={probs[k]:.2f})', findings=findings,
            boxes=[b for bc, b in ex['boxes'] if bc == c], colorbar_label=COLORBAR))
      if predictor.has_attention:
        for t, m in enumerate(predictor.attention_maps(inter)):
          attention_panels.append(overlays.Panel(
              m, title=f'{label}: attention step {t + 1}', findings=findings,
              boxes=[b for _, b in ex['boxes']], colorbar_label='attention weight'))
      record['models'][label] = {'probabilities': dict(zip(
          predictor.class_names, map(float, probs), strict=True)), 'shown': shown}
    name = ex['image_id'].rsplit('.', 1)[0]
    files = [f'{name}.pda.png']
    overlays.overlay_grid(ex['image'], panels, ncols=len(models),
                          suptitle=f'{ex["image_id"]}: PDA ({cfg.level}), truth: '
                          f'{", ".join(truth) or "none"}', out_path=str(out_dir / files[0]))
    if attention_panels:
      files.append(f'{name}.attention.png')
      overlays.overlay_grid(ex['image'], attention_panels, ncols=len(attention_panels),
                            suptitle=f'{ex["image_id"]}: recurrent attention',
                            out_path=str(out_dir / files[-1]))
    record['files'] = files
    index.append(record)
    logging.info('explain: %s (%d/%d)', ex['image_id'], i + 1, len(examples))
  atomic_write_json(str(out_dir / 'index.json'), {'level': cfg.level, 'images': index})


def _columns(class_names: tuple[str, ...]) -> list[int]:
  from cxr_jax.data.labels import class_indices
  return class_indices(class_names)
