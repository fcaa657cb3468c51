"""TensorFlow only reads and preprocesses data here: keep it off the accelerators JAX owns.

Left alone, TensorFlow reserves most of a GPU's memory the first time it initialises its devices
(any op, any `tf.data` pipeline). Every code path that runs TensorFlow calls
`hide_accelerators()` first; this is the only place that does it.
"""

from absl import logging

_hidden = False


def hide_accelerators() -> None:
  """Makes GPUs (and TPUs) invisible to TensorFlow; a no-op after the first call."""
  global _hidden
  if _hidden:
    return
  import tensorflow as tf

  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError) as e:
      # RuntimeError: TF initialised its devices already (nothing more we can do here);
      # ValueError: this TF build has no such device type.
      if isinstance(e, RuntimeError):
        logging.warning('Could not hide %s devices from TensorFlow: %s', kind, e)
  _hidden = True
