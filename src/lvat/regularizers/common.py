"""Pure functions and context managers shared by VAT and LVAT (docs/method.md §1).

Everything here is independent of the classifier, the transformer, datasets and configs:

- `normalize`, `normalize_joint`: the authors' per-sample normalisation (vat_tf
  `get_normalized_vector`).
- `kl_divergence`, `entropy`: consistency cost and VAT+Ent term from logits, in float32 or float64.
- `power_iteration`: the gradient g of Algorithms 1/2, w.r.t. the perturbation d only.
- `zero_direction`: the fraction of samples whose perturbation r = eps * normalize(g) vanished.
- `frozen_bn_stats`: unlabeled passes use batch statistics but never update running statistics.
- `full_precision`: no autocast and no TF32 inside, for the finite-difference probe passes.
- `RngSnapshot`: lets every unlabeled pass of one call draw the same dropout masks.
- `ReusedDropoutMasks`: on the CPU, those masks are drawn once per call and then reused.
- `replaced_forwards`: modules' forwards swapped for the length of a context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "POWER_METHODS",
    "ReusedDropoutMasks",
    "RngSnapshot",
    "check_hparams",
    "entropy",
    "frozen_bn_stats",
    "full_precision",
    "kl_divergence",
    "normalize",
    "normalize_groups",
    "normalize_joint",
    "perturbation_dtype",
    "power_iteration",
    "replaced_forwards",
    "zero_direction",
]

# Constants of the authors' `get_normalized_vector` (vat_tf vat.py); they are part of the method:
# r = eps * normalize(g) has norm eps * s / sqrt(1e-6 + s^2) with s = ||g / max|g|||, i.e. just
# under eps (relative shortfall ~5e-7 / s^2, s >= 1).
# How the power iteration multiplies by the curvature: the authors' finite difference, or exact
# Fisher-vector products (`lvat.regularizers.exact`).
POWER_METHODS = ("finite-difference", "exact")

_MAX_EPS = 1e-12
_SQ_EPS = 1e-6


def perturbation_dtype(t: Tensor) -> torch.dtype:
    """Dtype for perturbation maths: at least float32, float64 kept (docs/method.md §1.6).

    xi = 1e-6 times a unit vector spread over thousands of elements is lost in bf16/fp16, so half
    precision inputs and latents are promoted to float32 even under autocast.
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(d: Tensor) -> Tensor:
    """View (B, ...) as (B, n): one row per sample, any rank (a (B,) tensor is (B, 1))."""
    if d.dim() == 0:
        raise ValueError("expected a batched tensor (B, ...), got a 0-d tensor")
    return d.reshape(d.shape[0], -1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Shape a (B,) tensor so it broadcasts against `like` (B, ...)."""
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))


def normalize(d: Tensor) -> Tensor:
    """Per-sample unit-L2 normalisation over all non-batch elements, as in the authors' code.

    d / (1e-12 + max|d|), then / sqrt(1e-6 + sum d^2); both per sample. Dividing by the max first
    keeps the squares representable when g is tiny (KL gradients at xi = 1e-6 are ~1e-9). The
    result's norm is s / sqrt(1e-6 + s^2) <= 1 with s the norm after the first step.

    Args:
        d: tensor (B, ...) of any rank >= 1.

    Returns:
        Tensor of d's shape and dtype.
    """
    d = d / _per_sample(_MAX_EPS + _flat(d).abs().amax(dim=1), d)
    return d / _per_sample(torch.sqrt(_SQ_EPS + _flat(d).pow(2).sum(dim=1)), d)


def normalize_joint(groups: Sequence[Tensor]) -> list[Tensor]:
    """`normalize` applied to all groups as if they were one vector per sample (LVAT "joint")."""
    max_abs = torch.stack([_flat(d).abs().amax(dim=1) for d in groups]).amax(dim=0)  # (B,)
    groups = [d / _per_sample(_MAX_EPS + max_abs, d) for d in groups]
    sq = torch.stack([_flat(d).pow(2).sum(dim=1) for d in groups]).sum(dim=0)  # (B,)
    return [d / _per_sample(torch.sqrt(_SQ_EPS + sq), d) for d in groups]


def normalize_groups(groups: Sequence[Tensor], joint: bool = False) -> list[Tensor]:
    """Normalise each group on its own ("separate") or all together ("joint")."""
    return normalize_joint(groups) if joint else [normalize(d) for d in groups]


def _log_softmax(logits: Tensor) -> Tensor:
    # Cast before log_softmax: bf16 logits under autocast would make p(x + xi*d) == p(x).
    return F.log_softmax(logits.to(perturbation_dtype(logits)), dim=1)


def kl_divergence(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), mean over the batch.

    As vat_tf `kl_divergence_with_logit`, from log-softmax of the logits.

    Args:
        target_logits: (B, K) logits of p; the caller detaches them (p is the fixed target).
        logits: (B, K) logits of q.

    Returns:
        0-d tensor, float32 (float64 if either input is float64).
    """
    log_p, log_q = _log_softmax(target_logits), _log_softmax(logits)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the entropy -sum_k p_k log p_k of softmax(logits) (VAT+Ent)."""
    log_p = _log_softmax(logits)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def power_iteration(
    logits_fn: Callable[[list[Tensor]], Tensor],
    target_logits: Tensor,
    d: Sequence[Tensor],
    xi: float,
    power_iterations: int = 1,
    joint: bool = False,
) -> list[Tensor]:
    """The gradient g of Algorithms 1/2: d <- xi * normalize(d); g = dKL(p || q(d))/dd; repeat.

    Gradients are taken w.r.t. d only (`torch.autograd.grad(inputs=d)`), so no parameter's `.grad`
    is touched and this works under an outer `torch.no_grad()` too.

    Args:
        logits_fn: maps perturbation groups d to the classifier's logits at the perturbed point
            (VAT: model(x + d); LVAT: model(decode(z + d))).
        target_logits: (B, K) detached logits of the clean target p(x).
        d: initial perturbation groups (random normal), each (B, ...).
        xi: finite-difference step; d is rescaled to norm ~xi before every pass.
        power_iterations: number of passes (>= 1).
        joint: normalise all groups as one vector per sample instead of group by group.

    Returns:
        g as a list of detached tensors shaped like d (not normalised; a group the logits do not
        depend on gets zeros).
    """
    g = list(d)
    with torch.enable_grad():
        for _ in range(power_iterations):
            d = [(xi * n).requires_grad_() for n in normalize_groups(g, joint)]
            kl = kl_divergence(target_logits, logits_fn(d))
            grads = torch.autograd.grad(kl, d, allow_unused=True)
            g = [
                torch.zeros_like(di) if gi is None else gi for di, gi in zip(d, grads, strict=True)
            ]
    return [gi.detach() for gi in g]


def zero_direction(r: Sequence[Tensor], eps: float) -> Tensor:
    """Fraction of samples whose perturbation vanished: norm of r over all groups below eps / 2.

    r = eps * normalize(g) has norm just under eps (per group) whenever max|g| is well above
    1e-12, but it is exactly 0 when g is (a saturated softmax: p(x + xi*d) == p(x) is one-hot, so
    dKL/dd == 0, e.g. after a divergent learning rate) and tiny when g underflowed. Such samples
    get no consistency cost, and nothing else shows it: the loss stays finite, adv_l2 just drops.

    Args:
        r: the perturbation groups, each (B, ...).
        eps: the perturbation norm they were scaled to.

    Returns:
        0-d float32 tensor in [0, 1], detached, on r's device (no host sync).
    """
    with torch.no_grad():
        sq = torch.stack([_flat(ri).float().pow(2).sum(dim=1) for ri in r]).sum(dim=0)  # (B,)
        return (sq < (0.5 * eps) ** 2).float().mean()


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers use batch statistics in train mode but update no running stats.

    docs/method.md §1.7: only the labeled pass updates running_mean/running_var/
    num_batches_tracked. With
    `track_running_stats=False` in train mode, `_BatchNorm.forward` passes no buffers to
    `F.batch_norm` (batch statistics, no update) and skips `num_batches_tracked += 1`; in eval mode
    the buffers are still used read-only. Covers BatchNorm1d/2d/3d, SyncBatchNorm and the lazy
    variants. The flags are restored even if the body raises. (A `torch.compile`d model may
    recompile once for the flipped flag.)
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    try:
        for m in bns:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(bns, saved, strict=True):
            m.track_running_stats = flag


@contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Inside, float32 convs and matmuls run in true float32: autocast off, TF32 off (CUDA).

    The power iteration's probe x + xi*d moves each element by ~xi / sqrt(n) (2e-8 for xi = 1e-6
    on a 3x32x32 image). Rounded to bf16 (8-bit mantissa) or TF32 (10-bit; cuDNN's default for
    float32 convs on Ampere and later) at the first conv, that is below one unit in the last
    place of any pixel > ~1e-5, so p(x + xi*d) == p(x) bit for bit, g = 0 and r = 0: VAT would
    silently switch off. The target pass, the probe passes and every transformer pass therefore
    run here; only the adversarial pass x + r (norm eps, far above rounding) may use reduced
    precision. Flags are restored on exit; flipping them is host-side (no device sync).
    """
    device = torch.device(device)
    is_available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    no_amp = (
        torch.autocast(device.type, enabled=False)
        if is_available(device.type)
        else contextlib.nullcontext()
    )
    matmul = torch.get_float32_matmul_precision()  # "high"/"medium" allow TF32/bf16 matmuls
    convs = no_tf32_convs() if device.type == "cuda" else contextlib.nullcontext()
    if matmul != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with no_amp, convs:
            yield
    finally:
        if matmul != "highest":
            torch.set_float32_matmul_precision(matmul)


@contextmanager
def no_tf32_convs() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 inside (torch's default lets them use TF32)."""
    b = torch.backends.cudnn
    try:
        saved = b.allow_tf32  # the legacy flag, as torch's own default sets it
    except RuntimeError:  # conv and RNN set apart with the per-op API: torch refuses one answer
        saved = None
    if saved is None:
        conv = b.conv.fp32_precision
        b.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            b.conv.fp32_precision = conv
        return
    b.allow_tf32 = False
    try:
        yield
    finally:
        b.allow_tf32 = saved


class RngSnapshot:
    """Snapshot of the CPU generator and of the generator of `device`, restorable many times.

    vat_tf shares dropout masks across the clean, x + xi*d and x + r passes of one step. Restoring
    the same snapshot right before each classifier call reproduces that for any model: every pass
    draws the same masks, and the generator ends one pass past the snapshot, so the next step draws
    fresh ones. CUDA is optional: only a CUDA `device` snapshots a device generator (other
    accelerators share the CPU generator's masks only). `get_rng_state` reads host-side generator
    state; no device sync.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = (
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        )

    def restore(self) -> None:
        """Reset the generators to the snapshot."""
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


class _ReusedMaskDropout:
    """The forward of one `nn.Dropout` in train mode on the CPU, with its masks drawn once.

    It computes what ATen's CPU dropout computes (`_dropout_impl`: noise = bernoulli(1 - p) in the
    input's dtype and layout, noise /= 1 - p, input * noise) and keeps the 0/1 draw of its k-th call
    in a pass, so that the k-th call of a later pass (same shape and layout) multiplies by the same
    noise without drawing: the same numbers bit for bit as restoring the generator and drawing
    again (a 0/1 draw is exact in any dtype, and bernoulli_ draws the same stream whatever the
    dtype), at a third of the cost.
    """

    def __init__(self, module: nn.Dropout) -> None:
        self.module = module
        self.draws: list[Tensor] = []  # 0/1 per call of a pass, the first pass's dtype and layout
        self.noise: dict[tuple[int, torch.dtype], Tensor] = {}  # draw / (1 - p)
        self.calls = 0  # calls in the current pass

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        if not (m.training and 0 < m.p < 1 and x.device.type == "cpu" and x.is_floating_point()):
            return F.dropout(x, m.p, m.training, m.inplace)
        k, self.calls = self.calls, self.calls + 1
        kept = self.draws[k] if k < len(self.draws) else None
        if kept is None or (kept.shape, kept.stride()) != (x.shape, x.stride()):
            self.draws[k:] = [torch.empty_like(x).bernoulli_(1 - m.p)]  # draw as ATen does
            self.noise = {key: v for key, v in self.noise.items() if key[0] < k}
        noise = self.noise.get((k, x.dtype))
        if noise is None:
            noise = self.noise[k, x.dtype] = self.draws[k].to(x.dtype, copy=True).div_(1 - m.p)
        return x.mul_(noise) if m.inplace else x * noise


class ReusedDropoutMasks:
    """`with ReusedDropoutMasks(model) as masks: masks.new_pass(); model(x); ...`

    Inside, each `nn.Dropout` of `model` (exactly that class) draws its CPU masks in the first pass
    and reuses them in the later passes: for the passes of one regularizer call, which share their
    masks anyway (`RngSnapshot`), so only the cost changes. `new_pass()` marks where a pass begins
    (a module called twice in one pass draws two masks, as without this). Elsewhere (eval mode, p
    of 0 or 1, CUDA, whose fused dropout kernel draws differently) the module's own forward runs,
    and a `torch.compile`d model is left alone (a patched forward would make it recompile every
    step). The forwards are restored on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module) -> None:
        compiled = any(
            getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
            for m in model.modules()
        )
        drops = [] if compiled else [m for m in model.modules() if type(m) is nn.Dropout]
        self._forwards = [(m, _ReusedMaskDropout(m)) for m in drops]
        self._patch: AbstractContextManager[None] | None = None

    def new_pass(self) -> None:
        for _, f in self._forwards:
            f.calls = 0

    def __enter__(self) -> ReusedDropoutMasks:
        self._patch = replaced_forwards(self._forwards)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._patch is not None
        self._patch.__exit__(*exc)


@contextmanager
def replaced_forwards(
    forwards: Sequence[tuple[nn.Module, Callable[..., object]]],
) -> Iterator[None]:
    """Inside, each module's `forward` is the callable paired with it (an instance attribute
    shadows the method); the previous instance attribute, if any, is back on exit, also when the
    body raises."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in forwards]
    for m, forward in forwards:
        m.forward = forward
    try:
        yield
    finally:
        for m, forward in saved:
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def check_hparams(
    eps: float,
    xi: float,
    power_iterations: int,
    entropy_weight: float,
    power_method: str = "finite-difference",
) -> None:
    """Raise ValueError with a clear message for hyper-parameters the method cannot use."""
    if power_method not in POWER_METHODS:
        raise ValueError(f"power_method must be one of {POWER_METHODS}, got {power_method!r}")
    for name, value in (("eps", eps), ("xi", xi)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int):
        raise ValueError(f"power_iterations must be an int >= 1, got {power_iterations!r}")
    if power_iterations < 1:
        raise ValueError(f"power_iterations must be an int >= 1, got {power_iterations!r}")
    if not (
        isinstance(entropy_weight, (int, float))
        and math.isfinite(entropy_weight)
        and entropy_weight >= 0
    ):
        raise ValueError(f"entropy_weight must be a finite number >= 0, got {entropy_weight!r}")
