r"""Load test of the viewer: N requests from C concurrent clients against `python -m cxr_jax.serve`.

  python benchmarks/serve_load.py --workdir=RUN [--workdir=RUN2] --image=FILE [--image=FILE2]
      [--requests=50] [--clients=8] [--heatmap=cam] [--json]

Starts the server as its users do (a subprocess on a free loopback port), waits until it
answers, then sends `--requests` uploads of the given images (round robin) from `--clients`
threads, each upload followed by a heat-map request of `--heatmap` for the most probable class
when given. Prints the latency percentiles (p50, p95, max) of each kind of request, the
throughput, and the number of errors; every request must be answered with 200. The first
request of each kind is a warm-up outside the statistics (compilation).
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import httpx
import numpy as np


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', action='append', required=True)
  parser.add_argument('--image', action='append', required=True)
  parser.add_argument('--requests', type=int, default=50)
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--heatmap', default='', help="e.g. 'cam': also request a heat map")
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv[1:])
  port = free_port()
  cmd = [sys.executable, '-m', 'cxr_jax.serve', f'--port={port}',
         *(f'--workdir={w}' for w in args.workdir)]
  t0 = time.time()
  server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  base = f'http://127.0.0.1:{port}'
  try:
    while True:
      try:
        if httpx.get(base + '/api/info', timeout=5).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if server.poll() is not None:
        print(server.stderr.read()[-3000:], file=sys.stderr)
        return 1
      time.sleep(0.5)
    startup = time.time() - t0
    images = [(os.path.basename(p), open(p, 'rb').read()) for p in args.image]

    def one(i: int) -> list[tuple[str, float, int]]:
      name, data = images[i % len(images)]
      out = []
      with httpx.Client(base_url=base, timeout=300) as c:
        t = time.perf_counter()
        r = c.post('/api/analyze', content=data,
                   headers={'X-Filename': urllib.parse.quote(name)})
        out.append(('analyze', time.perf_counter() - t, r.status_code))
        if args.heatmap and r.status_code == 200:
          rows = r.json()['runs'][0]['rows']
          top = max(rows, key=lambda row: row['probability'])['name']
          t = time.perf_counter()
          h = c.get(f'/api/analyses/{r.json()["id"]}/runs/0/heatmap/{args.heatmap}',
                    params={'cls': top})
          out.append((f'heatmap ({args.heatmap})', time.perf_counter() - t, h.status_code))
      return out

    one(0)  # warm-up
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
      results = [x for xs in pool.map(one, range(args.requests)) for x in xs]
    wall = time.perf_counter() - t
  finally:
    server.terminate()
    server.wait(30)
  rows = []
  for kind in dict.fromkeys(k for k, _, _ in results):
    lat = np.asarray([s for k, s, _ in results if k == kind])
    errors = sum(1 for k, _, code in results if k == kind and code != 200)
    rows.append({'request': kind, 'n': int(len(lat)), 'errors': errors,
                 'p50_s': float(np.percentile(lat, 50)), 'p95_s': float(np.percentile(lat, 95)),
                 'max_s': float(lat.max())})
  result = {'workdirs': args.workdir, 'images': [n for n, _ in images],
            'clients': args.clients, 'requests': args.requests, 'wall_s': round(wall, 2),
            'uploads_per_s': round(args.requests / wall, 2),
            'server_startup_s': round(startup, 1), 'cpus': os.cpu_count(), 'rows': rows}
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(f'{args.requests} uploads from {args.clients} clients in {wall:.1f} s '
          f'({result["uploads_per_s"]} uploads/s; server start-up {startup:.0f} s; '
          f'{os.cpu_count()} CPUs)')
    print('| request | n | errors | p50 | p95 | max |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for r in rows:
      print(f'| {r["request"]} | {r["n"]} | {r["errors"]} | {r["p50_s"]:.2f} s | '
            f'{r["p95_s"]:.2f} s | {r["max_s"]:.2f} s |')
  return 0 if all(r['errors'] == 0 for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
