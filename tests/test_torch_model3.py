"""benchmarks/torch_model3.py: the PyTorch peer is Model 3 (skipped where PyTorch is absent)."""

import importlib.util
import os

import pytest

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location(
      'torch_model3', os.path.join(ROOT, 'benchmarks', 'torch_model3.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_parameter_count_is_model3s_keras_count():
  peer = _load()
  # Keras counts BatchNorm's moving mean and variance: 35,387 in all, 34,427 trainable.
  assert peer.count_parameters(peer.build_model()) == (35_387, 34_427)
  bns = [m for m in peer.build_model().modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)  # Keras' 0.99 and 1e-3.


@pytest.mark.parametrize('channels_last', [False, True])
def test_train_step_updates_the_model(channels_last):
  peer = _load()
  torch.manual_seed(0)
  model = peer.build_model()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-7)
  step = peer.make_train_step(model, optimizer, channels_last)
  images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
  labels = torch.randint(0, 10, (4,))
  before = [p.detach().clone() for p in model.parameters()]
  loss = step(images, labels)
  assert torch.isfinite(loss)
  assert model(images.float() / 255).shape == (4, 10)
  assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
