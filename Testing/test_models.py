"""Model construction and pickle-free checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from rheumai.checkpoint import (load_checkpoint, load_training_state, read_card, save_checkpoint,
                                save_training_state)
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.model import build_model, default_architecture


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _card(arch: dict) -> dict:
    return {"task": "cervical_ra", "architecture": arch, "preprocessing": {"n_slices": 6, "spacing_mm": 1.0},
            "threshold": 0.31, "threshold_rule": "youden", "training_data": {"n_train": 3}, "metrics": {}}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_build_model_six_channels_one_logit(depth: int) -> None:
    model = build_model(default_architecture(depth, 6, (32, 32)))
    assert model.conv1.in_channels == 6 and model.conv1.stride == (2, 2)
    assert isinstance(model.conv1, torch.nn.Conv2d)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 6, 32, 32)).shape == (2, 1)


def test_build_model_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="depth"):
        build_model(default_architecture(depth=19))
    with pytest.raises(ValueError, match="family"):
        build_model({"family": "vit"})


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    arch = default_architecture(18, 6, (32, 32))
    torch.manual_seed(1)
    model = build_model(arch)
    model.train()
    model(torch.randn(4, 6, 32, 32))  # move BatchNorm running statistics off their defaults
    folder = save_checkpoint(tmp_path / "ckpt", model, _card(arch))
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model_card.json"]
    loaded, card = load_checkpoint(folder)
    ref = model.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert card["threshold"] == 0.31 and card["architecture"] == arch
    assert card["software"]["torch"] == torch.__version__ and len(card["model_id"]) == 12
    model.eval()
    x = torch.randn(3, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # also addressable by the card or the weights file
    assert read_card(folder / "model_card.json")["model_id"] == card["model_id"]
    load_checkpoint(folder / "model.safetensors")


class _Boom:
    def __reduce__(self):  # executing this pickle would create a file
        return (open, ("/tmp/rheumai_pickle_was_executed", "w"))


def test_pickles_are_refused(tmp_path) -> None:
    arch = default_architecture(18, 6, (32, 32))
    model = build_model(arch)
    pt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "x": _Boom()}, pt)
    with pytest.raises(InputError, match="pickle"):
        load_checkpoint(pt)
    # a pickle disguised as model.safetensors is not parsed as a pickle either
    folder = save_checkpoint(tmp_path / "ckpt", model, _card(arch))
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(InputError, match="safetensors"):
        load_checkpoint(folder)
    import os

    assert not os.path.exists("/tmp/rheumai_pickle_was_executed")


def test_card_errors_name_the_file(tmp_path) -> None:
    arch = default_architecture(18, 6, (32, 32))
    folder = save_checkpoint(tmp_path / "c", build_model(arch), _card(arch))
    card = json.loads((folder / "model_card.json").read_text())
    del card["threshold"]
    (folder / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="model_card.json.*threshold"):
        load_checkpoint(folder)
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    other = default_architecture(34, 6, (32, 32))
    folder2 = save_checkpoint(tmp_path / "d", build_model(arch), _card(arch))
    card2 = json.loads((folder2 / "model_card.json").read_text())
    card2["architecture"] = other
    (folder2 / "model_card.json").write_text(json.dumps(card2))
    with pytest.raises(InputError, match="do not match"):
        load_checkpoint(folder2)


def test_training_state_round_trip(tmp_path) -> None:
    arch = default_architecture(18, 6, (32, 32))
    torch.manual_seed(0)
    model = build_model(arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6, 32, 32)).sum().backward()
        opt.step()
    rng_before = torch.get_rng_state()
    save_training_state(tmp_path / "state", model, opt, {"epochs_completed": 2, "history": [1, 2]},
                        best_model=model)
    assert not list(tmp_path.glob("*.pt")) and not list((tmp_path / "state").glob("*.pt"))
    torch.rand(10)
    model2 = build_model(arch)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    meta, best = load_training_state(tmp_path / "state", model2, opt2)
    assert meta["epochs_completed"] == 2 and best is not None
    assert torch.equal(torch.get_rng_state(), rng_before)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
    # the next step is identical
    x = torch.randn(4, 6, 32, 32)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_slice_attention_is_slice_order_invariant_and_exposes_its_weights() -> None:
    """Gated attention pooling: permuting the slices permutes the weights and leaves the logit."""
    torch.manual_seed(0)
    arch = default_architecture(10, 6, (32, 32), family="slice_attention")
    model = build_model(arch).eval()
    assert isinstance(model.encoder.conv1, torch.nn.Conv2d) and model.encoder.conv1.in_channels == 1
    x = torch.rand(2, 6, 32, 32)
    x[1, 4, 8:20, 8:20] += 2.0  # one slice differs strongly: the weights must not be uniform
    with torch.no_grad():
        y = model(x)
        a = model.last_attention
        perm = torch.tensor([5, 3, 1, 0, 2, 4])
        y_perm = model(x[:, perm])
        a_perm = model.last_attention
    assert y.shape == (2, 1)
    assert torch.allclose(a.sum(1), torch.ones(2), atol=1e-6) and float(a[1].std()) > 0
    assert torch.allclose(y, y_perm, atol=1e-5)
    assert torch.allclose(a[:, perm], a_perm, atol=1e-6)
    with pytest.raises(ValueError, match="slices"):
        model(torch.rand(1, 5, 32, 32))


def test_slice_attention_checkpoint_round_trip(tmp_path) -> None:
    arch = default_architecture(10, 6, (32, 32), family="slice_attention")
    torch.manual_seed(2)
    model = build_model(arch)
    model.train()
    model(torch.rand(4, 6, 32, 32))  # BatchNorm statistics off their defaults
    model.eval()
    folder = save_checkpoint(tmp_path / "ckpt", model, _card(arch))
    loaded, card = load_checkpoint(folder)
    assert card["architecture"]["family"] == "slice_attention"
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_family_is_validated_everywhere() -> None:
    from rheumai.config import TrainConfig

    with pytest.raises(ValueError, match="family"):
        default_architecture(18, family="vit")
    cfg = TrainConfig.from_dict({"model": {"family": "slice_attention", "depth": 10}})
    assert cfg.model.family == "slice_attention"
    with pytest.raises(InputError, match="family"):
        TrainConfig.from_dict({"model": {"family": "vit"}})


@pytest.mark.parametrize("name", ["small_cpu", "slice_attention_cpu", "paper"])
def test_shipped_configs_build_their_network(name: str) -> None:
    from pathlib import Path

    from rheumai.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    m = cfg.model
    model = build_model(default_architecture(m.depth, m.in_channels, tuple(m.input_size or (512, 512)),
                                             m.conv1_t_stride, family=m.family)).eval()
    expected = {"small_cpu": "resnet", "slice_attention_cpu": "slice_attention", "paper": "resnet"}[name]
    assert m.family == expected
    with torch.no_grad():
        assert model(torch.rand(1, m.in_channels, 32, 32)).shape == (1, 1)
