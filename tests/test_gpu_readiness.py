"""What a first CUDA run would trip over, checked on the CPU (../shared/GPU-CHECKLIST.md)."""

from __future__ import annotations

import subprocess
import sys

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


def test_seeding_a_normal_run_does_not_import_the_compiler():
    """torch.use_deterministic_algorithms imports torch._inductor (1.4 s of every run's start) even to set
    what is already set."""
    code = ("import sys; from cnnlab.core.env import seed_everything; seed_everything(0); "
            "print('torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


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


def test_fp16_loss_scale_survives_a_resume(tmp_path):
    """Checklist 5: the GradScaler's state goes into the checkpoint, so a resumed fp16 run keeps its loss scale
    (and growth tracker) instead of searching for it again from 65536."""
    from cnnlab.train.checkpoints import load_checkpoint, restore_training, save_checkpoint

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    state = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2}
    scaler.load_state_dict(state)
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"epoch": 1}, None, scaler)
    tensors, meta = load_checkpoint(tmp_path)
    resumed = torch.amp.GradScaler("cpu")
    restore_training(tensors, meta, nn.Linear(3, 2), torch.optim.SGD(model.parameters(), lr=0.1),
                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), resumed)
    assert resumed.state_dict() == state


def test_frozen_features_on_a_gpu_model_use_pytorch_on_its_device():
    """Checklist 1: with the backbone on a GPU, `auto` extracts features in PyTorch on that device (ONNX Runtime
    would run on the CPU) and moves each CPU batch there. A model on the meta device stands in for CUDA."""
    from cnnlab.train.features import TorchEngine, make_engine

    lines = []
    engine = make_engine(nn.Linear(2, 2, device="meta"), "auto", 4, 8, torch.zeros(4, 3, 8, 8), 1, log=lines.append)
    assert isinstance(engine, TorchEngine) and engine.device.type == "meta"
    assert lines == ["features: PyTorch on meta"]


def test_a_training_step_reads_one_number_back_from_the_device(monkeypatch):
    """Checklist 8: each step reads back only its loss (to stop before a step on a non-finite loss); the loss sum
    and the right answers are summed on the device and read at the epoch's end. On a GPU every read makes
    the host wait for the device."""
    from cnnlab.train.loop import train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), None) for _ in range(20)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    result = train_one_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), "fp32",
                             torch.device("cpu"), 1, progress=False)
    monkeypatch.undo()
    assert result["status"] == "ok" and result["step"] == 20
    assert len(reads) == 20 + 1, reads  # one loss a step, then the epoch's sums once
