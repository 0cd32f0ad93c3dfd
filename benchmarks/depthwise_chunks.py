"""The depthwise kernel gradient's chunk size on the CPU: one layer's kernel gradient, compiled,
at each chunk of the batch, against one pass over the whole batch per tap (and, for scale, the
layer's forward pass and input gradient).

    python benchmarks/depthwise_chunks.py [--batch=128] [--repeats=7] > chunks.json

For each layer shape (DS-ResNet's three stages at 3x3 and 5x5 taps) it times the forward pass
(`fast_grads.shifted_taps`), the input gradient alone, `fast_grads._taps_kernel_grad` (one pass
per tap) and `fast_grads._taps_kernel_grad_blocked` with `_CHUNK_BYTES` set to admit 1, 2, 4, 8
and 16 images a chunk (best of `--repeats` calls taken in turn, milliseconds) and prints one JSON
object. `_CHUNK_BYTES` is chosen from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from dsconv_jax import fast_grads, reporting  # pylint: disable=wrong-import-position,protected-access

SHAPES = ((32, 30), (16, 90), (8, 120))  # (map size, channels) of the stages.
CHUNKS = (1, 2, 4, 8, 16)  # Images a chunk.


def best_ms(fns: dict, repeats: int) -> dict:
  """Best-of-`repeats` milliseconds of each compiled call in `fns` (name -> (fn, args)), the
  calls taken in turn so that a change in the machine's load hits each alike."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * min(t) for name, t in times.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  for k in (3, 5):
    for size, channels in SHAPES:
      x = jnp.asarray(rng.normal(size=(args.batch, size + k - 1, size + k - 1, channels)),
                      jnp.float32)
      dy = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
      kernel = jnp.asarray(rng.normal(size=(k, k, channels)), jnp.float32)
      kw = dict(taps=(k, k), dilation=(1, 1), strides=(1, 1))
      forward = lambda x, w: fast_grads.shifted_taps(x, w, (1, 1), (1, 1))
      input_grad = lambda x, w, d: jax.vjp(lambda x: forward(x, w), x)[1](d)
      fns = {'forward': (jax.jit(forward), (x, kernel)),
             'input_grad': (jax.jit(input_grad), (x, kernel, dy)),
             'per_tap': (jax.jit(lambda x, d: fast_grads._taps_kernel_grad(x, d, **kw)), (x, dy))}
      for images in CHUNKS:
        # The chunk size is read while tracing: each function is compiled with its own.
        fast_grads._CHUNK_BYTES = images * x[0].nbytes
        fn = jax.jit(lambda x, d: fast_grads._taps_kernel_grad_blocked(x, d, **kw))
        jax.block_until_ready(fn(x, dy))
        fns[images] = (fn, (x, dy))
      ms = best_ms(fns, args.repeats)
      row = {'taps': k, 'map': size, 'channels': channels, 'image_kib': x[0].nbytes / 1024,
             'forward_ms': ms['forward'], 'input_grad_ms': ms['input_grad'],
             'per_tap_ms': ms['per_tap'], 'chunked_ms': {n: ms[n] for n in CHUNKS}}
      print(json.dumps(row), file=sys.stderr, flush=True)
      rows.append(row)
  print(json.dumps({'batch': args.batch, 'repeats': args.repeats, 'rows': rows,
                    'device': reporting.device_description(), 'versions': reporting.versions()},
                   indent=2))


if __name__ == '__main__':
  main()
