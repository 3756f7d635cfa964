"""resnet_fast.convert: in-place conversion of torchvision models and nn.Sequential stacks.

Every conversion must keep the numerics (float64 on CPU: eval logits, and the loss,
gradients, running statistics and updated parameters of a training step), share the
original parameters and buffers, leave state-dict keys unchanged, report what it did and
skipped, and be idempotent.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from model_checks import compare_eval, compare_training_step, images, randomize_batch_norms
from torch import nn
from torchvision.models import resnet as tv_resnet

import resnet_fast
from resnet_fast import ConversionReport, convert
from resnet_fast.nn import BasicBlock, BatchNormAct2d, Bottleneck

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

# ----------------------------------------------------------------------------- helpers


def storage_pointers(model: nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}


def tensor_ids(model: nn.Module) -> dict[str, int]:
    return {name: id(t) for name, t in model.state_dict(keep_vars=True).items()}


def convert_checked(model: nn.Module) -> tuple[nn.Module, ConversionReport]:
    """convert(), checking sharing, unchanged state-dict keys and idempotence."""
    keys = list(model.state_dict())
    pointers, ids = storage_pointers(model), tensor_ids(model)
    modes = {name: m.training for name, m in model.named_modules()}
    converted, report = convert(model)
    assert list(converted.state_dict()) == keys
    assert storage_pointers(converted) == pointers  # no copies ...
    assert tensor_ids(converted) == ids  # ... the very same Parameter and buffer objects
    for name, m in converted.named_modules():
        if name in modes:
            assert m.training == modes[name], f"{name}: training mode changed"
    # Idempotent: a second conversion finds nothing new and changes nothing.
    modules = dict(converted.named_modules())
    again, second = convert(converted)
    assert again is converted
    assert second.converted == []
    assert second.skipped == report.skipped
    assert not second and len(second) == 0
    assert dict(again.named_modules()) == modules
    return converted, report


def converted_paths(report: ConversionReport) -> dict[str, str]:
    return {path: new for path, _old, new in report.converted}


def skipped_paths(report: ConversionReport) -> dict[str, str]:
    return {path: reason for path, _type, reason in report.skipped}


# ------------------------------------------------------------- torchvision ResNets


@pytest.mark.parametrize("name, block, blocks", [("resnet18", "BasicBlock", 8), ("resnet50", "Bottleneck", 16)])
def test_convert_torchvision_resnet(name, block, blocks):
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(tvm, name)().double())
    reference = copy.deepcopy(model)
    converted, report = convert_checked(model)
    assert converted is model

    fused_type = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[block]
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert all(type(b) is fused_type for stage in stages for b in stage)
    assert type(model.bn1) is BatchNormAct2d and model.bn1.relu
    assert type(model.relu) is nn.Identity
    assert type(model) is resnet_fast.models.ResNet  # the stem convolution fuses too

    paths = converted_paths(report)
    assert len(report.converted) == blocks + 3 == len(report)
    assert paths["bn1"] == "resnet_fast.nn.BatchNormAct2d(relu=True)"
    assert paths["relu"] == "torch.nn.Identity"
    assert paths["<root>"] == "resnet_fast.models.ResNet"
    assert paths["layer1.0"] == f"resnet_fast.nn.{block}"
    assert (("layer4.1", f"torchvision.models.resnet.{block}", f"resnet_fast.nn.{block}")
            in report.converted)
    assert report.skipped == []
    text = str(report)
    assert f"{blocks + 3} module(s) converted, 0 skipped" in text
    assert f"{blocks} x torchvision.models.resnet.{block}  -> resnet_fast.nn.{block}" in text
    assert "at layer1.0, layer1.1, " in text  # the first paths of the group

    compare_eval(model, reference, images(2))
    compare_training_step(model, reference, images(4, seed=2), torch.tensor([5, 0, 999, 1]))


def test_convert_torchvision_resnet_keeps_eval_mode():
    model = tvm.resnet18().eval()
    convert(model)
    assert not any(m.training for m in model.modules())


def test_convert_root_block():
    torch.manual_seed(0)
    block = randomize_batch_norms(tv_resnet.Bottleneck(64, 16).double())
    reference = copy.deepcopy(block)
    pointers = storage_pointers(block)
    fused, report = convert(block)
    assert type(fused) is Bottleneck
    assert storage_pointers(fused) == pointers
    assert report.converted == [("<root>", "torchvision.models.resnet.Bottleneck", "resnet_fast.nn.Bottleneck")]
    x = images(2, size=8, channels=64)
    compare_eval(fused, reference, x)
    compare_training_step(fused, reference, x, torch.randn(2, 64, 8, 8, dtype=torch.float64))


def test_convert_block_with_other_downsample_reports_it():
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.AvgPool2d(2), tv_resnet.conv1x1(4, 8), nn.BatchNorm2d(8))  # ResNet-D style
    model = nn.Sequential(tv_resnet.BasicBlock(4, 8, stride=2, downsample=downsample))
    model = randomize_batch_norms(model.double())
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert [path for path, _, _ in report.converted] == ["0"]
    assert list(skipped_paths(report)) == ["0.downsample.2"]
    x = images(2, size=8, channels=4)
    compare_eval(model, reference, x)
    compare_training_step(model, reference, x, torch.randn(2, 8, 4, 4, dtype=torch.float64))


# ----------------------------------------------------- custom models and Sequentials


class TinyNet(nn.Module):
    """A custom model built from torchvision's BasicBlock, with a Sequential stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        downsample = nn.Sequential(tv_resnet.conv1x1(16, 32, stride=2), nn.BatchNorm2d(32))
        self.blocks = nn.Sequential(tv_resnet.BasicBlock(16, 16),
                                    tv_resnet.BasicBlock(16, 32, stride=2, downsample=downsample))
        self.head_norm = nn.BatchNorm2d(32)  # used directly in forward: its parent is opaque
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.head_norm(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_convert_custom_model_of_torchvision_blocks():
    torch.manual_seed(0)
    model = randomize_batch_norms(TinyNet().double())
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert type(model.blocks[0]) is BasicBlock and type(model.blocks[1]) is BasicBlock
    assert type(model.stem[1]) is BatchNormAct2d and type(model.stem[2]) is nn.Identity
    assert converted_paths(report) == {
        "stem.1": "resnet_fast.nn.BatchNormAct2d(relu=True)",
        "stem.2": "torch.nn.Identity",
        "blocks.0": "resnet_fast.nn.BasicBlock",
        "blocks.1": "resnet_fast.nn.BasicBlock",
    }
    skipped = skipped_paths(report)
    assert list(skipped) == ["head_norm"]
    assert "TinyNet" in skipped["head_norm"] and "unknown" in skipped["head_norm"]
    compare_eval(model, reference, images(2))
    compare_training_step(model, reference, images(4, seed=3), torch.tensor([1, 2, 3, 4]))


def test_convert_sequential_stack():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
    )
    model = randomize_batch_norms(model.double())
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert [type(m) for m in model] == [nn.Conv2d, BatchNormAct2d, nn.Identity, nn.Conv2d, nn.BatchNorm2d]
    assert report.converted == [
        ("1", "torch.nn.BatchNorm2d", "resnet_fast.nn.BatchNormAct2d(relu=True)"),
        ("2", "torch.nn.ReLU", "torch.nn.Identity"),
    ]
    assert len(report.skipped) == 1
    path, kind, reason = report.skipped[0]
    assert (path, kind) == ("4", "torch.nn.BatchNorm2d")
    assert "no ReLU follows" in reason
    text = str(report)
    assert "2 module(s) converted, 1 skipped" in text and "no ReLU follows" in text
    x = images(2, size=8)
    compare_eval(model, reference, x)
    compare_training_step(model, reference, x, torch.randn(2, 8, 8, 8, dtype=torch.float64))


@pytest.mark.skipif("bias" not in (nn.BatchNorm2d.__init__.__kwdefaults__ or {}),
                    reason="this torch's BatchNorm2d has no bias argument")
def test_convert_batch_norm_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, bias=False), nn.ReLU()).double()
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert len(report.converted) == 2 and model[1].bias is None
    x = images(2, size=8)
    compare_eval(model, reference, x)
    compare_training_step(model, reference, x, torch.randn(2, 4, 8, 8, dtype=torch.float64))


def test_convert_skips_what_it_cannot_fuse():
    class FrozenishBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.ReLU(),  # SyncBatchNorm
        nn.Conv2d(4, 4, 1), FrozenishBN(4), nn.ReLU(),  # a BatchNorm2d subclass
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(),  # not followed by nn.ReLU
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # this one converts
    )
    _, report = convert_checked(model)
    assert [path for path, _, _ in report.converted] == ["10", "11"]
    skipped = skipped_paths(report)
    assert list(skipped) == ["1", "4", "7"]
    assert "SyncBatchNorm" in skipped["1"]
    assert "subclass" in skipped["4"] and "FrozenishBN" in skipped["4"]
    assert "ReLU6" in skipped["7"]
    assert [type(m) for m in model][1:3] == [nn.SyncBatchNorm, nn.ReLU]


def test_convert_sequential_subclass_with_plain_forward():
    from torchvision.ops.misc import Conv2dNormActivation

    layer = Conv2dNormActivation(3, 8, kernel_size=3).double()
    randomize_batch_norms(layer)
    reference = copy.deepcopy(layer)
    _, report = convert_checked(layer)
    assert [type(m) for m in layer] == [nn.Conv2d, BatchNormAct2d, nn.Identity]
    assert len(report.converted) == 2
    compare_eval(layer, reference, images(2, size=8))


def test_convert_sequential_subclass_with_own_forward_is_left_alone():
    class Reversed(nn.Sequential):
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    model = Reversed(nn.ReLU(), nn.BatchNorm2d(3))
    _, report = convert_checked(model)
    assert report.converted == []
    assert list(skipped_paths(report)) == ["1"]


def test_convert_torchvision_resnet_with_sync_batch_norm_reports_unfused():
    model = tvm.resnet18(norm_layer=nn.SyncBatchNorm).double().eval()
    randomize_batch_norms(model)  # SyncBatchNorm is not a BatchNorm2d: stays at init
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert len(report.converted) == 8  # the blocks; the stem's SyncBatchNorm stays
    skipped = skipped_paths(report)
    assert "SyncBatchNorm" in skipped["bn1"]
    assert "runs unfused inside resnet_fast.nn.BasicBlock" in skipped["layer1.0.bn1"]
    assert "layer2.0.downsample.1" in skipped
    assert len(skipped) == 1 + 8 * 2 + 3
    assert type(model.relu) is nn.ReLU
    compare_eval(model, reference, images(2))


def test_convert_lookalike_and_non_torchvision_blocks():
    class BasicBlockCopy(nn.Module):  # a user's copy of torchvision's block (same attributes)
        expansion = 1

        def __init__(self, planes):
            super().__init__()
            self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            self.stride = 1

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    BasicBlockCopy.__name__ = BasicBlockCopy.__qualname__ = "BasicBlock"

    class BasicBlock2(BasicBlockCopy):  # another name: not recognised
        pass

    class QuantizableLike(tv_resnet.BasicBlock):  # torchvision subclass with its own forward
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = nn.ModuleDict({"copy": BasicBlockCopy(4), "other": BasicBlock2(4), "quant": QuantizableLike(4, 4)})
    model = randomize_batch_norms(model.double())
    reference = copy.deepcopy(model)
    _, report = convert_checked(model)
    assert type(model["copy"]) is BasicBlock
    assert type(model["other"]) is BasicBlock2 and type(model["quant"]) is QuantizableLike
    assert [path for path, _, _ in report.converted] == ["copy"]
    assert set(skipped_paths(report)) == {"other.bn1", "other.bn2", "quant.bn1", "quant.bn2"}
    x = images(2, size=8, channels=4)
    compare_eval(model["copy"], reference["copy"], x)


def test_conversion_report_str_and_helpers():
    report = ConversionReport()
    assert not report and len(report) == 0
    assert "0 module(s) converted, 0 skipped" in str(report)
    report.converted.append(("layer1.0", "torchvision.models.resnet.BasicBlock", "resnet_fast.nn.BasicBlock"))
    report.skipped.append(("head.bn", "torch.nn.BatchNorm2d", "last module of its nn.Sequential: no ReLU follows"))
    report.skipped.append(("x", "torch.nn.SyncBatchNorm", "SyncBatchNorm ..."))
    assert report and len(report) == 1
    lines = str(report).splitlines()
    assert lines[0] == "resnet_fast.convert: 1 module(s) converted, 2 skipped"
    assert lines[1] == "converted:" and lines[4] == "skipped:"
    assert lines[3].strip() == "at layer1.0" and lines[6].strip() == "at head.bn"
    # columns aligned
    assert lines[5].index("torch.nn.BatchNorm2d") == lines[7].index("torch.nn.SyncBatchNorm")


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        convert(torch.zeros(3))


def test_convert_resnet_fast_model_is_a_no_op():
    model = resnet_fast.resnet20()
    keys = list(model.state_dict())
    _, report = convert_checked(model)
    assert report.converted == [] and report.skipped == []
    assert list(model.state_dict()) == keys
