"""S2MLP: shapes, the block formula for both norm positions, norms, drop path, timm registration."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from ablate.config import ModelConfig
from ablate.models import model_cost
from ablate.models.s2mlp import S2MLP, Affine, build_model  # registers the timm variants
from ablate.models.shift import spatial_shift

TINY = dict(image_size=16, patch_size=4, width=16, depth=2, mlp_ratio=2.0, num_classes=5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
def test_forward_shapes(norm, norm_position):
    torch.manual_seed(0)
    model = S2MLP(**TINY, norm=norm, norm_position=norm_position).eval()
    x = torch.randn(3, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (3, 4, 4, 16)                    # (B, H/p, W/p, c)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 16)
    logits = model(x)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    assert isinstance(model.blocks[0].norm1, Affine if norm == "affine" else torch.nn.LayerNorm)
    assert isinstance(model.norm, torch.nn.Identity) == (norm_position == "post")


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_block_is_the_paper_formula(norm_position):
    """post: x + LN(FC2(Shift(GELU(FC1 x)))), then x + LN(FC4(GELU(FC3 x))); pre: the norm first."""
    torch.manual_seed(0)
    model = S2MLP(**TINY, norm_position=norm_position).eval()
    block = model.blocks[0]
    for p in block.parameters():  # move away from the init (norm weight 1, bias 0) so norms matter
        torch.nn.init.normal_(p)
    s, c = block.spatial_mlp, block.channel_mlp

    def spatial(t):
        return s.fc2(spatial_shift(F.gelu(s.fc1(t)), "four", "keep"))

    def channel(t):
        return c.fc2(F.gelu(c.fc1(t)))

    def ln1(t):
        return _ln(t) * block.norm1.weight + block.norm1.bias

    def ln2(t):
        return _ln(t) * block.norm2.weight + block.norm2.bias

    x = torch.randn(2, 4, 4, 16)
    if norm_position == "post":
        y = x + ln1(spatial(x))
        expected = y + ln2(channel(y))
    else:
        y = x + spatial(ln1(x))
        expected = y + channel(ln2(y))
    torch.testing.assert_close(block(x), expected)


def test_patch_embedding_is_a_patch_fc_then_norm():
    torch.manual_seed(0)
    model = S2MLP(**TINY).eval()
    x = torch.randn(1, 3, 16, 16)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)            # (1, 3, 4, 4, 4, 4): C, H', W', p, p
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(1, 4, 4, 48)
    proj = model.patch_embed.proj
    expected = model.patch_embed.norm(flat @ proj.weight.reshape(16, 48).T + proj.bias)
    torch.testing.assert_close(model.patch_embed(x), expected)


def test_affine_is_per_channel_scale_and_shift():
    aff = Affine(3)
    with torch.no_grad():
        aff.alpha.copy_(torch.tensor([1.0, 2.0, 3.0]))
        aff.beta.copy_(torch.tensor([0.5, 0.0, -1.0]))
    assert aff(torch.ones(2, 3)).tolist() == [[1.5, 2.0, 2.0]] * 2


def test_drop_path_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = S2MLP(**TINY, drop_path=0.5)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.5])              # linear from 0 to drop_path
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_build_model_from_config_and_init():
    cfg = ModelConfig(image_size=32, patch_size=8, width=24, depth=3, mlp_ratio=3, shift="eight",
                      norm="affine", norm_position="pre", border="zero", in_chans=1)
    model = build_model(cfg, num_classes=7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.blocks[0].spatial_mlp.mix.offsets[4:] == ((1, 1), (1, -1), (-1, 1), (-1, -1))
    assert model.blocks[0].spatial_mlp.mix.border == "zero"
    assert model.hidden == 72
    fc = model.blocks[1].channel_mlp.fc1
    assert torch.count_nonzero(fc.bias) == 0 and 0.01 < fc.weight.std() < 0.03  # trunc_normal(.02)
    assert sum(p.numel() for p in model.parameters()) == model_cost(cfg, 7).params


def test_classifier_api():
    model = S2MLP(**TINY)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(11)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 11)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 16)


def test_no_shift_and_bad_width():
    assert S2MLP(**TINY, shift="none")(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    with pytest.raises(ValueError, match="cannot be split into 3 equal shift groups"):
        S2MLP(**TINY, shift=[[0, 1], [1, 0], [0, -1]])(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        S2MLP(image_size=30, patch_size=4)


@pytest.mark.parametrize("name, width, depth, norm", [("s2mlp_wide_16_224", 768, 12, "layernorm"),
                                                      ("s2mlp_deep_16_224", 384, 36, "affine")])
def test_timm_registration(name, width, depth, norm):
    model = timm.create_model(name, num_classes=100)
    assert (model.embed_dim, len(model.blocks), model.num_classes) == (width, depth, 100)
    assert isinstance(model.blocks[0].norm1, Affine if norm == "affine" else torch.nn.LayerNorm)
    cfg = ModelConfig(width=width, depth=depth, norm=norm)
    assert sum(p.numel() for p in model.parameters()) == model_cost(cfg, 100).params
    with pytest.raises(RuntimeError, match="no pretrained weights exist"):
        timm.create_model(name, pretrained=True)


def test_timm_image_size_override():
    model = timm.create_model("s2mlp_wide_16_224", num_classes=3, img_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
