r"""A local web viewer: drop in a chest X-ray, see findings, heat maps, boxes and outlines.

  python -m cxr_jax.serve --workdir=RUN [--workdir=RUN2 ...] [--segmentation=UNET_RUN] \
      [--host=127.0.0.1] [--port=8000]

- `__main__.py`: the command line (flags, safety checks, uvicorn).
- `service.py`: `Viewer`, what the page asks for, without HTTP: models loaded once, analyses of
  uploads, heat maps and their boxes, cancellable jobs (PDA), outlines, downloads.
- `methods.py`: the registry of heat-map methods (attention, CAM, Grad-CAM, PDA; add more).
- `decode.py`: content sniffing and decoding in worker processes with time and memory limits.
- `app.py`: the Starlette routes; `static/`: the page (plain HTML, CSS, JavaScript; no build
  step, nothing loaded from the network).

Importing this package imports nothing heavy: spawned decoding workers import `decode.py`.
"""
