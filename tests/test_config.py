"""Typed config: YAML presets, dotted overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepmetric.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(preset: Path) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_presets_exist() -> None:
    names = {p.name for p in PRESETS}
    assert {
        "demo.yaml",
        "omniglot.yaml",
        "deep_metric_bninception_cub.yaml",
        "ms_bninception_cub.yaml",
        "xbm_cub.yaml",
        "xbm_cars196.yaml",
        "xbm_sop.yaml",
        "xbm_inshop.yaml",
        "proxy_anchor_cub.yaml",
        "proxy_anchor_cars196.yaml",
        "proxy_anchor_sop.yaml",
        "proxy_anchor_inshop.yaml",
    } <= names


@pytest.mark.parametrize(
    ("name", "lr", "step_epochs", "gamma", "freeze_bn", "images"),
    [
        ("cub", 1e-4, 10, 0.5, True, 5864),
        ("cars196", 1e-4, 20, 0.5, True, 8054),
        ("sop", 6e-4, 20, 0.25, False, 59551),
        ("inshop", 6e-4, 20, 0.25, False, 25882),
    ],
)
def test_proxy_anchor_presets_follow_the_official_recipe(
    name, lr, step_epochs, gamma, freeze_bn, images
) -> None:
    """BN-Inception 512-d, avg + max pooling, AdamW, proxies at 100 x lr, weight decay 1e-4,
    random batches of 180, 60 epochs, warm-up 1 epoch, step decay (in epochs of 180)."""
    cfg = load_config(ROOT / "configs" / f"proxy_anchor_{name}.yaml")
    epoch = images // 180
    assert (cfg.data.name, cfg.model.backbone, cfg.model.embedding_dim) == (
        name,
        "bninception",
        512,
    )
    assert cfg.model.pooling == "avgmax" and cfg.model.freeze_bn is freeze_bn
    assert cfg.loss.name == "proxy_anchor" and cfg.loss.params == {"alpha": 32.0, "delta": 0.1}
    assert (cfg.sampler.name, cfg.sampler.images_per_batch()) == ("random", 180)
    o = cfg.optim
    assert (o.name, o.lr, o.loss_lr, o.weight_decay, o.loss_weight_decay) == (
        "adamw",
        lr,
        pytest.approx(100 * lr),
        1e-4,
        1e-4,
    )
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == (
        "step",
        step_epochs * epoch,
        gamma,
    )
    assert cfg.train.iterations == 60 * epoch and cfg.train.freeze_backbone_iterations == epoch


def test_overrides_both_forms_and_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "optim: {lr: 1.0e-3}\n"),
        [
            "--optim.lr=1e-4",
            "--data.root",
            "/data/cub",
            "--eval.recall_at=[1, 2]",
            "--loss.neg_margin",
            "0.3",
            "--loss.name=contrastive",
            "--data.options.classes=[0, 3]",
            "--train.amp",
            "bf16",
            "--model.pretrained",
            "null",
        ],
    )
    assert cfg.optim.lr == 1e-4  # "1e-4" is a string for YAML 1.1: still a float here
    assert cfg.data.root == "/data/cub"
    assert cfg.eval.recall_at == [1, 2]
    assert cfg.loss.name == "contrastive" and cfg.loss.params == {"neg_margin": 0.3}
    assert cfg.data.options == {"classes": [0, 3]}
    assert cfg.train.amp == "bf16" and cfg.model.pretrained is None
    assert cfg.sources["optim.lr"] == "command line"


def test_unknown_key_in_file_names_file_and_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "optim.lrr" in msg and "optim.lr" in msg  # did you mean


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        load_config(write(tmp_path, "optimizer: {lr: 0.1}\n"))


def test_wrong_type_names_key_and_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  iterations: many\n"))
    assert "train.iterations" in str(e.value) and "expected an integer" in str(e.value)
    assert "'many'" in str(e.value)
    with pytest.raises(ConfigError, match=r"train.amp: expected one of 'none', 'bf16', 'fp16'"):
        load_config(None, ["--train.amp=fp8"])
    with pytest.raises(
        ConfigError,
        match=r"command line \(--xbm.enabled\): xbm.enabled: expected "
        r"true or false",
    ):
        load_config(None, ["--xbm.enabled=yes please"])


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match=r"--sampler.q.*unknown key 'sampler.q'"):
        load_config(None, ["--sampler.q=3"])


def test_bad_loss_hyper_parameter_names_loss_key(tmp_path: Path) -> None:
    path = write(tmp_path, "loss: {name: contrastive, margn: 0.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "loss.margn" in str(e.value) and str(path) in str(e.value)
    assert "neg_margin" in str(e.value)  # lists the accepted ones
    with pytest.raises(ConfigError, match=r"loss.alfa"):
        load_config(None, ["--loss.name=multi_similarity", "--loss.alfa=2"])
    with pytest.raises(ConfigError, match=r"loss.name: unknown loss 'sphereface'"):
        load_config(None, ["--loss.name=sphereface"])
    with pytest.raises(ConfigError, match=r"loss \(contrastive\)"):  # value the loss rejects
        load_config(None, ["--loss.name=contrastive", "--loss.form=cosine"])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=r"sampler\.k"):
        load_config(None, ["--sampler.k=1"])
    with pytest.raises(ConfigError, match=r"xbm\.size"):
        load_config(None, ["--xbm.enabled=true", "--xbm.size=10"])
    with pytest.raises(ConfigError, match=r"schedule\.milestones"):
        load_config(None, ["--schedule.name=multistep"])
    with pytest.raises(ConfigError, match=r"eval\.val_fraction"):
        load_config(None, ["--eval.protocol=val", "--eval.val_fraction=1.5"])


def test_proxy_loss_and_random_sampler_checks() -> None:
    """A proxy loss needs no num_classes in the config (the trainer passes the training
    split's); it cannot sit in a cross-batch memory; its embedding_dim is the model's."""
    cfg = load_config(None, ["--loss.name=proxy_anchor", "--loss.alpha=16"])
    assert cfg.loss.params == {"alpha": 16}
    load_config(None, ["--loss.name=proxy_nca", "--loss.variant=original"])  # needs C >= 2
    with pytest.raises(ConfigError, match=r"xbm\.enabled: .*'proxy_anchor' is a proxy loss"):
        load_config(None, ["--loss.name=proxy_anchor", "--xbm.enabled=true"])
    with pytest.raises(ConfigError, match=r"loss\.embedding_dim: 64 differs from model"):
        load_config(None, ["--loss.name=arcface", "--loss.embedding_dim=64"])
    load_config(None, ["--loss.name=arcface", "--loss.embedding_dim=512"])  # the same: fine
    with pytest.raises(ConfigError, match=r"loss \(normalized_softmax\): temperature"):
        load_config(None, ["--loss.name=normalized_softmax", "--loss.temperature=0"])
    with pytest.raises(ConfigError, match=r"loss \(soft_triple\): num_classes must be"):
        load_config(None, ["--loss.name=soft_triple", "--loss.num_classes=0"])
    with pytest.raises(ConfigError, match=r"loss\.centres: not a hyper-parameter"):
        load_config(None, ["--loss.name=soft_triple", "--loss.centres=3"])
    random = load_config(None, ["--sampler.name=random", "--sampler.batch_size=180"])
    assert random.sampler.images_per_batch() == 180
    with pytest.raises(ConfigError, match=r"--sampler\.name=random needs --sampler\.batch_size"):
        load_config(None, ["--sampler.name=random"])
    with pytest.raises(ConfigError, match=r"sampler\.batch_size: P x K batches hold p x k = 64"):
        load_config(None, ["--sampler.batch_size=100"])
    with pytest.raises(ConfigError, match=r"xbm\.size"):
        load_config(
            None,
            [
                "--sampler.name=random",
                "--sampler.batch_size=300",
                "--xbm.enabled=true",
                "--xbm.size=200",
            ],
        )
    with pytest.raises(ConfigError, match=r"train\.freeze_backbone_iterations"):
        load_config(None, ["--train.freeze_backbone_iterations=-1"])


def test_malformed_overrides() -> None:
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["optim.lr=3"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["--optim=3"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "optim: {lr: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "optim: 3\n"))


# ------------------------------------------------------------------ option mappings


DEMO = ROOT / "configs" / "demo.yaml"
OMNIGLOT = ROOT / "configs" / "omniglot_multi_similarity.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--data.options.clases=[0, 3]",
            r"data\.options\.clases: not an option of data set "
            r"'digits' \(did you mean 'classes'\?\)",
        ),
        (
            "--data.test_options.invert=true",
            r"data\.test_options\.invert: not an option of "
            r"data set 'digits'",
        ),
        (
            "--data.options.size=16",
            r"data\.options\.size: the image size is set by "
            r"data\.transform_options\.size",
        ),
        (
            "--data.transform_options.sise=16",
            r"data\.transform_options\.sise: not an option of "
            r"the 'small' transform \(did you mean 'size'\?\)",
        ),
        ("--data.transform_options.scale=[0.5, 1]", r"transform_options\.scale: not an option"),
        (
            "--model.options.embedding_dim=8",
            r"model\.options\.embedding_dim: set "
            r"model\.embedding_dim instead",
        ),
        (
            "--model.options.drop_rate=0.1",
            r"model\.options\.drop_rate: not an option of "
            r"build_model; expected one of: in_chans",
        ),
        ("--data.name=cubb", r"data\.name: unknown data set 'cubb'"),
        ("--data.transform=imagenett", r"data\.transform: unknown preset 'imagenett'"),
    ],
)
def test_option_mappings_checked_against_the_functions_they_feed(override, message) -> None:
    """A wrong option is a ConfigError at load time, naming the key and its source, never a
    TypeError from inside a loader, transform or backbone."""
    with pytest.raises(ConfigError, match=message) as e:
        load_config(DEMO, [override])
    assert "command line" in str(e.value) or "demo.yaml" in str(e.value)


def test_option_mappings_accept_what_the_functions_take(tmp_path: Path) -> None:
    cfg = load_config(
        DEMO,
        [
            "--data.options.classes=[0, 3]",
            "--data.transform=imagenet",
            "--data.transform_options={size: 64, scale: [0.5, 1.0]}",
            "--model.options.in_chans=3",
        ],
    )
    assert cfg.data.transform_options == {"size": 64, "scale": [0.5, 1.0]}
    # a file's own mistake names the file
    path = write(tmp_path, "data: {name: digits, options: {invert: true}}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: data\.options\.invert"):
        load_config(path)


def test_size_means_the_same_for_arrays_and_image_files(tmp_path: Path) -> None:
    """data.transform_options.size is the side of the images the network sees: the array
    loader resizes once at load time, an image-file data set through its transform."""
    from PIL import Image

    from deepmetric.engine import build_data

    for split, classes in (("train", ("a", "b")), ("test", ("c", "d"))):
        for j, c in enumerate(classes):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                shade = 40 * i + 10 * j + (100 if split == "test" else 0)  # no two files alike
                Image.new("L", (20, 12), color=shade).save(tmp_path / split / c / f"{i}.png")
    arrays = load_config(DEMO)
    files = load_config(DEMO, ["--data.name=folder", f"--data.root={tmp_path}"])
    for cfg in (arrays, files):
        train_set, evals = build_data(cfg)
        assert train_set[0][0].shape == evals["test"].dataset[0][0].shape == (1, 32, 32)
    assert build_data(arrays)[0].images.shape[-2:] == (32, 32)  # resized once, at load time


# ------------------------------------------------------------------ switching the loss


def test_new_loss_name_starts_from_its_defaults_and_says_what_it_dropped() -> None:
    base = load_config(OMNIGLOT)
    assert base.loss.params == {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}
    for overrides in (["--loss.name=contrastive"], ["--loss={name: contrastive}"]):
        cfg = load_config(OMNIGLOT, overrides)
        assert cfg.loss.name == "contrastive" and cfg.loss.params == {}
        assert len(cfg.notes) == 1 and "dropped loss.alpha, loss.beta, loss.base" in cfg.notes[0]
    # hyper-parameters given on the command line stay, before or after the name
    for overrides in (
        ["--loss.name=contrastive", "--loss.neg_margin=0.3"],
        ["--loss.neg_margin=0.3", "--loss.name=contrastive"],
        ["--loss={name: contrastive, neg_margin: 0.3}"],
    ):
        assert load_config(OMNIGLOT, overrides).loss.params == {"neg_margin": 0.3}, overrides
    # the same name: nothing dropped
    same = load_config(OMNIGLOT, ["--loss.name=multi_similarity", "--loss.beta=40"])
    assert same.loss.params["beta"] == 40 and same.loss.params["alpha"] == 2.0 and not same.notes
    # a hyper-parameter of the old loss given for the new one is still an error
    with pytest.raises(
        ConfigError,
        match=r"loss\.alpha: not a hyper-parameter of loss "
        r"'contrastive'",
    ):
        load_config(OMNIGLOT, ["--loss.name=contrastive", "--loss.alpha=2"])
