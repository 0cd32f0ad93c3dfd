"""tiled_max_pool's forward as it is (`current`: each window's first maximum by argmax) against the
equality test it replaced (`equality`: the position of the first element equal to the window's
max), side by side in one process through benchmarks/cpu_step_ablation.py's runners.

    python pool_ablation.py --config=configs/model3.py --steps=8 --chunks=6
"""
import functools, sys, os
ROOT = os.environ.get('DSCONV_ROOT', '.')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks')); sys.path.insert(0, ROOT)
import jax, jax.numpy as jnp
import cpu_step_ablation as ab
from dsconv_jax import fast_grads as fg

def make(fwd):
  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def pool(x, window):
    return fwd(x, window)[0]
  pool.defvjp(fwd, fg._tiled_max_pool_bwd)
  return pool

def eq_fwd(x, window):
  xw = fg._windows(x, window)
  y = xw.max(axis=(2, 4))
  position = fg._window_positions(xw.shape, window)
  first = jnp.min(jnp.where(xw == y[:, :, None, :, None], position, jnp.iinfo(position.dtype).max), axis=(2, 4))
  return y, (first, x.shape)

ab.REPLACEMENTS['equality'] = {'tiled_max_pool': make(eq_fwd)}
ab.RUNNERS = {'current': ((), 'hash'), 'equality': (('equality',), 'hash')}
ab.cli.main(ab.main)
