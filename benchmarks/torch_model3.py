"""Source 000's Model 3 in PyTorch, and its train step: the peer of `dsconv_jax.throughput`.

    python -m dsconv_jax.throughput --config=configs/model3.py --peer=pytorch [--json]

The same layers in the same order as `dsconv_jax.models.DepthwisePointwiseNet` and the Keras
original: per block a depthwise 3x3 convolution (groups = channels, no bias), a 1x1 convolution (no
bias), ReLU, BatchNorm (Keras' momentum 0.99 is PyTorch's momentum=0.01; epsilon 1e-3) and dropout
(0.1, 0.2, 0.25 by stage), 2x2 max pooling twice, 1x1 transitions, global average pooling.
35,387 parameters counted the Keras way (BatchNorm running statistics included), 34,427
trainable. Kernels are glorot-uniform, as in Keras (fans as PyTorch computes them).

The train step is the recipe's: Adam (lr 0.01, Keras' epsilon 1e-7), softmax cross-entropy, the
same batch size, on uint8 images gathered from a tensor on the device and scaled by 1/255 in the
step, like ours. Runners: eager and `torch.compile`, each in NCHW and channels_last layout; the
throughput tool reports the fastest. PyTorch is a benchmark-only extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def build_model(num_classes: int = 10,
                dropout_rates: Sequence[float] = (0.1, 0.2, 0.25)) -> nn.Sequential:
  """Model 3 as an `nn.Sequential`, in the Keras original's layer order."""
  d1, d2, d3 = dropout_rates

  def block(c_in: int, c_out: int, rate: float, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_in, 3, padding=padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
            nn.Dropout(rate)]

  model = nn.Sequential(
      *block(3, 32, d1, padding=1),  # Keras padding='same' for a 3x3 kernel.
      *block(32, 64, d1),
      *block(64, 128, d1),
      nn.MaxPool2d(2),
      nn.Conv2d(128, 32, 1, bias=False),
      *block(32, 32, d2),
      *block(32, 64, d2),
      *block(64, 128, d2),
      nn.MaxPool2d(2),
      nn.Conv2d(128, 32, 1, bias=False),
      *block(32, 32, d3),
      nn.Conv2d(32, num_classes, 1, bias=False),
      nn.AdaptiveAvgPool2d(1),
      nn.Flatten(),
  )
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.xavier_uniform_(m.weight)
  return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
  """(total, trainable) the Keras way: BatchNorm running mean and variance count, as non-trainable."""
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  running = sum(b.numel() for name, b in model.named_buffers()
                if name.endswith(('running_mean', 'running_var')))
  return trainable + running, trainable


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                    channels_last: bool):
  """(uint8 NCHW images, labels) -> loss: one optimizer step of the recipe."""

  def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.float().div_(255.0)
    if channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    return F.cross_entropy(model(x), labels)

  def step(images, labels, forward=forward_loss):
    loss = forward(images, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  step.forward = forward_loss
  return step


class TorchRunner:
  """Chunks of `steps` train steps on synthetic data, in one layout, eager or compiled."""

  def __init__(self, *, batch_size: int, steps: int, image_size: int, seed: int,
               channels_last: bool, compiled: bool):
    self.name = f'{"torch.compile" if compiled else "eager"} ' \
                f'{"channels_last" if channels_last else "NCHW"}'
    self.batch_size, self.steps = batch_size, steps
    self.images_per_chunk = batch_size * steps
    self.image_size, self.seed = image_size, seed
    self.channels_last, self.compiled = channels_last, compiled
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

  def setup(self) -> float:
    torch.manual_seed(self.seed)
    generator = torch.Generator().manual_seed(self.seed)
    n, s = self.images_per_chunk, self.image_size
    self.images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8,
                                generator=generator).to(self.device)
    self.labels = torch.randint(0, 10, (n,), generator=generator).to(self.device)
    model = build_model().to(self.device)
    if self.channels_last:
      model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-7)
    self.step = make_train_step(model, optimizer, self.channels_last)
    if self.compiled:
      forward = torch.compile(self.step.forward)
      self.step = lambda images, labels, step=self.step: step(images, labels, forward=forward)
    self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
    t0 = time.perf_counter()
    self.run_chunk()  # Compiles (torch.compile) and warms up.
    return time.perf_counter() - t0

  def run_chunk(self) -> float:
    t0 = time.perf_counter()
    order = torch.randperm(self.images_per_chunk, device=self.device, generator=self.generator)
    for i in range(self.steps):
      idx = order[i * self.batch_size:(i + 1) * self.batch_size]
      self.step(self.images[idx], self.labels[idx])
    if self.device.type == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_runners(*, batch_size: int, steps: int, image_size: int = 32, seed: int = 0,
                 compiled: bool = True) -> list[TorchRunner]:
  """The variants to measure: eager and (with `compiled`) torch.compile, NCHW and channels_last."""
  modes = (False, True) if compiled else (False,)
  return [TorchRunner(batch_size=batch_size, steps=steps, image_size=image_size, seed=seed,
                      channels_last=cl, compiled=c) for c in modes for cl in (False, True)]


def versions() -> dict[str, str]:
  return {'torch': torch.__version__, 'torch_threads': str(torch.get_num_threads())}
