"""resnet_fast.models: torchvision parity of the ImageNet ResNets, the paper's CIFAR ResNets,
the ``weights=`` argument, and torch.compile without graph breaks.

CPU, float64 for exact comparisons, small images (32x32) and batches (2-4).
"""

from __future__ import annotations

import copy
import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.models as tvm
from model_checks import assert_close64, compare_eval, compare_training_step, images, randomize_batch_norms
from torch import nn

import resnet_fast
from resnet_fast import models
from resnet_fast.models import CifarResNet, PadShortcut
from resnet_fast.nn import BasicBlock, BatchNormAct2d, Bottleneck

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


# ----------------------------------------------------------------------------- helpers


def assert_same_state_dict_layout(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert sa[key].dtype == sb[key].dtype, key


def seeded(builder, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return builder(**kwargs)


# ------------------------------------------------------------------- ImageNet models


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_matches_torchvision_state_dict_init_and_eval(name):
    ours = seeded(getattr(models, name))
    ref = seeded(getattr(tvm, name))
    assert isinstance(ours, models.ResNet)
    # Same names, shapes and dtypes, in the same order ...
    assert_same_state_dict_layout(ours, ref)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    # ... and the same initialisation scheme: with one seed, bit-identical weights.
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), f"{key} initialised differently from torchvision"
    assert all(type(m) is BatchNormAct2d for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    # torchvision's weights into ours and ours into torchvision's, both strict.
    randomize_batch_norms(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    # One float64 eval forward (a single image for the deep ones, to stay fast).
    compare_eval(ours.double(), ref.double(), images(1 if name in ("resnet101", "resnet152") else 2))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_training_step_matches_torchvision(name):
    ref = randomize_batch_norms(seeded(getattr(tvm, name)).double())
    ours = getattr(models, name)().double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, target = images(4), torch.tensor([3, 1, 4, 1])
    compare_training_step(ours, ref, x, target)


def test_imagenet_norm_layer_batch_norm2d_matches_torchvision():
    ours = seeded(models.resnet18, norm_layer=nn.BatchNorm2d).double()
    ref = seeded(tvm.resnet18).double()
    assert all(type(m) is nn.BatchNorm2d for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    assert_same_state_dict_layout(ours, ref)
    randomize_batch_norms(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, target = images(4, seed=5), torch.tensor([0, 9, 8, 7])
    compare_eval(ours, ref, x)
    compare_training_step(ours, ref, x, target)


def test_imagenet_num_classes():
    model = models.resnet18(num_classes=10)
    assert model.fc.weight.shape == (10, 512)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_imagenet_zero_init_residual(name, last):
    ours = seeded(getattr(models, name), zero_init_residual=True)
    ref = seeded(getattr(tvm, name), zero_init_residual=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    block_type = BasicBlock if last == "bn2" else Bottleneck
    blocks = [m for m in ours.modules() if isinstance(m, block_type)]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last).weight) == 0
        assert torch.all(block.bn1.weight == 1)
        if block.downsample is not None:
            assert torch.all(block.downsample[1].weight == 1)
    assert torch.all(ours.bn1.weight == 1)


def test_imagenet_groups_and_width_match_resnext():
    ours = seeded(models.resnet50, groups=32, width_per_group=4)
    ref = seeded(tvm.resnext50_32x4d)
    assert ours.layer1[0].conv2.groups == 32
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), key
    assert list(ours.state_dict()) == list(ref.state_dict())
    randomize_batch_norms(ref.double())
    ours.double().load_state_dict(ref.state_dict(), strict=True)
    compare_eval(ours, ref, images(1, seed=3))


@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2"])
def test_imagenet_variant_builders_match_torchvision_layout(name):
    assert_same_state_dict_layout(getattr(models, name)(), getattr(tvm, name)())


def test_imagenet_builder_refuses_conflicting_fixed_kwargs():
    with pytest.raises(ValueError, match="groups"):
        models.resnext50_32x4d(groups=8)


def test_imagenet_replace_stride_with_dilation():
    kwargs = {"replace_stride_with_dilation": [False, True, True]}
    ours = seeded(models.resnet50, **kwargs)
    ref = seeded(tvm.resnet50, **kwargs)
    assert ours.layer4[1].conv2.dilation == (4, 4) and ours.layer4[0].conv2.stride == (1, 1)
    assert_same_state_dict_layout(ours, ref)
    randomize_batch_norms(ref.double())
    ours.double().load_state_dict(ref.state_dict(), strict=True)
    compare_eval(ours, ref, images(1, seed=4))
    with pytest.raises(ValueError, match="3-element"):
        models.resnet18(replace_stride_with_dilation=[True])


# --------------------------------------------------------------------- weights=


@pytest.fixture(scope="module")
def resnet18_state():
    return {k: v.clone() for k, v in randomize_batch_norms(seeded(tvm.resnet18, seed=7)).state_dict().items()}


def _assert_loaded(model: nn.Module, state) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_state_dict(resnet18_state):
    _assert_loaded(models.resnet18(weights=resnet18_state), resnet18_state)


@pytest.mark.parametrize("as_str", [True, False])
def test_weights_file_path(tmp_path, resnet18_state, as_str):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    _assert_loaded(models.resnet18(weights=str(path) if as_str else path), resnet18_state)


def test_weights_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.resnet18(weights=missing)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.resnet20(weights=str(missing))


def test_weights_wrong_type_and_wrong_content(tmp_path):
    with pytest.raises(TypeError, match="weights must be"):
        models.resnet18(weights=42)
    with pytest.raises(TypeError, match="weights must be"):
        models.resnet56(weights=[1, 2])
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(TypeError, match="not a state dict"):
        models.resnet18(weights=path)
    with pytest.raises(RuntimeError, match="fc.weight"):  # strict loading: shape mismatch
        models.resnet18(weights=models.resnet18(num_classes=10).state_dict())


@pytest.fixture
def fake_download(monkeypatch, resnet18_state):
    """Stand-in for torchvision's download: records the call, never touches the network."""
    calls = []

    def load_state_dict_from_url(url, *args, **kwargs):
        calls.append((url, args, kwargs))
        return resnet18_state

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", load_state_dict_from_url)
    return calls


def test_weights_torchvision_enum(fake_download, resnet18_state):
    model = models.resnet18(weights=tvm.ResNet18_Weights.IMAGENET1K_V1, progress=False)
    _assert_loaded(model, resnet18_state)
    assert model.fc.out_features == 1000
    assert len(fake_download) == 1
    url, args, kwargs = fake_download[0]
    assert url == tvm.ResNet18_Weights.IMAGENET1K_V1.url
    assert kwargs == {"progress": False, "check_hash": True}
    # By name, as torchvision's builders accept.
    _assert_loaded(models.resnet18(weights="DEFAULT"), resnet18_state)
    _assert_loaded(models.resnet18(weights="ResNet18_Weights.IMAGENET1K_V1"), resnet18_state)
    assert len(fake_download) == 3


def test_weights_enum_errors(fake_download):
    with pytest.raises(ValueError, match="num_classes=10"):
        models.resnet18(weights=tvm.ResNet18_Weights.IMAGENET1K_V1, num_classes=10)
    with pytest.raises(TypeError, match="ResNet18_Weights"):
        models.resnet18(weights=tvm.ResNet50_Weights.IMAGENET1K_V2)
    with pytest.raises(TypeError, match="no torchvision pretrained weights"):
        models.resnet20(weights=tvm.ResNet18_Weights.IMAGENET1K_V1)
    assert fake_download == []  # every error came before any download


# ------------------------------------------------------------------------- CIFAR


CIFAR = [("resnet20", 3, 0.27e6), ("resnet32", 5, 0.46e6), ("resnet44", 7, 0.66e6),
         ("resnet56", 9, 0.85e6), ("resnet110", 18, 1.7e6), ("resnet1202", 200, 19.4e6)]


def weighted_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, n, params", CIFAR)
def test_cifar_depth_and_parameter_count(name, n, params):
    model = getattr(models, name)()
    assert isinstance(model, CifarResNet)
    assert weighted_layers(model) == 6 * n + 2 == model.depth
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    # The paper's Table 6 rounds: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M.
    tolerance = 0.02 if params < 1e6 else 0.03
    assert abs(num_params(model) - params) <= tolerance * params, num_params(model)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_shapes(shortcut):
    model = models.resnet20(shortcut=shortcut)
    shapes = {}
    for stage in ("layer1", "layer2", "layer3"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: shapes.__setitem__(s, tuple(o.shape)))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}
    assert models.resnet20(num_classes=100).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_cifar_shortcut_options():
    a, b = models.resnet20(shortcut="A"), models.resnet20(shortcut="B")
    shortcuts_a = [blk.downsample for stage in (a.layer1, a.layer2, a.layer3) for blk in stage]
    assert [type(s) for s in shortcuts_a] == [type(None)] * 3 + [PadShortcut, type(None), type(None)] * 2
    assert all(num_params(s) == 0 for s in shortcuts_a if s is not None)
    projections = [blk.downsample for stage in (b.layer1, b.layer2, b.layer3) for blk in stage
                   if blk.downsample is not None]
    assert len(projections) == 2
    assert all(isinstance(p, nn.Sequential) and isinstance(p[0], nn.Conv2d) and p[0].kernel_size == (1, 1)
               and isinstance(p[1], BatchNormAct2d) for p in projections)
    # 16->32 and 32->64 1x1 convolutions, plus their BatchNorms' weight and bias.
    assert num_params(b) - num_params(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert sum(isinstance(m, nn.Conv2d) for m in b.modules()) == 19 + 2  # 19 convolutions + fc = 20


def test_pad_shortcut():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 100, -4, 20.0, "20", True])
def test_cifar_invalid_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


def test_cifar_invalid_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        models.resnet20(shortcut="C")


def _reference_cifar_forward(model: CifarResNet, x: torch.Tensor) -> torch.Tensor:
    """The paper's network written with plain torch functionals over ``model``'s tensors."""

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, m.training, m.momentum, m.eps)

    out = F.relu(bn(model.bn1, F.conv2d(x, model.conv1.weight, padding=1)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            h = F.relu(bn(block.bn1, F.conv2d(out, block.conv1.weight, stride=block.stride, padding=1)))
            h = bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1))
            if block.downsample is None:
                shortcut = out
            elif isinstance(block.downsample, PadShortcut):
                sub = out[:, :, ::2, ::2]
                shortcut = torch.cat([sub, torch.zeros_like(sub)], dim=1)  # channels double
            else:
                conv, norm = block.downsample
                shortcut = bn(norm, F.conv2d(out, conv.weight, stride=2))
            out = F.relu(h + shortcut)
    return F.linear(out.mean((2, 3)), model.fc.weight, model.fc.bias)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_matches_functional_reference(shortcut):
    model = randomize_batch_norms(seeded(models.resnet20, shortcut=shortcut).double())
    ref = copy.deepcopy(model)
    x, target = images(4, seed=11), torch.tensor([0, 1, 2, 3])
    for training in (True, False):
        model.train(training)
        ref.train(training)
        out, out_ref = model(x), _reference_cifar_forward(ref, x)
        assert_close64(out, out_ref, f"logits (training={training})")
        F.cross_entropy(out, target).backward()
        F.cross_entropy(out_ref, target).backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_close64(p.grad, q.grad, f"grad of {name}")
        for (name, b), c in zip(model.named_buffers(), ref.buffers()):
            if not name.endswith("num_batches_tracked"):  # F.batch_norm does not count
                assert_close64(b, c, f"buffer {name}")
    assert int(model.bn1.num_batches_tracked) == 4  # 3 from randomize + one training step


def test_cifar_weights_state_dict_and_path(tmp_path):
    source = randomize_batch_norms(seeded(models.resnet32, seed=3))
    state = source.state_dict()
    _assert_loaded(models.resnet32(weights=state), state)
    path = tmp_path / "resnet32.pt"
    torch.save(state, path)
    _assert_loaded(models.resnet32(weights=path), state)
    with pytest.raises(RuntimeError):  # strict: option B has extra keys
        models.resnet32(weights=state, shortcut="B")


def test_cifar_init():
    model = seeded(models.resnet56)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    std = model.layer3[0].conv2.weight.std().item()
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.1 * std  # kaiming normal, fan_out, ReLU gain


def test_top_level_exports():
    for name in IMAGENET + [name for name, _, _ in CIFAR]:
        assert getattr(resnet_fast, name) is getattr(models, name)


# ------------------------------------------------------------------- torch.compile


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.resnet20()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph breaks
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    loss = F.cross_entropy(compiled(x), target)
    loss.backward()
    loss_eager = F.cross_entropy(eager(x), target)
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")

    model.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_fullgraph_aot_eager():
    """AOTAutograd traces the custom ops' fake kernels and autograd formulas end to end."""
    _compile_check("aot_eager")


@pytest.mark.skipif(os.environ.get("RESNET_FAST_SKIP_INDUCTOR") == "1",
                    reason="RESNET_FAST_SKIP_INDUCTOR=1")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_torch_compile_fullgraph_inductor():
    """Inductor generates C++ around the custom ops (about 30 s cold on 2 CPU cores)."""
    start = time.perf_counter()
    _compile_check("inductor")
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")
