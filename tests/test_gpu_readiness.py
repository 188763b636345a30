"""What a first CUDA run would trip over, checked on the CPU (../shared/GPU-CHECKLIST.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.core.env import seed_everything
from cnnlab.core.errors import UserError
from cnnlab.models import create_model
from cnnlab.train import distributed


@pytest.fixture
def kernel_flags():
    """Restore the process-wide kernel switches a test changes."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[1:]


def test_seeding_sets_the_kernels_both_ways(kernel_flags):
    """A deterministic training followed by a normal one in the same process (a study, the tests) must not
    leave the second deterministic and slow, nor a fast one leave a deterministic one unrepeatable."""
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("name", ["fastnet", "fastnet_m", "fastnet_l"])
def test_the_default_networks_have_no_pooling_without_a_deterministic_cuda_backward(name):
    """`--deterministic` on CUDA refuses adaptive pooling's backward; the fast networks pool with amax."""
    model = create_model(name, 10, 32)
    assert not [m for m in model.modules() if isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d))]
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model.train()(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_more_processes_than_gpus_is_a_user_error(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)

    def no_group(*args, **kwargs):
        raise AssertionError("the process group must not be joined")

    monkeypatch.setattr(distributed.dist, "init_process_group", no_group)
    monkeypatch.setattr(torch.cuda, "set_device", no_group)
    with pytest.raises(UserError, match="started 2 processes on this machine, which has 1 GPUs; use --nproc-per-node 1"):
        distributed.setup()
