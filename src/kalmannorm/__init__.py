"""kalmannorm: Batch Kalman Normalization for training deep networks with micro-batches.

Wang et al., "Batch Kalman Normalization: Towards Training Deep Neural Networks with
Micro-Batches" (arXiv 1802.03133; NeurIPS 2018 as "Kalman Normalization").

>>> import kalmannorm as kn
>>> model = kn.convert_batchnorm(model, gain=0.9, micro_batch=2)   # doctest: +SKIP
>>> deploy = kn.to_batchnorm(model)                                # doctest: +SKIP
"""
from . import functional
from .analytic import AnalyticKalmanPredictor
from .batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .functional.dispatch import get_backend, set_backend, use_backend
from .convert import (BatchKalmanNormAct2d, BatchKalmanNormActNd, convert_batchnorm,
                      norm_then, register_converter, to_batchnorm)
from .modules import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, BatchKalmanNormNd
from .norms import GroupNorm, InstanceNorm, LayerNorm, get_norm_layer, norm_names, register_norm
from .prediction import KalmanPredictor, ShadowBatch, guard_counts, has_kalman_layers

__version__ = "0.1.0"

__all__ = [
    "BatchKalmanNorm1d", "BatchKalmanNorm2d", "BatchKalmanNorm3d", "BatchKalmanNormNd",
    "BatchKalmanNormAct2d", "BatchKalmanNormActNd",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GroupNorm", "InstanceNorm", "LayerNorm",
    "KalmanPredictor", "ShadowBatch",
    "AnalyticKalmanPredictor",
    "convert_batchnorm", "to_batchnorm", "register_converter", "norm_then",
    "get_norm_layer", "norm_names", "register_norm",
    "guard_counts", "has_kalman_layers",
    "functional",
    "set_backend", "get_backend", "use_backend",
]
