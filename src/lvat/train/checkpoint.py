"""Checkpoints: written atomically, loaded weights-only (no arbitrary unpickling), then checked.

`load` refuses anything but tensors and plain containers, and says why in one line. The helpers
below it check that what was loaded is the checkpoint the caller needs (a classifier run, not a
VAE/Glow fit; every entry present; a state dict that fits the model), so that a wrong file is a
one-line `LvatError` naming the first problem, never a traceback from deep inside torch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.errors import LvatError, one_line
from lvat.io import atomic_write

CHECKPOINT = "checkpoint.pt"

EVAL_KEYS = ("model", "config", "step")  # what `lvat eval` and `lvat figures` read
RESUME_KEYS = (*EVAL_KEYS, "optimizer", "elapsed")  # what `lvat train --resume` also reads


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file beside `path`, then rename: a crash leaves the old file intact."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only.

    A file that asks the unpickler for anything else (code, classes) is refused and NOT loaded;
    the one-line error leads with what it asked for. A file that is not a torch checkpoint at
    all, or holds something other than a dict, is an error too.
    """
    path = Path(path)
    if not path.is_file():
        if path.name == CHECKPOINT and path.parent.is_dir():
            raise LvatError(
                f"checkpoint not found: {path} ({path.parent} is not the folder of a `lvat train` "
                "or `lvat fit` run, or its checkpoint was deleted)"
            )
        raise LvatError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not for the user
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files
        raise load_error(path, exc) from None
    if not isinstance(state, dict):
        raise LvatError(
            f"{path} is not an lvat checkpoint (it holds a {type(state).__name__}, not a dict of "
            "entries); use the checkpoint.pt of a run folder"
        )
    return state


# torch's advice around the cause (re-run with weights_only=False, file an issue, read the docs)
# is exactly what a user must not do with a file that wants to run code: keep the cause only.
_TORCH_ADVICE = re.compile(
    r"weights.only|PyTorch 2\.\d|trusted source|file an issue|documentation|"
    r"https?://|add_safe_globals|safe_globals|allowlist",
    re.IGNORECASE,
)
_CAUSES = (
    re.compile(r"Unsupported global: GLOBAL [^\s]+"),  # torch <= 2.5 and some 2.6+ paths
    re.compile(r"[^.\n]*unsupported GLOBAL [^\n]*?(?=\.?\s*$|\.\s)", re.IGNORECASE | re.MULTILINE),
    re.compile(r"WeightsUnpickler error:\s*(?P<cause>[^\n]+)"),
)


def unsafe_cause(message: str) -> str:
    """The cause inside torch's weights-only refusal, without torch's advice around it."""
    for pattern in _CAUSES:
        m = pattern.search(message)
        if m:
            cause = m.groupdict().get("cause") or m.group(0)
            return " ".join(cause.split()).strip(" .:")
    kept = [s for s in re.split(r"(?<=\.)\s+|\n", message) if s.strip()]
    kept = [s for s in kept if not _TORCH_ADVICE.search(s) and "load failed" not in s]
    return " ".join(" ".join(kept).split()).strip(" .:") or "it holds objects other than tensors"


def load_error(path: str | Path, exc: BaseException) -> LvatError:
    """The one-line error for a file torch cannot load weights-only (shared with VAE/Glow loads:
    `lvat.models.transformers.load_transformer` can raise this too)."""
    message = str(exc)
    if "weights only load failed" in message.lower() or "weightsunpickler" in message.lower():
        return LvatError(
            f"{path}: {unsafe_cause(message)}: it is not a trusted lvat checkpoint and was NOT "
            "loaded (lvat reads only tensors and plain data, never code); use a checkpoint "
            "written by `lvat train` or `lvat fit`"
        )
    cause = unsafe_cause(message) if _TORCH_ADVICE.search(message) else " ".join(message.split())
    return LvatError(
        f"{path}: not a readable lvat checkpoint ({cause[:300]}); it may be truncated or not a "
        "torch file; use the checkpoint.pt of a run folder"
    )


def _run_of(path: Path) -> Path:
    return path.parent if path.name == CHECKPOINT else path


def check_training(
    state: Mapping[str, Any], path: str | Path, keys: tuple[str, ...] = EVAL_KEYS
) -> Mapping[str, Any]:
    """Raise a one-line LvatError unless `state` is an `lvat train` checkpoint with `keys`.

    An `lvat fit` checkpoint (a VAE/Glow) is named as such, with where it belongs instead. Returns
    `state` for chaining. Use `RESUME_KEYS` before resuming, the default before evaluating.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise LvatError(f"{path} is not an lvat training checkpoint (it holds a {type(state)})")
    from lvat.models.registry import KINDS  # the `kind` entry of an `lvat fit` checkpoint

    kind = KINDS.get(state.get("kind"))
    if kind is not None:
        raise LvatError(
            f"{_run_of(path)} is an `lvat fit` run (a {kind.display} "
            f"transformer), not a classifier run; use it as method.transformer: "
            f"--method.transformer {path}"
        )
    checks = {
        "config": lambda v: isinstance(v, Mapping),
        "model": lambda v: isinstance(v, Mapping),
        "optimizer": lambda v: isinstance(v, Mapping),
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "elapsed": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    }
    for key in keys:
        if key not in state:
            raise LvatError(
                f"{path} is not an lvat training checkpoint (missing '{key}'); use the "
                "checkpoint.pt that `lvat train` wrote in a run folder"
            )
        if key in checks and not checks[key](state[key]):
            raise LvatError(
                f"{path} is not an lvat training checkpoint ('{key}' holds "
                f"{_short(state[key])}, not what `lvat train` writes there)"
            )
    return state


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def load_training(path: str | Path, keys: tuple[str, ...] = EVAL_KEYS) -> dict[str, Any]:
    """`load` + `check_training`: a classifier run's checkpoint, or a one-line LvatError."""
    state = load(path)
    check_training(state, path, keys)
    return state


def saved_config(state: Mapping[str, Any], path: str | Path) -> Any:
    """The validated `Config` stored in a training checkpoint; a one-line LvatError if this lvat
    cannot read it (another version's keys, or an edited file)."""
    from lvat.config import Config, from_dict
    from lvat.errors import ConfigError

    try:
        return from_dict(Config, dict(state["config"]))
    except ConfigError as exc:
        raise LvatError(
            f"{path}: the config saved in this checkpoint is not valid for this lvat ({exc}); "
            "was it written by another version or edited?"
        ) from None


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], path: str | Path, what: str
) -> None:
    """Raise a one-line LvatError naming the first key that does not fit `module`: missing,
    unexpected, not a tensor, or of another shape. `what` names the model in the message."""
    expected = module.state_dict()
    problem = ""
    for key, want in expected.items():
        got = state_dict.get(key)
        if key not in state_dict:
            problem = f"'{key}' is missing from the file"
        elif not isinstance(got, torch.Tensor):
            problem = f"'{key}' is not a tensor in the file"
        elif tuple(got.shape) != tuple(want.shape):
            problem = (
                f"'{key}' has shape {tuple(got.shape)} in the file but {tuple(want.shape)} in "
                "the model"
            )
        if problem:
            break
    if not problem:
        extra = [k for k in state_dict if k not in expected]
        if extra:
            problem = f"the file has '{extra[0]}', which the model has not"
    if problem:
        raise LvatError(f"{path} does not match {what}: {problem}")


def load_model_state(
    module: nn.Module, state_dict: Mapping[str, Any], path: str | Path, what: str
) -> None:
    """`check_state_dict`, then `module.load_state_dict(state_dict)`."""
    check_state_dict(module, state_dict, path, what)
    module.load_state_dict(state_dict)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Any], path: str | Path
) -> None:
    """`optimizer.load_state_dict(state)`; a state of another optimizer or model is a one-line
    LvatError (torch raises ValueError/KeyError for those: the file, not our code, is wrong)."""
    try:
        optimizer.load_state_dict(state)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as exc:
        raise LvatError(
            f"{path} does not match the optimizer of its model: {one_line(exc)}"
        ) from None


def check_resume_state(state: Mapping[str, Any], path: str | Path, cfg: Any) -> Mapping[str, Any]:
    """Raise a one-line LvatError unless the loaded `state` can resume the run `cfg`:
    `check_training` with `RESUME_KEYS`, a saved config this lvat reads, and the keys that
    cannot change on resume (`Config.RESUME_FIXED`: model, split, image shape, method, seed)
    equal in `cfg` and in the saved config. Returns `state`."""
    from lvat.config.core import check_resume

    check_training(state, path, RESUME_KEYS)
    check_resume(saved_config(state, path), cfg, str(_run_of(Path(path))))
    return state


def load_for_resume(path: str | Path, cfg: Any) -> dict[str, Any]:
    """`load` + `check_resume_state`: a training checkpoint that can resume `cfg`."""
    state = load(path)
    check_resume_state(state, path, cfg)
    return state


def rng_state() -> dict[str, Any]:
    """Every global generator a training step draws from (dropout, perturbation noise)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
