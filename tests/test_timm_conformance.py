"""The registered S²-MLP models against timm's model contract.

The checks of timm's own ``tests/test_models.py`` (default config, classifier reset, feature
extraction, intermediates, TorchScript, FX, compile), written for these models on narrow
instances (width 16) so that each runs in well under a second.
"""
import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import create_feature_extractor, get_graph_node_names
from timm.optim import create_optimizer_v2

from ablate.models.s2mlp import VARIANTS, PreNormS2Block, S2Block, S2MLP  # registers the timm variants

NAMES = list(VARIANTS)
SMALL = dict(width=16, depth=4, mlp_ratio=2.0, img_size=64)  # each variant's own norm and patch size

# torch 2.14 warns that TorchScript is deprecated; timm still supports it, so these tests keep it working.
script_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kwargs})


def image(batch: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def block_outputs(model: S2MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, (B, H, W, C), run by hand."""
    outs, h = [], model.patch_embed(x)
    for block in model.blocks:
        h = block(h)
        outs.append(h)
    return outs


def grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return list(torch.autograd.grad((out * weight).sum(), list(inputs)))


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_and_feature_sizes(name):
    torch.manual_seed(0)
    model = timm.create_model(name, width=16, depth=2).eval()  # at the default cfg's size
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["fixed_input_size"]
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.875, "bicubic")
    assert (cfg["mean"], cfg["std"]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size == 16

    # forward_features is (B, H, W, C): output_fmt says where timm finds the grid and the channels
    assert model.output_fmt == "NHWC"
    feats = model.forward_features(image(size=224))
    h_axis, w_axis = get_spatial_dim(model.output_fmt)
    assert (feats.shape[h_axis], feats.shape[w_axis]) == cfg["pool_size"] == (14, 14)
    assert feats.shape[get_channel_dim(model.output_fmt)] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)

    # timm's scripts size their data from the model, also when img_size was changed
    assert timm.data.resolve_input_data_config(model)["input_size"] == (3, 224, 224)
    small = create(name, img_size=(32, 32))
    assert timm.data.resolve_input_data_config(small)["input_size"] == (3, 32, 32)
    assert small(image(size=32)).shape == (1, 1000)
    assert create(name)(image()).shape == (1, 1000)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_with_each_pool(name):
    model = create(name).eval()
    x = image()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model(x), pooled)
        model.reset_classifier(0, "")  # no pooling: the features themselves
        assert model.global_pool == "" and torch.equal(model(x), feats)
        model.reset_classifier(7)  # None keeps the pool: a classifier on every patch, as in timm's Mixer
        assert model(x).shape == (1, 4, 4, 7)
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7) and model.get_classifier().out_features == 7
    with pytest.raises(ValueError, match="unsupported global_pool 'max'"):
        model.reset_classifier(7, "max")
    model.double().reset_classifier(3)  # the new head follows the model's dtype
    assert model.head.weight.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_create_model_keywords(name):
    x = image()
    with torch.no_grad():
        unpooled = create(name, num_classes=0, global_pool="").eval()
        assert torch.equal(unpooled(x), unpooled.forward_features(x))
        assert create(name, num_classes=0).eval()(x).shape == (1, 16)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in create(name, drop_path_rate=0.3).blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    dropped = create(name, drop_rate=0.5, num_classes=0)
    assert dropped.head_drop.p == 0.5 and not torch.equal(dropped(x), dropped(x))  # dropout in training
    with pytest.raises(ValueError, match="give drop_path_rate or drop_path, not both"):
        create(name, drop_path=0.1, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="unsupported global_pool"):
        create(name, global_pool="max")
    with pytest.raises(ValueError, match=r"img_size \(32, 48\) is not square"):
        create(name, img_size=(32, 48))


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=42, drop_path_rate=0.1).train()
    out = model(image(batch=2))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("feature_cls, layout", [("getter", "NCHW"), ("list", "NHWC"), ("hook", "NHWC"),
                                                  ("fx", "NHWC")])
@pytest.mark.parametrize("name", NAMES)
def test_features_only(name, feature_cls, layout):
    """Default (getter): the last three blocks through forward_intermediates, in timm's NCHW; the
    extractors that tap the blocks return them as computed (NHWC) and say so in output_fmt."""
    features = create(name, features_only=True, feature_cls=feature_cls).eval()
    reference = create(name).eval()  # same seed, same weights
    assert features.output_fmt == layout
    assert features.feature_info.channels() == [16] * 3 and features.feature_info.reduction() == [16] * 3
    x = image()
    with torch.no_grad():
        outs = features(x)
        expected = block_outputs(reference, x)[1:]
    if layout == "NCHW":
        expected = [e.permute(0, 3, 1, 2) for e in expected]
    assert len(outs) == 3
    for out, exp in zip(outs, expected):
        assert out.shape[get_channel_dim(layout)] == 16
        torch.testing.assert_close(out, exp, rtol=0, atol=0)


def test_features_only_indices_and_pruning():
    features = create(NAMES[0], features_only=True, out_indices=(0, 1))
    assert type(features).__name__ == "FeatureGetterNet"  # timm.models does not export the class
    assert len(features.model.blocks) == 2  # blocks past the last index asked for are dropped
    assert [o.shape for o in features(image())] == [(1, 16, 4, 4)] * 2


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_forward_intermediates(norm_position):
    torch.manual_seed(0)
    model = S2MLP(image_size=32, patch_size=8, width=16, depth=4, mlp_ratio=2.0, num_classes=5,
                  norm_position=norm_position).eval()
    x = image(batch=2, size=32)
    with torch.no_grad():
        by_hand = block_outputs(model, x)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape for t in inter] == [(2, 16, 4, 4)] * 4  # NCHW by default
        for got, exp in zip(inter, by_hand):
            assert torch.equal(got, exp.permute(0, 3, 1, 2))

        nhwc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        assert len(nhwc) == 2 and torch.equal(nhwc[0], by_hand[0]) and torch.equal(nhwc[1], by_hand[3])
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(last_two[0], by_hand[2])

        normed = model.forward_intermediates(x, indices=[1], norm=True, output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(normed[0], model.norm(by_hand[1]))  # the identity for the paper's post-norm
        early, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early, model.norm(by_hand[1]))
    with pytest.raises(ValueError, match="unsupported output_fmt 'NLC'"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_grad_checkpointing_gives_the_same_values_and_gradients():
    model = create(NAMES[0], num_classes=5)
    x = image(batch=2)
    out = model(x)
    expected = grads(out, model.parameters())
    model.set_grad_checkpointing()
    checkpointed = model(x)
    torch.testing.assert_close(checkpointed, out, rtol=0, atol=0)
    torch.testing.assert_close(grads(checkpointed, model.parameters()), expected, rtol=0, atol=0)
    final, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)


def test_prune_intermediate_layers():
    torch.manual_seed(0)
    model = S2MLP(image_size=32, patch_size=8, width=16, depth=4, mlp_ratio=2.0, num_classes=5,
                  norm_position="pre").eval()
    x = image(size=32)
    with torch.no_grad():
        expected = block_outputs(model, x)[:2]
        assert model.prune_intermediate_layers([0, -3], prune_norm=True) == [0, 1]
        assert len(model.blocks) == 2 and isinstance(model.norm, torch.nn.Identity)
        assert model.num_classes == 0 and model.global_pool == ""
        assert torch.equal(model(x), expected[1])  # no norm, no pool, no head
        assert torch.equal(model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)[0],
                           expected[0])


def test_layer_decay_groups_follow_depth():
    model = create(NAMES[0])
    groups = create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.5).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    by_name = {n: scale[id(p)] for n, p in model.named_parameters()}
    blocks = [by_name[f"blocks.{i}.spatial_mlp.fc1.weight"] for i in range(4)]
    assert by_name["patch_embed.proj.weight"] < blocks[0] < blocks[1] < blocks[2] < blocks[3]
    assert by_name["head.weight"] == 1.0


SCRIPT_CONFIGS = {
    "paper": dict(),
    "pre_affine_eight_zero": dict(norm="affine", norm_position="pre", shift="eight", border="zero"),
    "no_shift": dict(shift="none"),
    "large_steps": dict(shift=[[0, 3], [-2, 1], [0, 0], [9, 0]]),
}


@script_warning
@pytest.mark.parametrize("config", list(SCRIPT_CONFIGS))
def test_torchscript_equals_eager_with_gradients(config):
    """Scripted, the shift runs its forward copy under autograd instead of the custom adjoint: the
    values and every gradient must still be exactly those of eager mode."""
    torch.manual_seed(0)
    model = S2MLP(image_size=16, patch_size=4, width=16, depth=2, mlp_ratio=2.0, num_classes=5,
                  **SCRIPT_CONFIGS[config])
    scripted = torch.jit.script(model)
    for _ in range(3):  # the profiling executor optimises the graph after its first runs
        x = torch.randn(3, 3, 16, 16, requires_grad=True)
        eager_out, scripted_out = model(x), scripted(x)
        torch.testing.assert_close(scripted_out, eager_out, rtol=0, atol=0)
        torch.testing.assert_close(grads(scripted_out, [x, *scripted.parameters()]),
                                   grads(eager_out, [x, *model.parameters()]), rtol=0, atol=0)


@script_warning
@pytest.mark.parametrize("name", NAMES)
def test_registered_models_script(name):
    with timm.layers.set_scriptable(True):
        model = create(name).eval()
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace_equals_eager(name):
    """torch.fx sees the shift as one call (it needs the input's shape); values and gradients match."""
    model = create(name, num_classes=5)
    traced = torch.fx.symbolic_trace(model)
    calls = [getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"]
    assert calls.count("shift_channels") == 4
    x = image(batch=2)
    out, traced_out = model(x), traced(x)
    torch.testing.assert_close(traced_out, out, rtol=0, atol=0)
    torch.testing.assert_close(grads(traced_out, model.parameters()), grads(out, model.parameters()),
                               rtol=0, atol=0)


@script_warning
def test_timm_fx_feature_extractor_and_its_script():
    """As timm's FX tests: an extractor from the graph's last node, then that extractor scripted."""
    model = create(NAMES[1]).eval()
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = image()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(list(extractor(x).values())[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(list(torch.jit.script(extractor)(x).values())[0], expected, rtol=0, atol=0)


@pytest.mark.slow  # inductor's first compile on a CPU takes tens of seconds
def test_compiled_model_equals_eager():
    torch.manual_seed(0)
    model = S2MLP(image_size=16, patch_size=4, width=16, depth=2, mlp_ratio=2.0, num_classes=5)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    eager_out, compiled_out = model(x), compiled(x)
    # inductor fuses the norms and GELUs into other kernels, so the last bits may differ
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(grads(compiled_out, [x, *model.parameters()]),
                               grads(eager_out, [x, *model.parameters()]))


def test_blocks_are_the_norm_position_asked_for():
    assert type(S2MLP(image_size=16, patch_size=4, width=16, depth=1).blocks[0]) is S2Block
    assert type(S2MLP(image_size=16, patch_size=4, width=16, depth=1, norm_position="pre").blocks[0]) \
        is PreNormS2Block
    with pytest.raises(ValueError, match="unknown norm_position 'mid'"):
        S2MLP(image_size=16, patch_size=4, width=16, depth=1, norm_position="mid")
