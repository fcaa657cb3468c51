"""The feature spec every cxr_jax chest X-ray classification data set shares.

One place, so that the pipeline, the evaluators and the explain stage read every builder the
same way: a grey PNG image, 14-hot labels in NIH_CLASSES order, patient metadata and boxes in
both TFDS's normalised convention and NIH BBox_List's pixel convention.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.labels import NIH_CLASSES


def classification_features(size: int, *, original_size: bool = False,
                            masks: bool = False) -> tfds.features.FeaturesDict:
  """Features of a [size, size, 1] data set; optional 'original_size' [2] (width, height) and
  'masks' [size, size, 3] uint8 0/255 (left lung, right lung, heart; anatomical sides)."""
  spec: dict[str, Any] = {
      'image_id': tfds.features.Text(),
      'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format='png'),
      'labels': tfds.features.Tensor(shape=(len(NIH_CLASSES),), dtype=np.float32),
      'no_finding': tfds.features.Tensor(shape=(), dtype=np.bool_),
      'patient_id': tfds.features.Scalar(np.int64),
      'follow_up': tfds.features.Scalar(np.int64),
      'age': tfds.features.Scalar(np.int64),
      'sex': tfds.features.ClassLabel(names=['M', 'F']),
      'view_position': tfds.features.ClassLabel(names=['PA', 'AP']),
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(),  # normalised (ymin, xmin, ymax, xmax)
          'bbox_xywh': tfds.features.Tensor(shape=(4,), dtype=np.float32),  # stored pixels
          'label': tfds.features.ClassLabel(names=NIH_CLASSES),
      }),
  }
  if original_size:
    spec['original_size'] = tfds.features.Tensor(shape=(2,), dtype=np.int64)
  if masks:
    spec['masks'] = tfds.features.Image(shape=(size, size, 3), dtype=np.uint8,
                                        encoding_format='png')
  return tfds.features.FeaturesDict(spec)
