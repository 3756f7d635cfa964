"""Loading weights into the model builders: one helper for the ImageNet and CIFAR models.

``weights=`` may be

* ``None``: random initialisation;
* a torchvision ``WeightsEnum`` member (e.g. ``ResNet50_Weights.IMAGENET1K_V2``), or its
  name as a string (``"IMAGENET1K_V2"``, ``"DEFAULT"``), for builders that have a
  torchvision counterpart: the state dict comes from ``weights.get_state_dict`` (a
  download, cached by ``torch.hub``) and ``num_classes`` from the weights' categories;
* a state dict (any ``Mapping`` of parameter names to tensors);
* a path (``str`` or ``os.PathLike``) of a file saved with ``torch.save(state_dict)``,
  read with ``torch.load(weights_only=True, map_location="cpu")``.

State dicts load with ``strict=True``: keys and shapes must match the model exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _weights_enum_class(enum_name: str | None) -> type | None:
    """torchvision's ``WeightsEnum`` subclass called ``enum_name`` (None without torchvision)."""
    if enum_name is None:
        return None
    try:
        import torchvision.models as tv_models
    except ImportError:
        return None
    return getattr(tv_models, enum_name, None)


def _is_weights_enum(obj: Any) -> bool:
    """Whether ``obj`` is a member of a torchvision ``WeightsEnum`` (without importing torchvision)."""
    for cls in type(obj).__mro__:
        if cls.__name__ == "WeightsEnum" and cls.__module__.startswith("torchvision"):
            return True
    return False


def resolve_weights(weights: Any, enum_name: str | None = None, builder: str = "model") -> Any:
    """Normalise ``weights`` to None, a ``WeightsEnum`` member, a ``Mapping`` or a path.

    A string that is not an existing file but names a member of the torchvision enum
    ``enum_name`` becomes that member. Raises ``TypeError`` for anything else, and for an
    enum member of another architecture; ``FileNotFoundError`` for a missing file.
    """
    if weights is None or isinstance(weights, Mapping):
        return weights
    if _is_weights_enum(weights):
        enum_cls = _weights_enum_class(enum_name)
        if enum_cls is None:
            raise TypeError(
                f"{builder} has no torchvision pretrained weights; pass a state dict or a file "
                f"path instead of {weights!r}"
            )
        if not isinstance(weights, enum_cls):
            raise TypeError(
                f"{builder} expects torchvision.models.{enum_name} weights, got "
                f"{type(weights).__name__}.{weights.name}"
            )
        return weights
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if os.path.isfile(path):
            return path
        enum_cls = _weights_enum_class(enum_name) if isinstance(weights, str) else None
        if enum_cls is not None:
            name = path.replace(enum_cls.__name__ + ".", "", 1)
            if name in enum_cls.__members__:
                return enum_cls[name]
        if os.path.isdir(path):
            raise IsADirectoryError(f"weights path {path!r} is a directory, not a state-dict file")
        hint = ""
        if enum_cls is not None:
            hint = f" (nor a member of torchvision.models.{enum_name}: {', '.join(enum_cls.__members__)})"
        raise FileNotFoundError(f"weights file {path!r} does not exist{hint}")
    raise TypeError(
        f"{builder}: weights must be None, a torchvision WeightsEnum member, a state dict "
        f"(Mapping) or a file path (str or os.PathLike), got {type(weights).__name__}"
    )


def num_classes_for(weights: Any, kwargs: dict[str, Any]) -> None:
    """Set ``kwargs["num_classes"]`` from a ``WeightsEnum``'s categories (as torchvision).

    Raises ``ValueError`` when the caller asked for a different number of classes.
    """
    if not _is_weights_enum(weights):
        return
    expected = len(weights.meta["categories"])
    given = kwargs.get("num_classes", expected)
    if given != expected:
        raise ValueError(
            f"num_classes={given} does not match the {expected} categories of {weights!r}"
        )
    kwargs["num_classes"] = expected


def load_state_dict_source(weights: Any, progress: bool = True) -> Mapping[str, Any]:
    """The state dict that resolved ``weights`` (enum member, Mapping or path) stands for."""
    if isinstance(weights, Mapping):
        return weights
    if _is_weights_enum(weights):
        return weights.get_state_dict(progress=progress, check_hash=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(
            f"weights file {weights!r} holds a {type(state).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


def load_weights(model: nn.Module, weights: Any, progress: bool = True) -> nn.Module:
    """Load resolved ``weights`` (None does nothing) into ``model`` with ``strict=True``."""
    if weights is not None:
        model.load_state_dict(load_state_dict_source(weights, progress))
    return model
