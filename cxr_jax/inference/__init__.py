"""The inference layer: trained runs read back, models restored for use, heat maps wired.

Every consumer of a trained model goes through here: the stages that evaluate, localise,
explain and mine hard examples, `python -m cxr_jax.predict`, `python -m cxr_jax.report` and the
viewer. None of them imports the training loop or a command line.

- `run`: reading a run (config back as a validated ConfigDict, a stage's model description
  as `ModelInfo`), params-only restore of a stage's best checkpoint, the operating point
  (thresholds).
- `predictor`: `Predictor` (preprocess, batched predict, sown maps, the functions explanations
  re-evaluate) and `load_predictor`.
- `explanations`: CAM / Grad-CAM and their boxes, PDA settings, sampler and heat maps.
- `segmentation`: `Segmenter` / `load_segmenter`: paper 004's lung/heart U-Net on X-rays of any
  size (probabilities, masks, the global mask M_g in the image's own frame).

Importing it does not import TensorFlow: `Predictor.preprocess` and the PDA reference data load
it when they run, after hiding the accelerators from it (cxr_jax/data/tf_devices.py).
"""

from cxr_jax.inference.explanations import (
    PDASettings,
    box_settings,
    class_activation_boxes,
    class_heatmaps,
    fit_pda_sampler,
    heatmap_boxes,
    laplace_n,
    pda_heatmaps,
    predict_boxes,
    reference_maps,
    training_images,
)
from cxr_jax.inference.predictor import Predictor, find_sown, load_predictor
from cxr_jax.inference.run import (
    ModelInfo,
    OperatingPoint,
    RunError,
    abstract_variables,
    build,
    check_stage,
    default_stage,
    operating_point,
    read_config,
    read_model_info,
    restore_model,
)
from cxr_jax.inference.segmentation import Segmenter, load_segmenter

__all__ = [
    'ModelInfo', 'OperatingPoint', 'PDASettings', 'Predictor', 'RunError', 'abstract_variables',
    'box_settings', 'build', 'check_stage', 'class_activation_boxes', 'class_heatmaps',
    'default_stage', 'find_sown', 'fit_pda_sampler', 'heatmap_boxes', 'laplace_n',
    'load_predictor', 'load_segmenter', 'operating_point', 'pda_heatmaps', 'predict_boxes',
    'read_config', 'read_model_info', 'reference_maps', 'restore_model', 'Segmenter',
    'training_images',
]
