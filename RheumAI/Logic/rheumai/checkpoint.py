"""Checkpoints without pickle: a folder of ``model.safetensors`` + ``model_card.json``.

Pickle files (``.pt``, ``.pth``, ``.ckpt``...) are refused; a file that is not safetensors fails to
parse instead of running. Card and weights are bound: the SHA-256 of the tensors
(:func:`tensors_sha256`) is stored in the card and in the safetensors header; loading refuses a card
beside weights it does not name, and weights that no longer hash to it. The resume state of a
training run (``state/``) follows the same rule: tensors in safetensors files, the rest in JSON.
"""

from __future__ import annotations

import hashlib
import json
import platform
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, link_or_copy, replace_dir, staging_dir, write_json
from .errors import InputError

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}
REQUIRED_CARD_KEYS = ("architecture", "preprocessing", "threshold", "threshold_rule", "task")


def software_versions() -> dict[str, str]:
    from importlib.metadata import version

    from . import __version__

    return {"rheumai": __version__, "python": platform.python_version(), "platform": platform.platform(),
            **{name: version(name) for name in ("torch", "monai", "numpy", "safetensors", "scikit-learn")}}


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without DDP's ``module.`` prefix, as contiguous, unshared CPU tensors."""
    module = getattr(module, "module", module)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict: names, dtypes, shapes and bytes in name order (independent of
    the file layout and header, so it can be stored in both)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _unreadable(path: str | Path, exc: Exception) -> InputError:
    return InputError(path, f"not a readable safetensors file ({exc}); pickled checkpoints are refused")


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(path, "pickle-based checkpoints are refused (they can run arbitrary code); "
                               "use a RheumAI checkpoint folder (model.safetensors + model_card.json)")


def load_weights(path: str | Path, model: torch.nn.Module | None = None,
                 expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (pickles refused) whose :func:`tensors_sha256` must be ``expected_sha256``
    if given; load it into ``model`` (strict) if given."""
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if expected_sha256 is not None and tensors_sha256(tensors) != expected_sha256:
        raise InputError(path, f"its tensors do not hash to {expected_sha256[:16]}... named by the model card: "
                               "the weights were changed or damaged after the checkpoint was written")
    if model is not None:
        try:
            getattr(model, "module", model).load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise InputError(path, f"weights do not match the architecture: {str(exc).splitlines()[0]}") from None
    return tensors


def save_checkpoint(folder: str | Path, model: torch.nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` then ``model_card.json`` (each atomically, the card last, so a
    folder with a card always has matching weights); returns the folder. Missing ``software`` /
    ``model_id`` entries are filled in."""
    folder = Path(folder)
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    state = cpu_state_dict(model)
    card = {"software": software_versions(), "model_id": uuid.uuid4().hex[:12], **card, "weights_file": WEIGHTS,
            "format": "rheumai-checkpoint/1", "weights_sha256": tensors_sha256(state)}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"model_id": str(card["model_id"]),
                                             "weights_sha256": card["weights_sha256"]})
    write_json(folder / CARD, card)
    return folder


def _checkpoint_folder(path: Path) -> Path:
    _refuse_pickle(path)
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    return path.parent if path.is_file() else path


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint folder (or of its card / weights file)."""
    card_path = _checkpoint_folder(Path(path)) / CARD
    if not card_path.is_file():
        raise InputError(card_path.parent, f"no {CARD} here: not a RheumAI checkpoint folder")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(card_path, f"model card is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise InputError(card_path, f"model card must be a JSON object, not {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise InputError(card_path, f"model card lacks {missing}")
    _check_threshold(card_path, card["threshold"])
    return card


def _check_threshold(card_path: Path, value: Any, where: str = "threshold") -> None:
    """A card's threshold: a probability in [0, 1], per head a {name: probability} object, or null
    (no decision threshold, e.g. a regression head)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_threshold(card_path, v, f"{where}.{k}")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not 0.0 <= value <= 1.0):
        raise InputError(card_path, f"model card {where} must be a probability in [0, 1], not {value!r}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the card's task architecture and load its weights (strict); model in eval mode. A card
    beside weights it does not belong to is refused (no hash on either side: an older checkpoint)."""
    from .tasks import get_task

    folder = _checkpoint_folder(Path(path))
    card = read_card(folder)
    weights = folder / str(card.get("weights_file", WEIGHTS))
    if not weights.is_file():
        raise InputError(weights, f"weights file not found (named by {folder / CARD})")
    meta = weights_metadata(weights)
    sha, in_file = card.get("weights_sha256"), meta.get("weights_sha256")
    if sha != in_file:
        raise InputError(folder / CARD, f"belongs to weights {str(sha)[:16]}... but {weights} holds weights "
                                        f"{str(in_file)[:16]}... (model {meta.get('model_id', '?')}, card model "
                                        f"{card.get('model_id', '?')}): the card and the weights come from different "
                                        "runs; use the card written with these weights")
    try:
        model = get_task(str(card["task"])).build_model(card["architecture"])
    except (KeyError, ValueError) as exc:  # unknown task, unusable architecture
        raise InputError(folder / CARD, str(exc.args[0])) from None
    load_weights(weights, model, expected_sha256=sha)
    return model.to(device).eval(), card


# ---------------------------------------------------------------- resume state (training runs)

def save_training_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict[str, Any], best_model: torch.nn.Module | dict[str, torch.Tensor] | None = None,
                        scaler: Any = None, keep_best: bool = False) -> Path:
    """Save what resuming at an epoch boundary needs (model, optimiser, RNG, AMP scaler, ``meta``), swapped
    in whole (:func:`rheumai.atomic.replace_dir`). ``best_model``: stored as ``best_model.safetensors``;
    with ``keep_best`` and none given the previous state's best weights are carried over (hard link)."""
    folder = Path(folder)
    opt = optimizer.state_dict()
    opt_tensors = {f"state.{i}.{k}": v.detach().to("cpu").contiguous().clone()
                   for i, e in opt["state"].items() for k, v in e.items() if torch.is_tensor(v)}
    scalars = {str(i): {k: v for k, v in e.items() if not torch.is_tensor(v)} for i, e in opt["state"].items()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"torch": torch.get_rng_state(), **{f"cuda{i}": s for i, s in enumerate(cuda)}}
    with staging_dir(folder) as new:
        save_file(cpu_state_dict(model), str(new / "model.safetensors"))
        if best_model is not None:
            best = best_model if isinstance(best_model, dict) else cpu_state_dict(best_model)
            save_file({k: v.contiguous() for k, v in best.items()}, str(new / "best_model.safetensors"))
        elif keep_best and (folder / "best_model.safetensors").is_file():  # unchanged: linked, not rewritten
            link_or_copy(folder / "best_model.safetensors", new / "best_model.safetensors")
        save_file(opt_tensors, str(new / "optimizer.safetensors"))
        save_file(rng, str(new / "rng.safetensors"))
        write_json(new / "state.json", {**meta, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
                                        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled()
                                        else None})
        replace_dir(new, folder)
    return folder


def find_training_state(folder: str | Path) -> Path | None:
    """The complete state folder to resume from: ``folder``, or (after a kill between the two renames
    of a swap where the file system has no atomic exchange) the previous state beside it."""
    folder = Path(folder)
    for cand in (folder, *sorted(folder.parent.glob(f".{folder.name}.old-*"))):
        if (cand / "state.json").is_file():
            return cand
    return None


def load_training_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimiser, RNG (and AMP scaler) in place; return (meta, best weights or None)."""
    found = find_training_state(folder)
    if found is None:
        raise InputError(folder, "no resumable training state here (state.json missing)")
    try:
        meta = json.loads((found / "state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(found / "state.json", f"corrupt: {exc}") from None
    load_weights(found / "model.safetensors", model)
    opt_meta = meta.pop("optimizer")
    state: dict[int, dict[str, Any]] = {int(i): dict(e) for i, e in opt_meta["scalars"].items()}
    for name, value in load_weights(found / "optimizer.safetensors").items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = value  # load_state_dict moves them to the parameters' device
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g
              for g in opt_meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_weights(found / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    scaler_state = meta.pop("scaler", None)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    best = found / "best_model.safetensors"
    return meta, load_weights(best) if best.is_file() else None
