"""Synchronized BatchNorm + residual add + ReLU across a ``torch.distributed`` process group.

Training with batch statistics taken over the whole group (the global batch), as
``nn.SyncBatchNorm``, built from the BatchNorm stage operators of
:mod:`resnet_fast.ops.batch_norm_act_stages` (CUDA kernels for CUDA tensors when
``resnet_fast._C`` is built, the torch math otherwise — so it also runs on CPU with gloo):

forward
    local ``(mean_i, var_i, n_i)`` from ``resnet_fast::batch_norm_stats``; one
    ``all_gather`` of them; the group's statistics by the parallel-variance merge
    ``N = sum n_i``, ``mean = sum n_i mean_i / N``,
    ``var = sum n_i (var_i + (mean_i - mean)^2) / N`` (no cancellation, unlike
    ``E[x^2] - E[x]^2``); then ``resnet_fast::batch_norm_act_apply`` with them.
backward
    local ``sum(dy')`` and ``sum(dy' * x_hat)`` from
    ``resnet_fast::batch_norm_act_backward_reduce``; one ``all_reduce`` (sum); then
    ``resnet_fast::batch_norm_act_backward_apply`` with the group sums scaled by
    ``n_i / N`` (the apply stage divides by its local count ``n_i``, and
    ``grad_input = w * invstd * (dy' - sum_dy / N - x_hat * sum_dy_xhat / N)``).

The weight and bias gradients are the local sums, as in ``nn.SyncBatchNorm``:
DistributedDataParallel averages them over the group. The running statistics are
updated with the group's mean and the unbiased variance ``var * N / (N - 1)``.
Ranks may hold different batch sizes, including none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from resnet_fast.ops.batch_norm_act import update_running_stats_op
from resnet_fast.ops.common import accumulation_dtype, check_batch_norm_args, check_input_4d


def _group_statistics(x: Tensor, process_group) -> tuple[Tensor, Tensor, int]:
    """The (mean, biased var, count) of the whole group's batch, per channel."""
    channels = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    count = x.numel() // channels if channels else 0
    if count > 0:
        mean, var = torch.ops.resnet_fast.batch_norm_stats(x)
    else:
        mean = var = x.new_zeros(channels, dtype=acc)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)  # (ranks, 2C + 1)
    means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
    total = counts.sum()
    weights = counts / total
    group_mean = (weights * means).sum(0)
    group_var = (weights * (variances + (means - group_mean) ** 2)).sum(0)
    # The count is needed on the host (the running variance's N / (N - 1)): one synchronisation.
    return group_mean, group_var, int(total.item())


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, process_group):
        mean, var, total = _group_statistics(x, process_group)
        if total < 2:
            raise ValueError(f"expected more than 1 value per channel over the group when training, got {total}")
        out = torch.ops.resnet_fast.batch_norm_act_apply(x, mean, var, weight, bias, residual, eps, relu)
        ctx.save_for_backward(x, weight, mean, var, out if relu else None)
        ctx.eps, ctx.relu, ctx.process_group, ctx.total = eps, relu, process_group, total
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_total):
        x, weight, mean, var, out = ctx.saved_tensors
        sum_dy, sum_dy_xhat = torch.ops.resnet_fast.batch_norm_act_backward_reduce(
            grad_out, x, mean, var, out, ctx.eps, ctx.relu
        )
        group_sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(group_sums, group=ctx.process_group)
        channels = x.shape[1]
        local = x.numel() // channels
        needs = ctx.needs_input_grad
        if local == 0:  # an empty rank still takes part in the all_reduce above
            grad_input, grad_residual = torch.zeros_like(x), torch.zeros_like(grad_out)
        else:
            scale = local / ctx.total
            grad_input, masked_dy = torch.ops.resnet_fast.batch_norm_act_backward_apply(
                grad_out, x, weight, mean, var, out, group_sums[:channels] * scale,
                group_sums[channels:] * scale, True, ctx.eps, ctx.relu, needs[3] and ctx.relu,
            )
            grad_residual = masked_dy if ctx.relu else grad_out
        return (
            grad_input if needs[0] else None,
            sum_dy_xhat.to(weight.dtype) if needs[1] else None,
            sum_dy.to(ctx.bias_dtype) if needs[2] else None,
            grad_residual.to(ctx.residual_dtype) if needs[3] else None,
            None, None, None,
        )


def sync_batch_norm_act(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``relu(batch_norm(input) + residual)`` in training, with statistics over ``process_group``.

    Every rank of the group must call it (a collective). ``process_group=None`` is the
    default group. Arguments and running-statistics semantics as
    :func:`resnet_fast.ops.batch_norm_act` with ``training=True``; the statistics are the
    group's, as ``nn.SyncBatchNorm``'s. Needs an initialised ``torch.distributed``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_batch_norm_act needs an initialised torch.distributed process group")
    check_input_4d("input", input)
    check_batch_norm_args(input, weight, bias, residual, running_mean, running_var, True, check_count=False)
    out, mean, var, total = _SyncBatchNormAct.apply(input, weight, bias, residual, eps, relu, process_group)
    if running_mean is not None:
        update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, var, total, momentum)
    return out
