"""The analytic layer-to-layer prediction of Batch Kalman Normalization.

``docs/method.md`` section 4, last paragraph ("a cheaper deterministic alternative", beyond the
paper of Wang et al., "Batch Kalman Normalization", arXiv 1802.03133): instead of pushing sampled
pseudo-images ("shadow rows", :class:`~kalmannorm.KalmanPredictor`) through the layers between
two BKN layers, propagate their per-(group, channel) mean and variance in closed form. Under the
assumptions of the sampled prediction (a Gaussian sample, independent at every position and
channel, spatially constant moments, borders ignored) the moments are those of the pseudo-image
the sampled prediction would draw, i.e. the expected value of its prior, with no extra rows: a
tensor carries ``(mean, var)``, each ``[S, C]``, and every rule below is an elementwise op or an
``[S, C] x [C, C']`` matmul.

The model is traced with :mod:`torch.fx` (BKN and ``torch.nn`` layers are leaves) and the graph
is rewritten: each BKN layer takes the real input and the prior moments and returns its output
and its outgoing moments (:meth:`~kalmannorm.modules._BatchKalmanNorm.forward_with_prior`), and
every node between BKN layers gets a twin node that computes the moments of its output. The
generated ``forward`` runs both, with no interpreter in between.

The rules (``S`` groups, ``C`` channels, ``k`` positions averaged), in float32 (the nonlinear
ones computed in float64):

- conv (any dim, groups, stride, dilation; padding ignored), per group of channels:
  ``mean' = mean @ (sum_space W)^T + b``, ``var' = var @ (sum_space W^2)^T``;
- linear on ``[N, C]``: ``mean' = mean @ W^T + b``, ``var' = var @ (W^2)^T``;
- ReLU, leaky ReLU, ReLU6 / hardtanh / clamp with constant bounds, hardsigmoid, hardswish:
  exact closed forms for piecewise polynomials of a Gaussian (truncated normal moments,
  :func:`piecewise_moments`);
- SiLU, GELU, sigmoid, tanh, Mish, softplus, ELU: Gauss-Hermite quadrature
  (:func:`smooth_moments`);
- max pooling over ``k`` positions: the moments of the max of ``k`` independent Gaussians
  (:func:`max_moments`), adaptive max pooling as the mixture of its window sizes;
- average pooling over ``k`` positions (``AvgPool``, ``F.avg_pool``, adaptive average pooling,
  ``mean`` / ``sum`` over spatial dims): ``mean' = mean``, ``var' = var / k``;
- interpolation (``Upsample``, ``F.interpolate``, any mode): an average of input positions
  with weights summing to 1, ``mean' = mean``, ``var' = var * avg_positions(sum w^2)``,
  computed from the interpolation weights of the real sizes;
- sum / difference of two tensors (independent): means add (subtract), variances add; a tensor
  computed from the model's inputs without a BKN layer on its path counts as zero (its shadow
  rows in the sampled prediction are the image of zeros: zero for bias-free layers);
- product with a constant ``c``, a scalar or per channel (a parameter ``[C, 1, 1]``, say):
  ``mean' = c mean``, ``var' = c^2 var``; adding one: ``mean' = mean + c``; product of two
  random tensors (a squeeze-excitation gate), taken as independent (:func:`product_moments`);
- concatenation, ``split``, ``chunk`` and indexing (``x[:, a:b]``) along channels; zero channel
  padding (``F.pad`` of dim 1): ``(value, 0)`` for the new channels; spatial padding, slicing
  and indexing keep the moments (borders are ignored);
- view / reshape / flatten / transpose / permute that keep the batch dim and the order of
  channels before positions: the moments take the channel dims' shape (a channel shuffle
  ``[N, g, C/g, H, W]`` transposes them), a flatten of ``[N, C, *L]`` to ``[N, C * L]``
  repeats each channel ``L`` times;
- train-mode dropout with probability ``p`` (values scaled by ``1 / (1 - p)``; also
  ``Dropout2d`` and torchvision's ``StochasticDepth``, whose per-element marginal is the same):
  ``mean' = mean``, ``var' = (var + mean^2) / (1 - p) - mean^2``, as the sampled prediction's
  shadow rows are masked too (identity in eval mode);
- identity, ``clone``, ``contiguous``, ``detach``, negation; an eval-mode BatchNorm or BKN
  layer is the affine map with its running statistics;
- a BKN layer's outgoing moments: its combined ``(mean, var)`` with ``propagate="raw"`` (the
  released code), ``(bias, weight^2 var / (var + eps))`` with ``"normalized"``; a norm+act
  layer (timm's ``BatchNormAct2d``, converted to :class:`~kalmannorm.BatchKalmanNormAct2d`)
  runs its children after normalizing (``drop``, then ``act``), which the graph calls as
  modules of their own, each followed by its rule above (identity, dropout, an activation).

Any other op that receives moments on the way to a BKN layer (attention, a division by a
random tensor, unknown modules, also as a norm+act layer's child) is refused when the wrapper
is built, naming the op; ops after
the last BKN layer (a classifier head) need no rule. The sampled prediction handles any layer.

The package: :mod:`.rules` (the moments through linear and structural ops) and
:mod:`.activations` (through elementwise nonlinearities, max pooling and products) are pure
functions of ``[S, C]`` tensors; :mod:`.twins` holds their runtime twins, called by the
rewritten graph with the op's input, output and arguments; :mod:`.table` maps modules,
functions and tensor methods to twins; :mod:`.graph` traces and rewrites the model
(:class:`AnalyticKalmanPredictor`).
"""
from .activations import (
    clamp_moments,
    leaky_relu_moments,
    max_moments,
    piecewise_moments,
    product_moments,
    smooth_moments,
)
from .graph import AnalyticKalmanPredictor, check_analytic
from .rules import (
    conv_moments,
    dropout_moments,
    linear_moments,
    normalized_moments,
    pool_moments,
    relu_moments,
)
from .table import supported_ops

__all__ = [
    "AnalyticKalmanPredictor",
    "check_analytic",
    "conv_moments",
    "linear_moments",
    "relu_moments",
    "clamp_moments",
    "leaky_relu_moments",
    "piecewise_moments",
    "smooth_moments",
    "max_moments",
    "product_moments",
    "pool_moments",
    "dropout_moments",
    "normalized_moments",
    "supported_ops",
]
