"""resnet_fast.convert on timm's ResNet family (timm.models.resnet).

Converted models must match the originals in float64 on CPU (eval logits; loss, every
gradient, running statistics and updated parameters after a training step), share
parameters and buffers, keep state-dict keys, be idempotent, run the fused operators
where they can, and leave what they cannot fuse (attention, active drop-path, other
activations) running as timm runs it, reported once per kind.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from model_checks import assert_close64, compare_eval, compare_training_step, images, randomize_batch_norms
from test_convert import convert_checked
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast.nn import BatchNormAct2d, TimmBasicBlock, TimmBottleneck

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm, or resnet_fast[test])")
from timm.models import resnet as timm_resnet  # noqa: E402


class OpRecorder(TorchDispatchMode):
    """Counts the ``resnet_fast`` operators a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("resnet_fast."):
            self.calls[name.split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def torch_backend():
    """The reference composition of the fused operators, so a CPU run calls them."""
    previous = resnet_fast.get_backend()
    resnet_fast.set_backend("torch")
    yield
    resnet_fast.set_backend(previous)


def tiny_resnet(block: str = "BasicBlock", **kwargs) -> torch.nn.Module:
    """A timm ResNet with one block per stage (fast on CPU)."""
    block_cls = getattr(timm_resnet, block)
    torch.manual_seed(0)
    model = timm_resnet.ResNet(block_cls, (1, 1, 1, 1), num_classes=10, **kwargs)
    return randomize_batch_norms(model.double())


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


@pytest.mark.parametrize("name, fused_type, blocks", [
    ("resnet18d", TimmBasicBlock, 8),     # deep stem, avg-pool downsample
    ("resnet50d", TimmBottleneck, 16),
    ("resnet50", TimmBottleneck, 16),     # torchvision-like stem and downsample
])
def test_convert_timm_resnet(name, fused_type, blocks):
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, num_classes=10).double())
    reference = copy.deepcopy(model)
    converted, report = convert_checked(model)
    assert converted is model
    assert all(type(block) is fused_type for block in blocks_of(model))
    assert type(model.bn1) is BatchNormAct2d and model.bn1.relu
    assert type(model.act1) is torch.nn.Identity
    deep_stem_pairs = 2 if name.endswith("d") else 0
    assert len(report) == blocks + 2 + 2 * deep_stem_pairs
    assert report.skipped == []
    compare_eval(model, reference, images(2))
    compare_training_step(model, reference, images(4, seed=2), torch.tensor([5, 0, 9, 1]))


def test_converted_timm_blocks_run_the_fused_operators(torch_backend):
    model = tiny_resnet(stem_type="deep", avg_down=True)
    resnet_fast.convert(model)
    x = images(2)
    with OpRecorder() as training:
        model.train()(x)
    # every block convolution and every downsample (pool, then conv + BN) is one conv_bn_act
    assert training.calls["conv_bn_act"] == 4 * 2 + 4
    assert training.calls["batch_norm_act"] == 3  # the deep stem's two pairs and bn1 + act1
    with OpRecorder() as evaluation, torch.no_grad():
        model.eval()(x)
    assert evaluation.calls["conv2d_bias_act"] == 4 * 2 + 4  # BatchNorm folded into each convolution
    assert "conv_bn_act" not in evaluation.calls


def test_convert_timm_block_at_root_and_state_dict_round_trip():
    block = randomize_batch_norms(timm_resnet.Bottleneck(16, 4).double())
    reference = copy.deepcopy(block)
    fused, report = resnet_fast.convert(block)
    assert type(fused) is TimmBottleneck
    assert report.converted == [("<root>", "timm.models.resnet.Bottleneck", "resnet_fast.nn.TimmBottleneck")]
    reference.load_state_dict(fused.state_dict())
    x = images(2, size=8, channels=16)
    compare_eval(fused, reference, x)
    compare_training_step(fused, reference, x, torch.randn(2, 16, 8, 8, dtype=torch.float64))


def test_convert_timm_attention_blocks_fuse_around_it_and_report_it_once(torch_backend):
    model = tiny_resnet("Bottleneck", block_args={"attn_layer": "se"})
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert all(type(block) is TimmBottleneck for block in blocks_of(model))
    assert {path for path, _, _ in report.skipped} == {f"layer{i}.0.bn3" for i in range(1, 5)}
    assert len({reason for _, _, reason in report.skipped}) == 1
    assert "attention layer se (timm.layers.squeeze_excite.SEModule)" in report.skipped[0][2]
    text = str(report)
    assert "4 x torch.nn.BatchNorm2d  inside resnet_fast.nn.TimmBottleneck: the attention layer se" in text
    assert text.count("attention layer") == 1
    compare_eval(model, reference, images(2))
    compare_training_step(model, reference, images(4, seed=2), torch.tensor([5, 0, 9, 1]))
    with OpRecorder() as ops:
        model(images(2))
    assert ops.calls["conv_bn_act"] == 4 * 3 + 4  # bn3 still runs with conv3 in one call, before the attention


def test_convert_timm_other_activation_and_anti_aliasing_stay_exact():
    model = tiny_resnet(act_layer="silu", aa_layer=timm.layers.BlurPool2d)
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert all(type(block) is TimmBasicBlock for block in blocks_of(model))
    assert type(model.bn1) is torch.nn.BatchNorm2d  # the stem's SiLU stays as it is
    reasons = collections.Counter(reason for _, _, reason in report.skipped)
    assert reasons[next(r for r in reasons if "the activation is torch.nn.SiLU" in r)] == 8
    assert any("the stem's activation act1 is torch.nn.SiLU" in r for r in reasons)
    compare_eval(model, reference, images(2))
    compare_training_step(model, reference, images(4, seed=2), torch.tensor([5, 0, 9, 1]))


def test_convert_timm_drop_path_trains_exactly_and_fuses_in_eval(torch_backend):
    model = tiny_resnet(drop_path_rate=0.5)
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    # the first block has drop probability 0 (timm's linear rule), the three others not
    assert {path for path, _, _ in report.skipped} == {f"layer{i}.0.bn2" for i in range(2, 5)}
    assert "drop_path (timm.layers.drop.DropPath)" in report.skipped[0][2]
    compare_eval(model, reference, images(2))
    with OpRecorder() as ops, torch.no_grad():
        model(images(2))
    assert ops.calls["conv2d_bias_act"] == 4 * 2 + 3  # add and ReLU in every block's last epilogue
    model.train()
    reference.train()
    x, target = images(4, seed=2), torch.tensor([5, 0, 9, 1])
    torch.manual_seed(7)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    torch.manual_seed(7)
    loss_reference = torch.nn.functional.cross_entropy(reference(x), target)
    assert_close64(loss.detach(), loss_reference.detach(), "loss with drop-path")
    loss.backward()
    loss_reference.backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert_close64(parameter.grad, reference_parameters[name].grad, f"grad of {name}")


def test_conversion_report_groups_repeated_reasons():
    class Opaque(torch.nn.Module):  # a parent whose forward convert cannot see into
        def __init__(self) -> None:
            super().__init__()
            self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(4) for _ in range(53))

    _, report = resnet_fast.convert(Opaque())
    assert len(report.skipped) == 53
    lines = str(report).splitlines()
    assert lines[0] == "resnet_fast.convert: 0 module(s) converted, 53 skipped"
    assert len(lines) == 4
    assert lines[2].startswith("  53 x torch.nn.BatchNorm2d  its parent")
    assert lines[3].strip() == "at norms.0, norms.1, norms.2, norms.3, ... (49 more)"
