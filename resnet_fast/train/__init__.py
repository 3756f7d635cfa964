"""The training program ``python -m resnet_fast.train`` (``resnet-fast-train``).

Recipes (:mod:`~resnet_fast.train.recipes`), data (:mod:`~resnet_fast.train.data`),
models (:mod:`~resnet_fast.train.models`), settings (:mod:`~resnet_fast.train.config`),
the loop with DDP and mixed precision (:mod:`~resnet_fast.train.loop`), checkpoints
(:mod:`~resnet_fast.train.checkpoint`) and metrics (:mod:`~resnet_fast.train.metrics`).
"""

from resnet_fast.train.cli import main
from resnet_fast.train.config import Options, TrainConfig, resolve_config
from resnet_fast.train.loop import Trainer
from resnet_fast.train.recipes import RECIPES, Recipe

__all__ = ["RECIPES", "Options", "Recipe", "TrainConfig", "Trainer", "main", "resolve_config"]
