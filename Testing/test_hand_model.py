"""Hand SvdH networks: shapes, MobileNetV2 strides, fine-tuning schemes, backbone loading, masked heads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rheumai.errors import InputError
from rheumai.tasks.hand_svdh.heads import MaskedOrdinalHead, joint_heads
from rheumai.tasks.hand_svdh.model import (MobileNetV2, WholeHandNet, apply_finetune_scheme, build_model,
                                           default_architecture)
from rheumai.tasks.hand_svdh.train import load_backbone


@pytest.mark.parametrize("backbone", ["resnet", "mobilenetv2"])
def test_task_network_outputs(backbone, one_torch_thread):
    net = build_model(default_architecture(backbone)).eval()
    with torch.no_grad():
        o = net(torch.rand(2, 1, 160, 128), torch.rand(2, 1, 320, 256), torch.full((2, 2), 0.8))
    assert o["total"].shape == (2, 1) and o["class"].shape == (2, 4)
    assert o["heatmaps"].shape == (2, 22, 40, 32) and o["points"].shape == (2, 22, 2)
    assert o["erosion"].shape == (2, 22, 5) and o["jsn"].shape == (2, 22, 4)
    # given points are used for the crops (re-scoring) and returned unchanged
    pts = torch.rand(2, 22, 2) * 200
    with torch.no_grad():
        o2 = net(torch.rand(2, 1, 160, 128), torch.rand(2, 1, 320, 256), torch.full((2, 2), 0.8), points=pts)
    assert torch.equal(o2["points"], pts)


def test_mobilenetv2_strides_and_width(one_torch_thread):
    m = MobileNetV2(1, width=0.5, last_channels=64).eval()
    x = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        h = m.stem(x)
        sizes = []
        for st in (m.stage1, m.stage2, m.stage3, m.stage4, m.stage5):
            h = st(h)
            sizes.append(tuple(h.shape[-2:]))
    assert sizes == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert m(x).shape == (1, 64, 2, 3)


@pytest.mark.parametrize("backbone", ["resnet", "mobilenetv2"])
def test_finetune_schemes(backbone):
    net = WholeHandNet(default_architecture(backbone)["whole"])
    n_all = sum(p.numel() for p in net.parameters())
    assert apply_finetune_scheme(net, "whole") == n_all
    n_last = apply_finetune_scheme(net, "last_blocks")
    n_head = apply_finetune_scheme(net, "head_only")
    assert n_head == sum(p.numel() for m in net.heads() for p in m.parameters())
    assert n_head < n_last < n_all
    assert not any(p.requires_grad for p in net.backbone.block_groups()[0].parameters())
    with pytest.raises(ValueError):
        apply_finetune_scheme(net, "everything")


def test_load_backbone_from_safetensors(tmp_path):
    arch = default_architecture("resnet")["whole"]
    src, dst = WholeHandNet(arch), WholeHandNet(arch)
    save_file({f"backbone.{k}": v.contiguous() for k, v in src.backbone.state_dict().items()},
              str(tmp_path / "bb.safetensors"))
    assert load_backbone(dst, tmp_path / "bb.safetensors") == []
    for (k, a), b in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(InputError, match="pickles"):
        load_backbone(dst, tmp_path / "bb.pt")
    other = WholeHandNet(default_architecture("mobilenetv2")["whole"])
    with pytest.raises(InputError, match="no tensor matches"):
        load_backbone(other, tmp_path / "bb.safetensors")


def test_masked_ordinal_head_ignores_unscored_targets():
    head = joint_heads()["jsn"]
    assert isinstance(head, MaskedOrdinalHead) and head.n_classes == 5
    out = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 4, -1, 2, -1, 1])
    keep = t >= 0
    ref = MaskedOrdinalHead(name="x", n_classes=5).loss(out[keep], t[keep])
    assert torch.allclose(head.loss(out, t), ref)
    head.loss(out, t).backward()
    assert torch.all(out.grad[~keep] == 0) and torch.any(out.grad[keep] != 0)
    rep = head.report({"class": torch.tensor([0, 4, 3, 2, 0, 1]).numpy()}, t.numpy(), n_boot=10)
    assert rep["n"] == 4 and rep["accuracy"]["value"] == 1.0
