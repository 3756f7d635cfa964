"""The ``resnet_fast`` operators (``torch.ops.resnet_fast.*``) and their Python wrappers.

Importing this package defines every operator with ``torch.library`` and loads the CUDA
extension when it was built (it adds CUDA kernels to the same operators).
"""

from resnet_fast import kernels  # noqa: F401  registers the Triton kernels when triton is installed
from resnet_fast._extension import extension_load_error
from resnet_fast.ops import batch_norm_act_stages, conv2d_cuda, reference  # noqa: F401  register the cuda and torch backends' kernels
from resnet_fast.ops.batch_norm_act import batch_norm_act
from resnet_fast.ops.batch_norm_stats import batch_norm_stats
from resnet_fast.ops.conv2d_bias_act import conv2d_bias_act
from resnet_fast.ops.conv2d_stats import conv2d_stats
from resnet_fast.ops.conv_bn_act import conv_bn_act
from resnet_fast.ops.dispatch import (
    BackendUnavailableError,
    backend_info,
    get_backend,
    set_backend,
)
from resnet_fast.ops.scale_shift_act import scale_shift_act
from resnet_fast.ops.sync_batch_norm_act import sync_batch_norm_act

extension_load_error()  # adds the CUDA kernels of resnet_fast._C when it was built

__all__ = [
    "BackendUnavailableError",
    "backend_info",
    "batch_norm_act",
    "batch_norm_stats",
    "conv2d_bias_act",
    "conv2d_stats",
    "conv_bn_act",
    "get_backend",
    "reference",
    "scale_shift_act",
    "set_backend",
    "sync_batch_norm_act",
]
