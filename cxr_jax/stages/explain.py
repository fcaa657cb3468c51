"""The `explain` stage: paper 000's Fig. 2/3, PDA heat maps of every reported model.

The images explained are the first `config.explain.num_images` images *with ground-truth boxes*
of `config.explain.split` (default: the test split, `config.data.eval_splits.test`), so a figure
is never drawn on an image the model trained on or was selected with (under NIH's patient13
split, four in five of the `bbox` split's images are train or validation images). Each model of
`config.report_models` gets a Prediction Difference Analysis heat map per ground-truth class
(Fig. 2: models side by side, red expert boxes, detected findings on top); attention models also
get their per-step attention maps (Fig. 3). Level 'features' (what the paper does: windows over
the last feature map, only the head re-evaluated) or 'pixels' (windows over the input, whole
network). Figures and an index go to the run's explain folder (cxr_jax/layout.py); the report
stage links them.
"""

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from cxr_jax import inference, layout
from cxr_jax.data import pipeline
from cxr_jax.explain import overlays
from cxr_jax.stages.base import STAGES, is_chief

COLORBAR = 'contribution to the decision (bits of evidence)'


def explained_split(config: ml_collections.ConfigDict) -> str:
  """The split whose box images the stage explains (config.explain.split, else test)."""
  return config.explain.split or config.data.eval_splits['test']


def box_examples(config: ml_collections.ConfigDict, split: str, n: int,
                 class_names: Sequence[str]) -> list[dict[str, Any]]:
  """The first n examples of `split` with a box of `class_names`: grey image [H, W] in [0, 1],
  labels [K], boxes [(class, (x, y, w, h) in pixels)]."""
  out = []
  for ex in pipeline.iterate_box_split(config.data, split, pp=''):
    image = ex['image'][..., 0].astype(np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    h, w = image.shape
    boxes = [(c, (b[1] * w, b[0] * h, (b[3] - b[1]) * w, (b[2] - b[0]) * h))
             for b, c in zip(ex['boxes'], ex['box_classes'], strict=True) if c in class_names]
    if not boxes:
      continue
    out.append({'image_id': ex['image_id'], 'image': image, 'labels': ex['labels'],
                'boxes': boxes})
    if len(out) >= n:
      break
  return out


@STAGES.register('explain')
def explain_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """PDA heat maps (and attention maps) of `config.report_models`: paper 000 Fig. 2/3.

  Run by process 0 alone (a handful of images), so only one host writes.
  """
  if not is_chief():
    return
  cfg = config.explain
  run = layout.Run(workdir)
  settings = inference.PDASettings.from_config(cfg.to_dict())
  models = []
  for stage, label in config.report_models:
    predictor = inference.load_predictor(workdir, stage)
    reference = inference.reference_maps(
        predictor, settings, inference.training_images(predictor, settings.num_reference))
    models.append((label, predictor, inference.fit_pda_sampler(settings, reference)))
  class_names = models[0][1].class_names
  split = explained_split(config)
  examples = box_examples(config, split, cfg.num_images, class_names)
  if not examples:
    raise ValueError(f'config.explain.split: no image of the {split!r} split has a ground-truth '
                     f'box of the classes {list(class_names)}; choose a split with boxes.')
  if len(examples) < cfg.num_images:
    logging.warning('explain: only %d images of the %r split have boxes (asked for %d).',
                    len(examples), split, cfg.num_images)
  index = []
  key = jax.random.key(cfg.seed)
  for i, ex in enumerate(examples):
    panels, attention_panels, record = [], [], {'image_id': ex['image_id'], 'models': {}}
    truth = [c for c, y in zip(class_names, ex['labels'], strict=True) if y > 0]
    for label, predictor, sampler in models:
      x = predictor.preprocess(ex['image'])
      probs, inter = predictor.run(x)
      findings = predictor.findings(probs)
      shown = truth or [predictor.class_names[int(np.argmax(probs))]]
      rel = inference.pda_heatmaps(predictor, x, sampler, settings, jax.random.fold_in(key, i))
      for c in shown:
        k = predictor.class_names.index(c)
        panels.append(overlays.Panel(
            rel[k], title=f'{label}: {c} (p={probs[k]:.2f})', findings=findings,
            boxes=[b for bc, b in ex['boxes'] if bc == c], colorbar_label=COLORBAR))
      if predictor.has_attention:
        for t, m in enumerate(predictor.attention_maps(inter)[0]):
          attention_panels.append(overlays.Panel(
              m, title=f'{label}: attention step {t + 1}', findings=findings,
              boxes=[b for _, b in ex['boxes']], colorbar_label='attention weight'))
      record['models'][label] = {'probabilities': dict(zip(
          predictor.class_names, map(float, probs), strict=True)), 'shown': shown}
    name = ex['image_id'].rsplit('.', 1)[0]
    files = [f'{name}.pda.png']
    overlays.overlay_grid(ex['image'], panels, ncols=len(models),
                          suptitle=f'{ex["image_id"]} ({split} split): PDA ({cfg.level}), '
                          f'truth: {", ".join(truth) or "none"}',
                          out_path=str(run.explain_dir / files[0]))
    if attention_panels:
      files.append(f'{name}.attention.png')
      overlays.overlay_grid(ex['image'], attention_panels, ncols=len(attention_panels),
                            suptitle=f'{ex["image_id"]} ({split} split): recurrent attention',
                            out_path=str(run.explain_dir / files[-1]))
    record['files'] = files
    index.append(record)
    logging.info('explain: %s (%d/%d)', ex['image_id'], i + 1, len(examples))
  run.write_explain_index({'level': cfg.level, 'split': split, 'images': index})
