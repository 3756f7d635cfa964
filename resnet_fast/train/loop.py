"""The training loop: steps, evaluation, learning-rate schedule and warm-up, checkpoints, logs.

A step runs forward and cross-entropy under ``torch.autocast`` (fp16 / bf16), backward
through a ``GradScaler`` (enabled for fp16 only), and an SGD step. With ``accumulate``
= k the local batch is split into k chunks whose gradients add up before the step
(each chunk's BatchNorm sees only its chunk, as each process's does under DDP, and
updates the running statistics once per chunk). The loss of a chunk is its summed
cross-entropy divided by the local batch, so the gradient is that of the mean over the
global batch, with DDP averaging over processes.

With ``fused_training`` True (False) every block and the stem train with (without) the
convolution fusion (:func:`resnet_fast.nn.enable_fused_training`); None leaves the
measured default (:mod:`resnet_fast.nn.fused_training_defaults`).

With ``cuda_graphs`` the whole step — forward, loss, backward, the meters, the optimizer
step (and the GradScaler's inf check and scale update under fp16) — is captured once in a
CUDA graph and replayed on a static copy of each batch, as NVIDIA's MLPerf ResNet does.
The first :data:`CUDA_GRAPH_WARMUP_STEPS` steps run eagerly on a side stream (they are
real steps of the run): they autotune the Triton kernels and cuDNN for these shapes and
create the optimizer's state, so nothing tunes or allocates anew inside the capture. The
optimizer is then a fused SGD whose learning rate is a device tensor (the schedulers and
the warm-up change it in place, so the replays see every change), and GradScaler passes
its scale and inf flag to that optimizer without a host sync. Gradients are never reset
between replays: each replay's backward writes them afresh.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains its share of each global
batch in DistributedDataParallel (NCCL on GPUs, gloo on the CPU); only rank 0 writes
checkpoints, metrics, progress bars and the summary. Evaluation runs each process on its
shard of the evaluation set with the unwrapped model and sums the counts.
"""

from __future__ import annotations

import bisect
import collections
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import resnet_fast
from resnet_fast.runtime import autocast, grad_scaler, memory_format, synchronize
from resnet_fast.train.checkpoint import (
    CHECKPOINT_NAME,
    check_same_run,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from resnet_fast.train.config import TrainConfig
from resnet_fast.train.data import build_data
from resnet_fast.train.metrics import PLOT_NAME, Meter, MeterReading, MetricsLog, plot_curves, read_metrics
from resnet_fast.train.models import build_model, convert_sync_batchnorm

CUDA_GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the capture (autotuning, optimizer state)
WARMUP_ERROR = 80.0  # % top-1 training error under which the ResNet-110 warm-up ends
WARMUP_FACTOR = 0.1  # warm-up learning rate / base learning rate (0.01 / 0.1)
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class Processes:
    """This process's place under ``torchrun`` (one process without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Processes":
        """From ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as ``torchrun`` sets them."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(processes: Processes, device: torch.device) -> None:
    """Join the process group (NCCL for GPUs, gloo for the CPU) when there is more than one process."""
    if processes.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class ErrorGatedWarmup:
    """The paper's ResNet-110 warm-up: the learning rate is scaled by 0.1 (0.1 → 0.01)
    until the training top-1 error of a logging interval falls below 80%, then restored.

    Multiplies the optimizer's current learning rates, so the milestone and plateau
    schedulers (which also multiply) compose with it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, enabled: bool) -> None:
        self.optimizer = optimizer
        self.active = enabled

    def _scale(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    def start(self) -> None:
        """Lower the learning rate for a fresh run (a resumed one restores the optimizer's)."""
        if self.active:
            self._scale(WARMUP_FACTOR)

    def observe(self, train_top1_error: float) -> bool:
        """End the warm-up once the error is below the threshold; True when it ended now."""
        if self.active and train_top1_error < WARMUP_ERROR:
            self._scale(1 / WARMUP_FACTOR)
            self.active = False
            return True
        return False

    def state_dict(self) -> dict[str, bool]:
        return {"active": self.active}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        self.active = state["active"]


@dataclass
class Position:
    """Where the run is and what it has done (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0  # next global batch of ``epoch``
    iteration: int = 0
    images: int = 0  # trained on, over all processes
    train_seconds: float = 0.0  # in training steps (not evaluation or checkpoints)
    best_top1_error: float = math.inf
    best_epoch: int = -1
    last_eval: dict[str, float] | None = None


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with the run's momentum and weight decay; under CUDA graphs the capturable form:
    fused, with the learning rate as a device tensor (changed in place by the schedulers)."""
    if config.cuda_graphs:
        return torch.optim.SGD(model.parameters(), lr=torch.tensor(config.lr, device=device),
                               momentum=config.momentum, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


class GraphedStep:
    """A training step captured once in a CUDA graph and replayed on static batch buffers.

    ``body(images, labels)`` is the whole step. The first :data:`CUDA_GRAPH_WARMUP_STEPS`
    calls of :meth:`step` run it eagerly on a side stream (then ``zero_grad``); the next
    captures it on a static copy of its batch and replays the graph; later calls copy their
    batch into the static buffers and replay. Batches must keep the captured shape.
    """

    def __init__(self, body: Callable[[Tensor, Tensor], None], device: torch.device,
                 warmup_steps: int = CUDA_GRAPH_WARMUP_STEPS) -> None:
        self.body, self.device, self.warmup_steps = body, device, warmup_steps
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor] | None = None

    def step(self, images: Tensor, labels: Tensor, zero_grad: Callable[[], None]) -> None:
        """One training step on (images, labels): eager warm-up, capture, or replay."""
        if self.graph is None and self.eager_steps < self.warmup_steps:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.body(images, labels)
                zero_grad()  # the capture's backward then allocates the gradients in the graph's pool
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.eager_steps += 1
            return
        if self.graph is None:
            self.static = (images.clone(), labels.clone())
            graph = torch.cuda.CUDAGraph()
            # thread-local: the data loader's pin-memory thread keeps working during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.body(*self.static)
            self.graph = graph
        else:
            for static, batch in zip(self.static, (images, labels)):
                if static.shape != batch.shape:
                    raise RuntimeError(f"--cuda-graphs replays a step captured for batches of shape "
                                       f"{tuple(static.shape)}, got {tuple(batch.shape)}")
                static.copy_(batch, non_blocking=True)
        self.graph.replay()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Trainer:
    """Builds everything a run needs from its :class:`TrainConfig` and runs it."""

    def __init__(self, config: TrainConfig, processes: Processes | None = None, console: Console | None = None):
        self.config = config
        self.processes = processes or Processes()
        self.console = console or Console(width=None if sys.stdout.isatty() else 140, soft_wrap=True)
        self.device = device = torch.device(config.device)
        init_process_group(self.processes, device)
        self.memory_format = memory_format(config.channels_last)
        self._set_determinism()
        seed_everything(config.seed)
        if not config.eager:
            resnet_fast.set_backend(config.backend)

        self.data = build_data(
            config.data_kind, root=config.data, image_size=config.image_size, num_classes=config.num_classes,
            global_batch=config.batch_size, seed=config.seed, rank=self.processes.rank,
            world_size=self.processes.world_size, workers=config.workers, device=device,
            val_split=config.val_split, ten_crop=config.ten_crop, synthetic_images=config.synthetic_images)
        self.run_settings = {**config.trajectory(), "num_classes": self.data.num_classes}
        checkpoint = load_checkpoint(config.resume) if config.resume else None
        self.extended_from: int | None = None  # the checkpoint run's length when this run extends it
        if checkpoint is not None and check_same_run(checkpoint["run"], self.run_settings, config.resume):
            self.extended_from = checkpoint["run"]["length"]

        self.module = build_model(config.model, self.data.num_classes, config.eager)
        if config.fused_training is not None and not config.eager:  # None: the measured default
            resnet_fast.nn.enable_fused_training(self.module, config.fused_training)
        self.module.to(device=device, memory_format=self.memory_format)
        if checkpoint is not None:
            self.module.load_state_dict(checkpoint["model"])
        if config.sync_bn:
            self.module = convert_sync_batchnorm(self.module, config.eager, device)
        self.ddp: DistributedDataParallel | None = None
        model: nn.Module = self.module
        if self.processes.world_size > 1:
            model = self.ddp = DistributedDataParallel(self.module, device_ids=[device] if device.type == "cuda"
                                                       else None)
        self.model = torch.compile(model) if config.compile else model
        self.eval_model = torch.compile(self.module) if config.compile else self.module

        self.optimizer = build_optimizer(self.module, config, device)
        self.scaler = grad_scaler(device, config.dtype)
        self.scheduler: Any = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=config.lr_decay,
                                                       patience=config.plateau_patience)
            if config.plateau else
            torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(config.milestones), gamma=config.lr_decay))
        self.warmup = ErrorGatedWarmup(self.optimizer, config.warmup)
        self.meter, self.eval_meter = Meter(device), Meter(device)
        self.position = Position()
        self.batches_per_epoch = self.data.sampler.batches_per_epoch
        self.total_iterations = config.length * (self.batches_per_epoch if config.unit == "epochs" else 1)
        self.total_epochs = math.ceil(self.total_iterations / self.batches_per_epoch)
        self.graph = GraphedStep(self._step_body, device) if config.cuda_graphs else None
        if checkpoint is not None:
            self._restore(checkpoint)
            if self.extended_from is not None:
                self._follow_new_milestones()
        else:
            self.warmup.start()
        self.log = MetricsLog(config.out, self.processes.is_main,
                              self.position.iteration if checkpoint is not None else None)
        self._interval_start = (time.perf_counter(), self.position.iteration)
        self._epoch_start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self._step_lr: float | Tensor = lr.clone() if isinstance(lr, Tensor) else lr  # of the last step taken

    # ------------------------------------------------------------------------- setup

    def _set_determinism(self) -> None:
        if self.config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint may come from a run with the other form
            if self.config.cuda_graphs:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
            elif isinstance(group["lr"], Tensor):
                group["lr"] = float(group["lr"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.warmup.load_state_dict(checkpoint["warmup"])
        self.meter.load_state_dict(checkpoint["meter"])
        self.position = Position(**checkpoint["position"])
        restore_rng_state(checkpoint["rng"], self.device)

    def _follow_new_milestones(self) -> None:
        """An extended run: the milestone schedule becomes the new length's, and the learning
        rate what that schedule gives at the current position (warm-up factor included)."""
        if self.config.plateau:
            return
        milestones = sorted(self.config.milestones)
        self.scheduler.milestones = collections.Counter(milestones)
        decays = bisect.bisect_right(milestones, self.scheduler.last_epoch)
        warmup = WARMUP_FACTOR if self.warmup.active else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.config.lr_decay ** decays * warmup

    def batches_this_epoch(self) -> int:
        """The batches the current epoch will actually run to (its end, or where the run or
        ``--stop-after`` stops), for the progress bar."""
        limit = self.total_iterations if self.config.stop_after is None else min(self.total_iterations,
                                                                                self.config.stop_after)
        remaining = max(limit - self.position.iteration, 0)
        return min(self.batches_per_epoch, self.position.batch + remaining)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything :meth:`_restore` needs, for :func:`save_checkpoint`."""
        return {
            "run": self.run_settings,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "warmup": self.warmup.state_dict(),
            "meter": self.meter.state_dict(),
            "position": asdict(self.position),
            "rng": rng_state(self.device),
        }

    def save(self) -> None:
        if self.processes.is_main:
            save_checkpoint(self.checkpoint_state(), self.config.out / CHECKPOINT_NAME)

    @property
    def lr(self) -> float:
        """The optimizer's current learning rate (a host sync when it is a device tensor)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def step_lr(self) -> float:
        """The learning rate of the last step taken."""
        return float(self._step_lr)

    def _record_step_lr(self) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, Tensor):
            self._step_lr.copy_(lr)  # on the device: no host sync per step
        else:
            self._step_lr = lr

    def say(self, message: str) -> None:
        """Print on rank 0."""
        if self.processes.is_main:
            self.console.print(message, highlight=False, markup=False)

    # ------------------------------------------------------------------------- steps

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def train_step(self, images: Tensor, labels: Tensor) -> None:
        """One optimizer step on this process's share of a global batch."""
        images, labels = self._to_device(images, labels)
        self._record_step_lr()
        if self.graph is not None:
            self.graph.step(images, labels, zero_grad=lambda: self.optimizer.zero_grad(set_to_none=True))
            return
        self._step_body(images, labels)
        self.optimizer.zero_grad(set_to_none=True)

    def _step_body(self, images: Tensor, labels: Tensor) -> None:
        """Forward, loss and backward of each accumulation chunk, the meters, the optimizer
        step and the GradScaler's update: what a CUDA graph captures."""
        chunks = self.config.accumulate
        for index, (x, y) in enumerate(zip(images.chunk(chunks), labels.chunk(chunks))):
            defer_sync = self.ddp is not None and index < chunks - 1
            with self.ddp.no_sync() if defer_sync else nullcontext():
                # the autocast weight cache cannot live across a CUDA graph's capture
                with autocast(self.device, self.config.dtype, cache_enabled=self.graph is None):
                    logits = self.model(x)
                    loss_sum = F.cross_entropy(logits, y, reduction="sum")
                self.scaler.scale(loss_sum / len(labels)).backward()
            self.meter.update(logits.detach(), y, loss_sum)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @torch.no_grad()
    def evaluate(self) -> MeterReading:
        """Loss and errors on the evaluation set (ten-crop batches average the crops' softmax)."""
        if self.graph is not None:  # replays update the weights without bumping their version counters
            resnet_fast.nn.clear_fold_cache()
        self.eval_model.eval()
        for images, labels in self.data.eval_batches():
            images, labels = self._to_device(images, labels)
            crops = images.shape[1] if images.dim() == 5 else 0
            with autocast(self.device, self.config.dtype):
                logits = self.eval_model(images.flatten(0, 1) if crops else images).float()
            if crops:
                probabilities = logits.softmax(-1).view(len(labels), crops, -1).mean(1)
                loss_sum = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels, reduction="sum")
                self.eval_meter.update(probabilities, labels, loss_sum)
            else:
                self.eval_meter.update(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
        self.eval_model.train()
        return self.eval_meter.read()

    # ------------------------------------------------------------------------- logging

    def log_train(self, bar: tqdm) -> None:
        """Log the training meters since the last call; the warm-up looks at their error."""
        reading = self.meter.read()
        if reading.count == 0:
            return
        now, iterations = time.perf_counter(), self.position.iteration - self._interval_start[1]
        images_per_s = iterations * self.config.batch_size / max(now - self._interval_start[0], 1e-9)
        self._interval_start = (now, self.position.iteration)
        self.log.log({"phase": "train", "epoch": self.position.epoch + 1, "iteration": self.position.iteration,
                      "loss": reading.loss, "top1_error": reading.top1_error, "top5_error": reading.top5_error,
                      "lr": self.step_lr, "images_per_s": images_per_s,
                      "elapsed_s": self.position.train_seconds + now - self._epoch_start})
        bar.set_postfix_str(f"loss {reading.loss:.3f} | top-1 err {reading.top1_error:.1f}% | lr {self.step_lr:.3g} "
                            f"| {images_per_s:,.0f} img/s", refresh=False)
        if self.warmup.observe(reading.top1_error):
            self.say(f"warm-up over at iteration {self.position.iteration} (training error "
                     f"{reading.top1_error:.1f}% < {WARMUP_ERROR:.0f}%): learning rate {self.lr:g}")

    def end_epoch(self, bar: tqdm) -> None:
        """Flush the training meters, evaluate, step the epoch schedulers, move to the next epoch."""
        self.log_train(bar)
        reading = self.evaluate()
        position = self.position
        self.log.log({"phase": "eval", "epoch": position.epoch + 1, "iteration": position.iteration,
                      "loss": reading.loss, "top1_error": reading.top1_error, "top5_error": reading.top5_error,
                      "lr": self.lr, "elapsed_s": position.train_seconds})
        self.say(f"epoch {position.epoch + 1}/{self.total_epochs}: {self.data.eval_name} loss {reading.loss:.4f}, "
                 f"top-1 error {reading.top1_error:.2f}%, top-5 error {reading.top5_error:.2f}%")
        position.last_eval = asdict(reading)
        if reading.top1_error < position.best_top1_error:
            position.best_top1_error, position.best_epoch = reading.top1_error, position.epoch + 1
        if self.config.plateau:
            self.scheduler.step(reading.top1_error)
        elif self.config.unit == "epochs":
            self.scheduler.step()
        position.epoch, position.batch = position.epoch + 1, 0

    # ------------------------------------------------------------------------- the run

    def stop_reached(self) -> bool:
        stop = self.config.stop_after
        return self.position.iteration >= self.total_iterations or (stop is not None and
                                                                    self.position.iteration >= stop)

    def run(self) -> bool:
        """Train to the end (True) or to ``stop_after`` (False), checkpointing after each epoch
        and at the stop."""
        config, position = self.config, self.position
        if self.processes.is_main:
            self.console.print(config.describe(), highlight=False, markup=False)
            if self.log.note:
                self.say(self.log.note)
            if config.resume:
                self.say(f"resumed from {config.resume} at epoch {position.epoch + 1}, iteration {position.iteration}")
            if self.extended_from is not None:
                schedule = ("the learning rate follows the plateau rule" if config.plateau else
                            f"milestones now at {', '.join(map(str, config.milestones))} {config.unit}, "
                            f"learning rate {self.lr:g}")
                self.say(f"extending the run from {self.extended_from} to {config.length} {config.unit}: {schedule}")
        step_schedule = config.unit == "iterations" and not config.plateau
        while not self.stop_reached():
            bar = tqdm(total=self.batches_this_epoch(), initial=position.batch, unit="batch", file=sys.stderr,
                       desc=f"epoch {position.epoch + 1}/{self.total_epochs}", dynamic_ncols=True,
                       disable=not (config.progress and self.processes.is_main))
            self._epoch_start = time.perf_counter()
            for images, labels in self.data.epoch_batches(position.epoch, position.batch):
                self.train_step(images, labels)
                position.iteration, position.batch = position.iteration + 1, position.batch + 1
                position.images += config.batch_size
                bar.update()
                if position.iteration % config.log_every == 0:
                    self.log_train(bar)
                if step_schedule:
                    self.scheduler.step()
                if self.stop_reached():
                    break
            synchronize(self.device)
            position.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = time.perf_counter()  # evaluation and checkpoints are not training time
            if position.batch == self.batches_per_epoch or position.iteration >= self.total_iterations:
                self.end_epoch(bar)
            bar.close()
            self.save()
        finished = position.iteration >= self.total_iterations
        if finished:
            self.finish()
        else:
            self.say(f"stopped at iteration {position.iteration} of {self.total_iterations}; continue with "
                     f"--resume {config.out / CHECKPOINT_NAME}")
        self.log.close()
        if dist.is_initialized():
            dist.barrier()
        return finished

    def finish(self) -> None:
        """The summary table and JSON, and the plot of the curves (rank 0)."""
        if not self.processes.is_main:
            return
        config, position = self.config, self.position
        summary = {
            "recipe": config.recipe, "model": config.model, "eager": config.eager,
            "backend": None if config.eager else config.backend, "dtype": config.dtype,
            "fused_training": config.fused_training, "cuda_graphs": config.cuda_graphs,
            "processes": self.processes.world_size, "iterations": position.iteration, "epochs": position.epoch,
            "images_per_s": position.images / max(position.train_seconds, 1e-9),
            "train_seconds": position.train_seconds, "final_eval": position.last_eval,
            "best_top1_error": position.best_top1_error, "best_epoch": position.best_epoch,
            "evaluated_on": self.data.eval_name,
        }
        (config.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        plot = plot_curves(read_metrics(self.log.path), config.out / PLOT_NAME)
        table = Table(title=f"{config.recipe} · {config.model} · {self.processes.world_size} process(es)",
                      title_justify="left", show_header=False)
        final = position.last_eval or {}
        for name, value in (
            ("iterations / epochs", f"{position.iteration} / {position.epoch}"),
            ("training throughput", f"{summary['images_per_s']:,.1f} images/s"),
            ("training time", f"{position.train_seconds:,.1f} s"),
            (f"final {self.data.eval_name} top-1 / top-5 error",
             f"{final.get('top1_error', math.nan):.2f}% / {final.get('top5_error', math.nan):.2f}%"),
            ("best top-1 error", f"{position.best_top1_error:.2f}% (epoch {position.best_epoch})"),
            ("outputs", f"{config.out / CHECKPOINT_NAME}, {self.log.path}, {plot}, {config.out / SUMMARY_NAME}"),
        ):
            table.add_row(name, value)
        self.console.print(table)
