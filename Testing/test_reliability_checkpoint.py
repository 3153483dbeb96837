"""A model card is bound to its weights; a card that cannot be used is refused with a message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rheumai.checkpoint import (CARD, WEIGHTS, load_checkpoint, read_card, save_checkpoint, tensors_sha256,
                                weights_metadata)
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.model import build_model, default_architecture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _card(arch: dict, threshold: object = 0.31) -> dict:
    return {"task": "cervical_ra", "architecture": arch, "preprocessing": {"n_slices": 6, "spacing_mm": 1.0},
            "threshold": threshold, "threshold_rule": "youden", "training_data": {"n_train": 3}, "metrics": {}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints of two runs: other weights, stride and threshold."""
    base = tmp_path_factory.mktemp("runs")
    arch = default_architecture(18, 6, (32, 32))
    torch.manual_seed(0)
    a = save_checkpoint(base / "a", build_model(arch), _card(arch, 0.2))
    b = save_checkpoint(base / "b", build_model({**arch, "conv1_t_stride": 1}), _card(arch | {"conv1_t_stride": 1}, 0.7))
    return a, b


@pytest.fixture
def two_runs(runs, tmp_path):
    """Fresh copies of the two checkpoints (tests damage them)."""
    return tuple(shutil.copytree(r, tmp_path / r.name) for r in runs)


def test_hash_is_stored_in_card_and_weights(two_runs):
    a, _ = two_runs
    card = read_card(a)
    model, _ = load_checkpoint(a)
    assert card["weights_sha256"] == weights_metadata(a / WEIGHTS)["weights_sha256"]
    assert card["weights_sha256"] == tensors_sha256(model.state_dict())


def test_card_from_another_run_is_refused_naming_both_files(two_runs):
    a, b = two_runs
    shutil.copy(b / CARD, a / CARD)  # another run's card (same architecture family, other stride/threshold)
    with pytest.raises(InputError) as err:
        load_checkpoint(a)
    msg = str(err.value)
    assert msg.startswith(str(a / CARD)) and str(a / WEIGHTS) in msg and "different runs" in msg


def test_card_without_hash_beside_bound_weights_is_refused(two_runs):
    a, _ = two_runs
    card = json.loads((a / CARD).read_text())
    del card["weights_sha256"]
    (a / CARD).write_text(json.dumps(card))
    with pytest.raises(InputError, match="different runs"):
        load_checkpoint(a)


def test_changed_tensors_are_refused(two_runs):
    from safetensors.torch import load_file, save_file

    a, _ = two_runs
    meta = weights_metadata(a / WEIGHTS)
    tensors = load_file(str(a / WEIGHTS))
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(a / WEIGHTS), metadata=meta)  # header still names the old hash
    with pytest.raises(InputError, match="do not hash to"):
        load_checkpoint(a)


@pytest.mark.parametrize("bad", ["high", "0.5", True, [0.5], float("nan"), 1.5, {"out": "x"}])
def test_non_numeric_threshold_is_a_clear_error(two_runs, bad):
    a, _ = two_runs
    card = json.loads((a / CARD).read_text())
    card["threshold"] = bad
    (a / CARD).write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"model_card.json: model card threshold"):
        read_card(a)
    with pytest.raises(InputError, match="threshold"):
        load_checkpoint(a)


def test_card_that_is_not_an_object(two_runs):
    a, _ = two_runs
    (a / CARD).write_text("[1, 2]")
    with pytest.raises(InputError, match="must be a JSON object"):
        read_card(a)


@pytest.mark.parametrize("exchange", [True, False])
def test_training_state_is_swapped_whole_and_found_after_a_kill_mid_swap(tmp_path, monkeypatch, exchange):
    """Each save replaces the state folder as a whole (atomic exchange, or two renames where the file
    system has none); a kill between the two renames leaves the previous state beside, which resumes."""
    import rheumai.atomic
    from rheumai.checkpoint import find_training_state, load_training_state, save_training_state

    if not exchange:
        monkeypatch.setattr(rheumai.atomic, "exchange_paths", lambda a, b: False)
    torch.manual_seed(0)
    model = build_model(default_architecture(10, 6, (32, 32)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = tmp_path / "state"
    save_training_state(state, model, opt, {"epochs_completed": 1}, best_model=model)
    first_best = (state / "best_model.safetensors").stat().st_ino
    save_training_state(state, model, opt, {"epochs_completed": 2}, keep_best=True)
    assert json.loads((state / "state.json").read_text())["epochs_completed"] == 2
    assert (state / "best_model.safetensors").stat().st_ino == first_best  # carried over, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no staging folder, lock or old copy left
    old = state.rename(tmp_path / ".state.old-123-abcdef01")  # killed between the two renames
    assert find_training_state(state) == old
    meta, best = load_training_state(state, build_model(default_architecture(10, 6, (32, 32))),
                                     torch.optim.Adam(model.parameters(), lr=1e-3))
    assert meta["epochs_completed"] == 2 and best is not None
    save_training_state(state, model, opt, {"epochs_completed": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"] and find_training_state(state) == state
