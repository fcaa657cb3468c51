"""Heat-map overlays: bilinear upsampling, colour range, the figure's parts, atomic PNG writes."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cxr_jax.explain import overlays


def test_upsample_half_pixel_bilinear_matches_jax():
  heat = np.array([[0.0, 4.0], [8.0, 12.0]])
  up = overlays.upsample(heat, (4, 4))
  # Output centres sit at input coordinates -0.25, 0.25, 0.75, 1.25 (edges clamped).
  np.testing.assert_allclose(up[0], [0, 1, 3, 4])
  np.testing.assert_allclose(up[:, 0], [0, 2, 6, 8])
  rng = np.random.default_rng(0)
  heat = rng.normal(size=(7, 5))
  ours = overlays.upsample(heat, (28, 20))
  ref = jax.image.resize(jnp.asarray(heat), (28, 20), 'bilinear', antialias=False)
  np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)
  np.testing.assert_array_equal(overlays.upsample(heat, (7, 5)), heat)
  with pytest.raises(ValueError, match=r'\[h, w\]'):
    overlays.upsample(np.zeros((2, 2, 2)), (4, 4))


def test_value_range():
  assert overlays.value_range(np.array([-1.0, 3.0])) == (-3.0, 3.0)
  assert overlays.value_range(np.array([0.1, 0.4])) == (0.0, 0.4)
  assert overlays.value_range(np.zeros(3)) == (0.0, 1.0)
  assert overlays.value_range(np.array([np.nan])) == (0.0, 1.0)


def test_findings_text():
  assert overlays.findings_text(None) == ''
  assert overlays.findings_text([]) == 'Detected: no finding'
  assert overlays.findings_text([('Mass', 0.812), ('Nodule', 0.6)]) == (
      'Detected: Mass (0.81), Nodule (0.60)')


def _image() -> np.ndarray:
  yy, xx = np.mgrid[0:64, 0:80]
  return ((yy + xx) / (63 + 79)).astype(np.float32)


def test_overlay_heatmap_parts_and_png(tmp_path):
  heat = np.zeros((4, 5))
  heat[3, 0] = 2.0
  heat[0, 4] = -1.0
  out = tmp_path / 'sub' / 'o.png'
  fig = overlays.overlay_heatmap(_image(), heat, title='Mass', findings=[('Mass', 0.9)],
                                 boxes=[(10, 20, 15, 8)], out_path=out)
  ax, cax = fig.axes  # the X-ray and the colour bar
  assert ax.get_title() == 'Mass'
  assert cax.get_ylabel() == 'contribution to the decision'
  grey, jet = ax.get_images()
  assert grey.get_cmap().name == 'gray' and jet.get_cmap().name == 'jet'
  assert jet.get_array().shape == (64, 80)  # upsampled to the image
  assert jet.get_clim() == (-2.0, 2.0)
  [rect] = ax.patches
  assert rect.get_xy() == (10, 20) and rect.get_width() == 15 and rect.get_height() == 8
  assert rect.get_edgecolor()[:3] == (1.0, 0.0, 0.0)
  assert [t.get_text() for t in ax.texts] == ['Detected: Mass (0.90)']
  png = Image.open(out)
  assert png.format == 'PNG' and png.size[0] > 300
  assert [p.name for p in out.parent.iterdir()] == ['o.png']  # no temp file left behind
  # Red is drawn where the heat is highest (bottom left), blue where it is lowest.
  rgb = np.asarray(Image.open(io.BytesIO(overlays.png_bytes(fig))).convert('RGB'), np.int32)
  assert (rgb[..., 0] > 150).any() and (rgb[..., 2] > 150).any()


def test_overlay_without_colorbar_or_findings():
  fig = overlays.overlay_heatmap(_image(), np.ones((2, 2)), colorbar=False)
  [ax] = fig.axes
  assert len(ax.texts) == 0 and len(ax.patches) == 0


def test_overlay_grid(tmp_path):
  image = _image()
  panels = [overlays.Panel(np.eye(4), title=f'class {i}', findings=[]) for i in range(5)]
  panels.append(overlays.Panel(np.eye(4) * 7, title='other image', image=image[::2, ::2]))
  fig = overlays.overlay_grid(image, panels, ncols=3, suptitle='grid', shared_range=True,
                              out_path=tmp_path / 'g.png')
  image_axes = [ax for ax in fig.axes if ax.get_title()]
  assert [ax.get_title() for ax in image_axes] == [p.title for p in panels]
  assert all(ax.get_images()[1].get_clim() == (0.0, 7.0) for ax in image_axes)
  assert image_axes[-1].get_images()[1].get_array().shape == (32, 40)
  assert Image.open(tmp_path / 'g.png').format == 'PNG'
  with pytest.raises(ValueError, match='at least one'):
    overlays.overlay_grid(image, [])
  with pytest.raises(ValueError, match='needs an image'):
    overlays.overlay_grid(None, panels[:1])


def test_failed_render_leaves_no_file(tmp_path, monkeypatch):
  fig = overlays.overlay_heatmap(_image(), np.ones((2, 2)))

  def boom(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(overlays.os, 'replace', boom)
  with pytest.raises(OSError, match='disk full'):
    overlays.save_png(fig, tmp_path / 'x.png')
  assert list(tmp_path.iterdir()) == []


def test_predicted_boxes_black_ground_truth_red():
  image = np.full((64, 80), 0.9, np.float32)  # light background: black lines stand out
  fig = overlays.overlay_heatmap(image, np.ones((2, 2)), boxes=[(10, 20, 15, 8)],
                                 pred_boxes=[(40, 10, 30, 40)], colorbar=False)
  [ax] = fig.axes
  gt, pred = ax.patches
  assert gt.get_edgecolor()[:3] == (1.0, 0.0, 0.0)
  assert pred.get_edgecolor()[:3] == (0.0, 0.0, 0.0)
  assert pred.get_xy() == (40, 10) and pred.get_width() == 30 and pred.get_height() == 40
  rgb = np.asarray(Image.open(io.BytesIO(overlays.png_bytes(fig))).convert('RGB'), np.int32)
  assert (rgb.max(axis=-1) < 40).any()  # black pixels drawn
  grid = overlays.overlay_grid(image, [overlays.Panel(np.ones((2, 2)), title='a',
                                                      pred_boxes=[(1, 2, 3, 4)])])
  [edge] = grid.axes[0].patches
  assert edge.get_edgecolor()[:3] == (0.0, 0.0, 0.0)
