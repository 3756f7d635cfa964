"""Running the self-check's cases on one backend and comparing them with float64.

Each :class:`~resnet_fast.check.cases.Case` runs three times:

* under the backend being checked, on the device being checked, in the tested dtype;
* under the ``torch`` backend in the same dtype (the rounding yardstick of the rule in
  :mod:`resnet_fast.testing`);
* under the ``torch`` backend in float64 (the reference), the ReLU taking the tested
  output's mask where the two differ only within rounding of zero.

The two ``torch`` runs happen on the CPU: on CUDA tensors the stage operators
(``batch_norm_stats``, ``scale_shift_act``'s passes, ``conv2d_tensor_core``) run our own
CUDA kernels under every backend, and a kernel must not be its own yardstick.

The model case trains one step of a small ResNet against torchvision's (same weights,
same batch): torchvision in the tested dtype on the device is the yardstick, torchvision
in float64 on the CPU the reference.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

import resnet_fast
from resnet_fast.check.cases import ACTIVATION, CONV_WEIGHT, DTYPE_NAMES, RUNNING, Arg, Case
from resnet_fast.ops.dispatch import BACKENDS, CapabilityWarning, get_backend, set_backend
from resnet_fast.testing import Comparison, compare_to_reference, relu_mask_mismatch

PASS, FAIL, SKIPPED = "pass", "FAIL", "skipped"


@dataclass
class Row:
    """One line of the check's table (and of its JSON)."""

    operator: str
    backend: str
    dtype: str
    layout: str
    case: str
    max_error: float | None
    tolerance: float | None
    result: str
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def backend(name: str):
    """Run the body with every operator forced to backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# ----------------------------------------------------------------------------- inputs

def tested_dtype(arg: Arg, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``arg`` has in a run in ``dtype``: activations and convolution weights that
    dtype, per-channel tensors and running statistics float32 (float64 in a float64 run)."""
    if arg.kind in (ACTIVATION, CONV_WEIGHT) or dtype == torch.float64:
        return dtype
    return torch.float32


def draw_inputs(case: Case, seed: int) -> dict[str, Tensor]:
    """The case's inputs on the CPU (N(0, 1), or U(0.5, 1.5) for ``positive``), drawn in
    float64 and rounded to the dtype each has in the tested run: every run, the float64
    reference included, sees the same input values."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for arg in case.args:
        if arg.positive:
            value = torch.rand(arg.shape, dtype=torch.float64, generator=generator) + 0.5
        else:
            value = torch.randn(arg.shape, dtype=torch.float64, generator=generator)
        values[arg.name] = value.to(tested_dtype(arg, case.dtype)).double()
    return values


def _materialise(arg: Arg, value: Tensor, dtype: torch.dtype, channels_last: bool, device) -> Tensor:
    """``value`` as the case passes it: activations and convolution weights in ``dtype`` and
    the layout, per-channel tensors and running statistics in float32 (float64 for a
    float64 run), a strided view for ``noncontiguous``, gradients required for ``grad``."""
    t = value.to(device=device, dtype=tested_dtype(arg, dtype), copy=True)
    if arg.kind in (ACTIVATION, CONV_WEIGHT) and channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    if arg.noncontiguous:
        wide = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
        wide[::2] = t
        if arg.grad:
            wide.requires_grad_()
        return wide[::2]
    return t.requires_grad_() if arg.grad else t


def _run(case: Case, values: dict[str, Tensor], dys: dict[str, Tensor], dtype: torch.dtype, device,
         relu: bool, mask_of: Tensor | None = None, generator: torch.Generator | None = None,
         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Call the case's operator under the current backend: (outputs incl. running statistics, gradients).

    ``dys`` holds the float64 upstream gradient of each output in ``case.grad_outputs``; one
    missing is drawn from ``generator`` (the first run fills it for the others). ``mask_of``:
    the float64 reference's ReLU (the case is called with ``relu=False``) takes this tested
    output's mask.
    """
    tensors = {arg.name: _materialise(arg, values[arg.name], dtype, case.channels_last, device) for arg in case.args}
    call = case.reference_call if dtype == torch.float64 and case.reference_call is not None else case.call
    outputs = call(tensors, relu)
    if mask_of is not None:
        outputs["out"] = outputs["out"] * (mask_of.to(outputs["out"].device) > 0)
    results = {name: t.detach() for name, t in outputs.items()}
    results.update({arg.name: tensors[arg.name].detach().clone() for arg in case.args if arg.kind == RUNNING})
    grads: dict[str, Tensor] = {}
    if case.backward:
        wrt = [arg.name for arg in case.args if arg.grad]
        heads = [outputs[name] for name in case.grad_outputs]
        for name, head in zip(case.grad_outputs, heads):
            if name not in dys:  # drawn in float64, rounded to the tested output's dtype
                dys[name] = torch.randn(head.shape, dtype=torch.float64, generator=generator).to(head.dtype).double()
        head_grads = [dys[name].to(device=h.device, dtype=h.dtype) for name, h in zip(case.grad_outputs, heads)]
        computed = torch.autograd.grad(heads, [tensors[name] for name in wrt], head_grads, allow_unused=True)
        grads = {f"grad_{name}": g.detach() for name, g in zip(wrt, computed) if g is not None}
        missing = [name for name, g in zip(wrt, computed) if g is None]
        if missing:
            raise RuntimeError(f"no gradient reached {', '.join(missing)}")
    return results, grads


def _worst(comparisons: dict[str, Comparison]) -> tuple[float, float, str, bool]:
    """(error, bound, detail, passed) of the comparison closest to (or furthest past) its bound."""
    def ratio(item):
        c = item[1]
        return float("inf") if not c.passed else c.error / max(c.bound, 1e-300)
    name, worst = max(comparisons.items(), key=ratio)
    failed = [n for n, c in comparisons.items() if not c.passed]
    detail = worst.describe(name) if failed else f"worst: {name}"
    return worst.error, worst.bound, detail, not failed


def _compare(ours: dict[str, Tensor], reference: dict[str, Tensor], same: dict[str, Tensor]) -> dict[str, Comparison]:
    return {name: compare_to_reference(ours[name].cpu(), reference[name], same[name].cpu()) for name in ours}


class CaseRun:
    """One case, run under each backend in turn; the yardsticks are computed once.

    ``rows(backend)`` gives the forward row (and the backward row) of that backend. The
    inputs and upstream gradients are drawn once from ``seed``; torch in the tested dtype
    and, without a ReLU, the float64 reference are shared by every backend (with a ReLU
    the reference takes each backend's own output mask).
    """

    def __init__(self, case: Case, device: torch.device, seed: int) -> None:
        self.case, self.device = case, device
        self.values = draw_inputs(case, seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.dys: dict[str, Tensor] = {}
        self._same: tuple | None = None
        self._unmasked: tuple | None = None

    def _torch(self, dtype: torch.dtype, relu: bool, mask_of: Tensor | None = None) -> tuple:
        with backend("torch"):
            return _run(self.case, self.values, self.dys, dtype, "cpu", relu, mask_of)

    def _yardsticks(self, ours_out: Tensor | None) -> tuple[tuple, tuple | str]:
        """(torch in the tested dtype, the float64 reference or why the ReLU masks disagree)."""
        if self._same is None:
            self._same = self._torch(self.case.dtype, self.case.relu)
        if self._unmasked is None:
            self._unmasked = self._torch(torch.float64, relu=False)
        if not self.case.relu:
            return self._same, self._unmasked
        mask_of = ours_out.cpu()
        mismatch = relu_mask_mismatch(self._unmasked[0]["out"], mask_of)
        if mismatch is not None:
            return self._same, mismatch
        return self._same, self._torch(torch.float64, relu=False, mask_of=mask_of)

    def rows(self, backend_name: str) -> list[Row]:
        case = self.case
        start = time.perf_counter()
        base = dict(backend=backend_name, dtype=case.dtype_name, layout=case.layout, case=case.label)
        try:
            with backend(backend_name), warnings.catch_warnings():
                warnings.simplefilter("ignore", CapabilityWarning)
                ours, ours_grads = _run(case, self.values, self.dys, case.dtype, self.device, case.relu,
                                        generator=self.generator)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            (same, same_grads), reference = self._yardsticks(ours.get("out"))
        except Exception as error:  # noqa: BLE001  a crash is a failed case, reported in the table
            return [Row(case.operator, **base, max_error=None, tolerance=None, result=FAIL,
                        detail=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start)]
        seconds = time.perf_counter() - start
        if isinstance(reference, str):
            return [Row(case.operator, **base, max_error=None, tolerance=None, result=FAIL, detail=reference,
                        seconds=seconds)]
        reference, reference_grads = reference
        error, bound, detail, passed = _worst(_compare(ours, reference, same))
        rows = [Row(case.operator, **base, max_error=error, tolerance=bound, result=PASS if passed else FAIL,
                    detail=detail, seconds=seconds)]
        if case.backward:
            error, bound, detail, passed = _worst(_compare(ours_grads, reference_grads, same_grads))
            rows.append(Row(f"{case.operator}_backward", **base, max_error=error, tolerance=bound,
                            result=PASS if passed else FAIL, detail=detail))
        return rows


def skip_reason(case: Case, backend_name: str, device: torch.device, interpreted: bool) -> str | None:
    """Why ``case`` does not run under ``backend_name`` on ``device`` (None: it runs).

    Operators the backend does not implement, and kernels ``auto`` never sends to this GPU
    (a declared capability the GPU lacks), are skipped: a record covers what auto runs.
    """
    backend = BACKENDS[backend_name]
    if case.backends is not None:
        if backend_name not in case.backends:
            return f"{case.operator} is not a {backend_name} kernel"
        if backend_name == "cuda" and (interpreted or device.type != "cuda"):
            return "needs the CUDA extension on a GPU"
    elif case.operator not in backend.kernels:
        return f"{case.operator} is not implemented in the {backend_name} backend"
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
        if case.capability_below is not None and capability >= case.capability_below:
            return (f"auto never runs it here: the {backend_name} backend runs {case.operator} only below compute "
                    f"capability %d.%d" % case.capability_below)
        requirement = backend.requirements.get(case.operator)
        reason = None if requirement is None else requirement.reason(backend_name, case.operator, device, capability)
        if reason is not None:
            return f"auto never runs it here: {reason}"
    return None


# ----------------------------------------------------------------------------- model step

class ModelStep:
    """One SGD step of ``resnet_fast.resnet18(num_classes=10)`` vs torchvision's (same weights,
    batch 8 of 32x32 images, channels_last, ``dtype`` by autocast, float32 without one):
    logits, loss, gradients, parameters after the step and running statistics compared
    with torchvision in float64 on the CPU, torchvision on the device in the same dtype as
    the yardstick. Both yardsticks are computed once for every backend."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device, self.seed = device, seed
        self._stock: torch.nn.Module | None = None
        self._same: dict[torch.dtype, dict[str, Tensor]] = {}
        self._reference: dict[str, Tensor] | None = None

    def _batch(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        images = torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64).float().double()
        return images, torch.randint(0, 10, (8,), generator=generator)

    def _step(self, model: torch.nn.Module, device, dtype: torch.dtype | None, float64: bool = False) -> dict:
        images, labels = self._batch()
        model = model.to(device).train()
        if float64:
            model = model.double()
        model = model.to(memory_format=torch.channels_last)
        x = images.to(device, torch.float64 if float64 else torch.float32).contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits if float64 else logits.float(), labels.to(device))
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        running = torch.cat([b.reshape(-1).to(params.dtype) for n, b in model.named_buffers() if "running" in n])
        return {"logits": logits.detach().float() if not float64 else logits.detach(), "loss": loss.detach().reshape(1),
                "gradients": grads, "parameters after SGD": params, "running statistics": running}

    def _torchvision(self) -> torch.nn.Module:
        if self._stock is None:
            import torchvision

            torch.manual_seed(self.seed)
            self._stock = torchvision.models.resnet18(num_classes=10)
        return copy.deepcopy(self._stock)

    def rows(self, backend_name: str, dtype: torch.dtype, fused_training: bool) -> list[Row]:
        operator = "resnet18 fused training step" if fused_training else "resnet18 training step"
        base = dict(operator=operator, backend=backend_name, dtype=DTYPE_NAMES[dtype], layout="channels_last",
                    case="batch 8, 32x32, one SGD step")
        if importlib.util.find_spec("torchvision") is None:
            return [Row(**base, max_error=None, tolerance=None, result=FAIL,
                        detail="torchvision is not installed (pip install torchvision): the step is compared with it")]
        start = time.perf_counter()
        autocast_dtype = None if dtype == torch.float32 else dtype
        try:
            ours_model = resnet_fast.resnet18(num_classes=10)
            ours_model.load_state_dict(self._torchvision().state_dict())
            resnet_fast.nn.enable_fused_training(ours_model, fused_training)
            with backend(backend_name), warnings.catch_warnings():
                warnings.simplefilter("ignore", CapabilityWarning)
                ours = self._step(ours_model, self.device, autocast_dtype)
            if dtype not in self._same:
                self._same[dtype] = self._step(self._torchvision(), self.device, autocast_dtype)
            if self._reference is None:
                self._reference = self._step(self._torchvision(), "cpu", None, float64=True)
            comparisons = {name: compare_to_reference(ours[name].cpu(), self._reference[name],
                                                      self._same[dtype][name].cpu()) for name in ours}
        except Exception as error:  # noqa: BLE001  a crash is a failed case, reported in the table
            return [Row(**base, max_error=None, tolerance=None, result=FAIL,
                        detail=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start)]
        error, bound, detail, passed = _worst(comparisons)
        return [Row(**base, max_error=error, tolerance=bound, result=PASS if passed else FAIL, detail=detail,
                    seconds=time.perf_counter() - start)]
