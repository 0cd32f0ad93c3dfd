"""Distillation: the loss, the teacher scoring the step's own batch, and a tiny teacher's run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsconv_jax import augment, experiment, inference, steps, train
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UserError


def test_distillation_loss_is_t_squared_kl_of_the_softened_outputs():
  student = jax.random.normal(jax.random.key(0), (4, 5))
  teacher = jax.random.normal(jax.random.key(1), (4, 5))
  p, q = jax.nn.softmax(teacher / 2.0), jax.nn.softmax(student / 2.0)
  expected = 4.0 * jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1)
  np.testing.assert_allclose(steps.distillation_loss(student, teacher, 2.0), expected, rtol=1e-5)
  np.testing.assert_allclose(steps.distillation_loss(teacher, teacher, 2.0), 0.0, atol=1e-6)


class Plain(nn.Module):
  """No BatchNorm or dropout: training and evaluation compute the same logits."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_the_teacher_scores_the_batch_the_student_sees():
  model = Plain()
  images = jax.random.randint(jax.random.key(1), (8, 8, 8, 3), 0, 255).astype(jnp.uint8)
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  state = steps.create_train_state(model, jax.random.key(0), (8, 8, 3), optax.sgd(0.5))
  kwargs = dict(mean=jnp.zeros(3), std=jnp.full(3, 255.0), augment=('flip', 'crop', 'cutout'),
                mix=augment.Mix('mixup', lambda step: jnp.float32(0.5)))
  step = jax.jit(lambda state, teacher: steps.train_step(state, images, labels, jax.random.key(2),
                                                         teacher=teacher, **kwargs),
                 static_argnums=1)
  # A teacher identical to the student, scoring the same augmented, mixed batch: the whole loss
  # is the distillation term, which is 0 with a zero gradient, so nothing moves.
  same = steps.Teacher(lambda x: model.apply({'params': state.params}, x), 1.0, 4.0)
  new, metrics = step(state, same)
  assert float(metrics['loss']) == pytest.approx(0.0, abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), new.params, state.params)
  other_params = model.init(jax.random.key(9), jnp.zeros((1, 8, 8, 3)))['params']
  other = steps.Teacher(lambda x: model.apply({'params': other_params}, x), 1.0, 4.0)
  moved, metrics = step(state, other)
  assert float(metrics['loss']) > 0
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved.params),
                                                   jax.tree.leaves(state.params)))


def tiny_config(folder, **overrides):
  config = get_testing_config()
  config.update(dict(dataset=f'folder:{folder}', train_examples=0, eval_examples=0, holdout=6),
                **overrides)
  return config


def test_a_tiny_teacher_run_distils_into_a_student_of_the_same_split(tmp_path, image_folder):
  teacher_dir = str(tmp_path / 'teacher')
  train.train_and_evaluate(tiny_config(image_folder, normalization='standardize'), teacher_dir,
                           quiet=True)
  student = tiny_config(image_folder, distill_workdir=teacher_dir, distill_weight=0.7,
                        augment='flip,crop')
  summary = train.train_and_evaluate(student, str(tmp_path / 'student'), quiet=True)
  assert summary['config']['distill_workdir'] == teacher_dir
  assert np.isfinite(summary['max_val_accuracy'])
  # A teacher that trained beside another holdout may have trained on this run's validation
  # images: refused before any work.
  data = experiment.load_data(tiny_config(image_folder, holdout=9))
  mesh = steps.create_mesh()
  zeros = steps.put_replicated(mesh, np.zeros(3, np.float32))
  with pytest.raises(UserError, match='same holdout and data_seed'):
    experiment.load_teacher(tiny_config(image_folder, holdout=9, distill_workdir=teacher_dir),
                            data, mesh, zeros, zeros, inference.load_run(teacher_dir))
  with pytest.raises(UserError, match='distill_weight'):
    experiment.validate_config(tiny_config(image_folder, distill_weight=1.5))
