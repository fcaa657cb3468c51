r"""`python -m cxr_jax.serve`: the viewer's command line (see cxr_jax/serve/__init__.py).

  python -m cxr_jax.serve --workdir=RUN [--workdir=RUN2[:STAGE] ...] [--segmentation=UNET_RUN]
      [--host=127.0.0.1] [--port=8000] [--allow_remote] [--max_upload_mb=64]
      [--decode_timeout=30] [--pda_reference=FOLDER]

Each --workdir is a run of `python -m cxr_jax.main`, optionally `:STAGE` for a training stage
other than its last (e.g. RUN:train_classifier beside RUN for without vs with attention); the
models are loaded once, side by side on the page. The server binds to 127.0.0.1: another
--host needs --allow_remote too, and prints a warning (no authentication, no TLS: anyone who
reaches the port can upload images and read the results). Exit status 2 for usage errors.
"""

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

LOOPBACK_NAMES = ('localhost',)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m cxr_jax.serve',
      description='A local web page for findings and heat maps of your own chest X-rays.')
  parser.add_argument('--workdir', action='append', required=True,
                      help='run folder (repeat for runs side by side); RUN:STAGE picks a stage')
  parser.add_argument('--segmentation', default=None,
                      help='lung/heart segmentation run (paper 004) to outline the anatomy')
  parser.add_argument('--host', default='127.0.0.1', help='address to bind (default loopback)')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--allow_remote', action='store_true',
                      help='allow a --host other than loopback (no authentication!)')
  parser.add_argument('--max_upload_mb', type=float, default=64.0,
                      help='larger uploads are refused')
  parser.add_argument('--decode_timeout', type=float, default=30.0,
                      help='seconds a worker may spend decoding one upload')
  parser.add_argument('--pda_reference', default=None,
                      help="folder of X-rays to fit PDA's sampler on (default: the training "
                      'split of each run)')
  parser.add_argument('--verbose', action='store_true', help='log library INFO lines too')
  return parser.parse_args(list(argv)[1:])


def is_loopback(host: str) -> bool:
  if host in LOOPBACK_NAMES:
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


def check_host(host: str, allow_remote: bool) -> str | None:
  """None when binding `host` is allowed; else the usage error. Prints the remote warning."""
  if is_loopback(host):
    return None
  if not allow_remote:
    return (f'--host={host} would make the viewer reachable from other machines; it has no '
            'authentication. Add --allow_remote if that is what you want.')
  print(f'WARNING: serving on {host}: anyone who can reach this port can upload images, see '
        'the findings and use this machine\'s CPU; there is no authentication and no TLS. Use '
        'it only on a network you trust.', file=sys.stderr)
  return None


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  problem = check_host(args.host, args.allow_remote)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  if args.max_upload_mb <= 0 or args.decode_timeout <= 0:
    print('error: --max_upload_mb and --decode_timeout must be positive.', file=sys.stderr)
    return 2
  from absl import logging as absl_logging

  from cxr_jax.inference import RunError
  from cxr_jax.serve import app as app_lib
  from cxr_jax.serve import service
  absl_logging.set_verbosity(absl_logging.INFO if args.verbose else absl_logging.WARNING)
  try:
    viewer = service.load_viewer(args.workdir, args.segmentation,
                                 pda_reference=args.pda_reference,
                                 max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                                 decode_timeout_s=args.decode_timeout)
  except RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  hosts = ('*',) if not is_loopback(args.host) else app_lib.LOCAL_HOSTS
  app = app_lib.create_app(viewer, allowed_hosts=hosts)
  import uvicorn
  shown = f'[{args.host}]' if ':' in args.host else args.host
  print(f'cxr_jax viewer: http://{shown}:{args.port}/ ({len(viewer.runs)} model(s)); '
        'Ctrl-C stops it.', file=sys.stderr)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
  finally:
    viewer.close()
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
