"""The token mixers of ablate/models/mixing.py: what each computes, and how the spec keys them."""
from __future__ import annotations

import pytest
import torch

from ablate.config import CellConfig, ModelConfig, cell_key
from ablate.models.mixing import DepthwiseConv, TokenMixingMlp
from ablate.models.s2mlp import build_model
from ablate.models.shift import SpatialShift

SMALL = dict(image_size=16, patch_size=4, width=8, depth=2, mlp_ratio=2)


def test_token_mixing_shift_builds_todays_network():
    """token_mixing: shift (the default, or written out) is the model as it was: same modules, same
    weights from the same seed, same output."""
    torch.manual_seed(3)
    before = build_model(ModelConfig(**SMALL, shift="eight"), 10)
    torch.manual_seed(3)
    after = build_model(ModelConfig(**SMALL, shift="eight", token_mixing="shift"), 10)
    assert [n for n, _ in before.named_parameters()] == [n for n, _ in after.named_parameters()]
    for (_, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b)
    assert isinstance(after.blocks[0].spatial_mlp.mix, SpatialShift)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(before(x), after(x))


def test_none_is_shift_none_one_network_and_one_cell():
    torch.manual_seed(0)
    ff = build_model(ModelConfig(**SMALL, token_mixing="none"), 10)
    torch.manual_seed(0)
    no_shift = build_model(ModelConfig(**SMALL, shift="none"), 10)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ff(x), no_shift(x))
    keys = {cell_key(CellConfig(model=ModelConfig(**SMALL, **m)))
            for m in ({"token_mixing": "none"}, {"shift": "none"}, {"shift": "none", "token_mixing": "none"})}
    assert len(keys) == 1
    assert cell_key(CellConfig(model=ModelConfig(**SMALL))) not in keys


def test_token_mixing_mlp_mixes_every_patch_with_position_specific_weights():
    torch.manual_seed(0)
    mix = TokenMixingMlp(grid=4, hidden=6)
    x = torch.randn(1, 4, 4, 3)
    y = mix(x)
    x2 = x.clone()
    x2[0, 3, 3] += 1.0  # one patch changes: every patch's output changes (a global receptive field)
    assert (mix(x2) - y).abs().amax(dim=-1).gt(0).all()
    # not translation-equivariant: the weights belong to positions
    assert not torch.allclose(mix(x.roll(1, dims=2)), y.roll(1, dims=2), atol=1e-6)
    with pytest.raises(Exception, match="patch grid"):
        mix(torch.randn(1, 5, 5, 3))


def test_dwconv_is_local_and_shared_over_positions():
    torch.manual_seed(0)
    mix = DepthwiseConv(dim=3, kernel_size=3)
    x = torch.zeros(1, 7, 7, 3)
    x[0, 3, 3] = 1.0
    y = mix(x) - mix(torch.zeros_like(x))  # the response to one patch: its 3 x 3 neighbourhood only
    touched = y.abs().amax(dim=-1)[0].gt(0)
    assert touched[2:5, 2:5].all() and touched.sum() == 9
    # the same weights everywhere: moving the input moves the output (away from the borders)
    x1 = torch.zeros(1, 7, 7, 3)
    x1[0, 3, 4] = 1.0
    y1 = mix(x1) - mix(torch.zeros_like(x1))
    assert torch.allclose(y1[0, :, 1:], y[0, :, :-1], atol=1e-6)
    # channels do not mix (depthwise)
    x2 = torch.zeros(1, 7, 7, 3)
    x2[0, 3, 3, 0] = 1.0
    y2 = mix(x2) - mix(torch.zeros_like(x2))
    assert y2[..., 1:].abs().max() == 0


@pytest.mark.parametrize("token_mixing", ["mlp", "dwconv", "none"])
def test_every_mixer_trains_a_step(token_mixing):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, token_mixing=token_mixing), 10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.blocks[0].spatial_mlp.mix.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (len(grads) > 0) == (token_mixing != "none")


@pytest.mark.parametrize("settings, message", [
    (dict(token_mixing="mlp", shift="eight"), "shift 'eight' applies to token_mixing: shift only"),
    (dict(token_mixing="dwconv", border="zero"), "border zero applies to token_mixing: shift only"),
    (dict(token_mixing="shift", token_hidden=4), "token_hidden 4 applies to token_mixing: mlp only"),
    (dict(token_mixing="mlp", kernel_size=5), "kernel_size 5 applies to token_mixing: dwconv only"),
    (dict(token_mixing="none", shift="four", kernel_size=5), "kernel_size 5 applies"),
    (dict(token_mixing="dwconv", kernel_size=4), "kernel_size 4 is even"),
])
def test_settings_of_another_operator_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**SMALL, **settings)


def test_operator_settings_at_their_defaults_are_accepted():
    ModelConfig(**SMALL, token_mixing="mlp", shift="four", kernel_size=3)
    ModelConfig(**SMALL, token_mixing="none", shift="none")
    assert ModelConfig(**SMALL, token_mixing="mlp").token_mlp_hidden == 4  # half the width, as MLP-Mixer


def _spec(tmp_path, body: str):
    path = tmp_path / "m.yaml"
    path.write_text("name: m\ndata: {name: digits}\n"
                    "model: {image_size: 16, patch_size: 4, width: 16, depth: 1, mlp_ratio: 2}\n" + body)
    return path


def test_a_grid_of_mixers_keeps_the_keys_of_the_shift_cells(tmp_path):
    from ablate.spec import load_spec
    mixers = load_spec(_spec(tmp_path, "grid:\n  model:\n    - {token_mixing: shift, shift: four}\n"
                                        "    - {token_mixing: mlp}\n    - {token_mixing: none}\n"))
    (tmp_path / "s.yaml").write_text("name: s\ndata: {name: digits}\n"
                                     "model: {image_size: 16, patch_size: 4, width: 16, depth: 1, mlp_ratio: 2}\n"
                                     "grid:\n  model.shift: [four, none]\n")
    shifts = load_spec(tmp_path / "s.yaml")
    by_mixer = {c.values["model.token_mixing"]: c for c in mixers.cells()}
    by_shift = {c.values["model.shift"]: c.key for c in shifts.cells()}
    assert by_mixer["shift"].key == by_shift["four"] and by_mixer["none"].key == by_shift["none"]
    # a setting of another mixer is shown as not applying, not as the base's value
    assert by_mixer["mlp"].values["model.shift"] is None


def test_none_and_shift_none_in_one_grid_are_one_cell_refused_as_a_pair(tmp_path):
    from ablate.errors import SpecError
    from ablate.spec import load_spec
    with pytest.raises(SpecError, match="the same configuration .*token_mixing: none is shift: none"):
        load_spec(_spec(tmp_path, "grid:\n  model:\n    - {token_mixing: none}\n    - {shift: none}\n"))


def test_an_operator_setting_the_grid_would_give_another_mixer_is_refused_at_its_line(tmp_path):
    from ablate.errors import SpecError
    from ablate.spec import load_spec
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, "grid:\n  model.token_mixing: [mlp, dwconv]\n  model.token_hidden: [8]\n"))
    assert "m.yaml:6:" in str(e.value) and "token_hidden 8 applies to token_mixing: mlp only" in str(e.value)
