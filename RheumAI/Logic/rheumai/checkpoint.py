"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a folder: ``model.safetensors`` (weights) + ``model_card.json`` (architecture,
preprocessing, threshold, data counts, metrics, software versions). ``load_checkpoint`` never
unpickles: ``.pt`` / ``.pth`` / ``.ckpt`` / ``.pkl`` files are refused, and a file that is not a
safetensors file fails to parse instead of being executed.

Card and weights are bound: the SHA-256 of the tensors (:func:`tensors_sha256`) is stored in the
card (``weights_sha256``) and in the safetensors header metadata; loading refuses a card beside
weights it does not name, and weights whose tensors no longer hash to it.

The resume state of a training run (``state/`` folder: model, optimiser, RNG, epoch, best AUC)
follows the same rule: optimiser tensors in ``optimizer.safetensors``, the rest in ``state.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json
from .errors import InputError
from .tasks.cervical_ra.model import build_model

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}
REQUIRED_CARD_KEYS = ("architecture", "preprocessing", "threshold", "threshold_rule", "task")


def software_versions() -> dict[str, str]:
    import monai
    import safetensors
    import sklearn

    from . import __version__

    return {"rheumai": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "numpy": np.__version__, "safetensors": safetensors.__version__,
            "scikit-learn": sklearn.__version__, "platform": platform.platform()}


def _plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with DDP's ``module.`` prefix removed and contiguous, unshared CPU tensors."""
    module = getattr(module, "module", module)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict: names, dtypes, shapes and bytes, in name order.

    Independent of the file layout and of the header metadata, so it can be stored in both.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(path, f"not a readable safetensors file ({exc}); pickled checkpoints are refused") from None


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(path) as tmp:
        save_file(_plain_state_dict(model), str(tmp), metadata=metadata or {})
    return Path(path)


def load_weights(path: str | Path, model: torch.nn.Module | None = None,
                 expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (refusing pickles); load it into ``model`` (strict) if given.

    ``expected_sha256``: the :func:`tensors_sha256` the tensors must have (refused otherwise).
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(path, f"not a readable safetensors file ({exc}); pickled checkpoints are refused") from None
    if expected_sha256 is not None and tensors_sha256(tensors) != expected_sha256:
        raise InputError(path, f"its tensors do not hash to {expected_sha256[:16]}... named by the model card: "
                               "the weights were changed or damaged after the checkpoint was written")
    if model is not None:
        target = getattr(model, "module", model)
        try:
            target.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise InputError(path, f"weights do not match the architecture: {str(exc).splitlines()[0]}") from None
    return tensors


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(path, "pickle-based checkpoints are refused (they can run arbitrary code); "
                               "use a RheumAI checkpoint folder (model.safetensors + model_card.json)")


def save_checkpoint(dir_or_path: str | Path, model: torch.nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` then ``model_card.json`` into a folder; returns the folder.

    Each file is written atomically; the card is written last, so a folder with a card always has
    matching weights. Missing ``software`` / ``model_id`` entries are filled in.
    """
    folder = Path(dir_or_path)
    if folder.suffix.lower() in (".safetensors", ".json"):
        folder = folder.parent
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    card = dict(card)
    card.setdefault("software", software_versions())
    card.setdefault("model_id", uuid.uuid4().hex[:12])
    card["weights_file"] = WEIGHTS
    card["format"] = "rheumai-checkpoint/1"
    folder.mkdir(parents=True, exist_ok=True)
    state = _plain_state_dict(model)
    card["weights_sha256"] = tensors_sha256(state)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"model_id": str(card["model_id"]), "weights_sha256": card["weights_sha256"]})
    write_json(folder / CARD, card)
    return folder


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint folder (or of its card / weights file)."""
    folder = _checkpoint_folder(Path(path))
    card_path = folder / CARD
    if not card_path.is_file():
        raise InputError(folder, f"no {CARD} here: not a RheumAI checkpoint folder")
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
    (no decision threshold, e.g. a regression head). Anything else is refused with the value."""
    if value is None:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_threshold(card_path, v, f"{where}.{k}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(card_path, f"model card {where} must be a number (a probability in [0, 1]), not {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(card_path, f"model card {where} {value!r} is not a probability in [0, 1]")


def check_binding(folder: str | Path, card: dict[str, Any]) -> str | None:
    """Refuse a card beside weights it does not belong to; returns the weights hash (None for
    checkpoints written before cards named their weights: neither side holds a hash)."""
    folder = Path(folder)
    weights = folder / str(card.get("weights_file", WEIGHTS))
    if not weights.is_file():
        raise InputError(weights, f"weights file not found (named by {folder / CARD})")
    meta = weights_metadata(weights)
    in_card, in_file = card.get("weights_sha256"), meta.get("weights_sha256")
    if in_card is None and in_file is None:
        return None
    if in_card != in_file:
        raise InputError(folder / CARD, f"belongs to weights {str(in_card)[:16]}... but {weights} holds weights "
                                        f"{str(in_file)[:16]}... (model {meta.get('model_id', '?')}, card model "
                                        f"{card.get('model_id', '?')}): the card and the weights come from different "
                                        "runs; use the card written with these weights")
    return str(in_card)


def _checkpoint_folder(path: Path) -> Path:
    _refuse_pickle(path)
    if path.is_file():
        return path.parent
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    return path


def _task_builder(card: dict[str, Any], folder: Path) -> Any:
    """The network builder of the card's registered task (``rheumai.tasks.cervical_ra.model.build_model`` without one)."""
    if not card.get("task"):
        return build_model
    from .tasks import get_task

    try:
        return get_task(str(card["task"])).build_model
    except KeyError as exc:
        raise InputError(folder / CARD, str(exc.args[0])) from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the card's architecture and load its weights (strict); model in eval mode."""
    folder = _checkpoint_folder(Path(path))
    card = read_card(folder)
    sha = check_binding(folder, card)
    try:
        model = _task_builder(card, folder)(card["architecture"])
    except ValueError as exc:
        raise InputError(folder / CARD, str(exc)) from None
    load_weights(folder / card.get("weights_file", WEIGHTS), model, expected_sha256=sha)
    return model.to(device).eval(), card


# ---------------------------------------------------------------- resume state (training runs)

def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_training_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict[str, Any], best_model: torch.nn.Module | dict[str, torch.Tensor] | None = None,
                        scaler: Any = None, keep_best: bool = False) -> Path:
    """Save everything needed to resume at an epoch boundary, without pickle.

    ``best_model``: weights to store as ``best_model.safetensors``; with ``keep_best`` and no
    ``best_model`` the previous state's best weights are carried over (hard link, no copy).

    Written into ``<folder>.new`` and swapped in by renames, so a kill at any moment leaves either
    the previous complete state or the new one (``load_training_state`` looks at both).
    """
    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file(_plain_state_dict(model), str(new / "model.safetensors"))
    if best_model is not None:
        best = best_model if isinstance(best_model, dict) else _plain_state_dict(best_model)
        save_file({k: v.contiguous() for k, v in best.items()}, str(new / "best_model.safetensors"))
    elif keep_best and (folder / "best_model.safetensors").is_file():
        try:  # unchanged: link instead of rewriting
            os.link(folder / "best_model.safetensors", new / "best_model.safetensors")
        except OSError:
            shutil.copy2(folder / "best_model.safetensors", new / "best_model.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(new / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(new / "rng.safetensors"))
    full = dict(meta)
    full["optimizer"] = opt_meta
    full["scaler"] = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    write_json(new / "state.json", full)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def find_training_state(folder: str | Path) -> Path | None:
    """The complete state folder to resume from (the main one, or ``.old`` after a kill mid-swap)."""
    folder = Path(folder)
    for cand in (folder, folder.with_name(folder.name + ".old")):
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
    opt_tensors = load_weights(found / "optimizer.safetensors")
    device = next(getattr(model, "module", model).parameters()).device
    opt_state = _unflatten_optimizer({k: v.to(device) if not k.endswith(".step") else v for k, v in opt_tensors.items()},
                                     meta.pop("optimizer"))
    optimizer.load_state_dict(opt_state)
    rng = load_weights(found / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if states:
            torch.cuda.set_rng_state_all(states)
    scaler_state = meta.pop("scaler", None)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    best = load_weights(found / "best_model.safetensors") if (found / "best_model.safetensors").is_file() else None
    return meta, best
