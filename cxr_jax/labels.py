"""Class names of NIH ChestX-ray14, in the order every cxr_jax data set and model uses."""

NIH_CLASSES: tuple[str, ...] = (
    'Atelectasis',
    'Cardiomegaly',
    'Effusion',
    'Infiltration',
    'Mass',
    'Nodule',
    'Pneumonia',
    'Pneumothorax',
    'Consolidation',
    'Edema',
    'Emphysema',
    'Fibrosis',
    'Pleural_Thickening',
    'Hernia',
)

# Paper 000 drops Hernia (too rare) and keeps the other 13 in NIH order.
NIH13_CLASSES: tuple[str, ...] = tuple(c for c in NIH_CLASSES if c != 'Hernia')

# The eight findings that carry radiologist boxes in NIH's BBox_List_2017.csv.
BOX_CLASSES: tuple[str, ...] = (
    'Atelectasis',
    'Cardiomegaly',
    'Effusion',
    'Infiltration',
    'Mass',
    'Nodule',
    'Pneumonia',
    'Pneumothorax',
)

# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv.
BBOX_LIST_ALIASES: dict[str, str] = {'Infiltrate': 'Infiltration'}


def class_indices(names: tuple[str, ...] | list[str]) -> list[int]:
  """Positions of `names` in NIH_CLASSES; raises ValueError naming an unknown class."""
  unknown = [n for n in names if n not in NIH_CLASSES]
  if unknown:
    raise ValueError(f'Unknown class name(s) {unknown}; valid names: {list(NIH_CLASSES)}')
  return [NIH_CLASSES.index(n) for n in names]
