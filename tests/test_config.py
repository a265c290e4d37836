import pytest

from hrhf.config import Config, from_dict, load_config, parse_override, to_dict


def test_default_and_smoke_presets():
    default, smoke = load_config(), load_config("smoke")
    assert default.data.protocol == "6-2-2" and default.method.name == "hrhf"
    assert smoke.train.epochs_base < default.train.epochs_base


def test_overrides_parse_yaml_values():
    cfg = load_config("smoke", overrides=["inversion.scales=[0.1, 0.3]", "method.w_fake=2", "data.overlap=false"])
    assert cfg.inversion.scales == [0.1, 0.3]
    assert cfg.method.w_fake == 2.0 and isinstance(cfg.method.w_fake, float)
    assert cfg.data.overlap is False
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


def test_method_preset_then_override():
    cfg = load_config(method="mib", overrides=["method.w_kd_real=3"])
    assert cfg.method.name == "mib" and not cfg.method.fake and cfg.method.w_kd_real == 3.0


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  protocol: 6-1\ntrain:\n  epochs_step: 3\n")
    cfg = load_config(yaml_path=path, overrides=["train.epochs_step=4"])
    assert cfg.data.protocol == "6-1" and cfg.train.epochs_step == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=3", "unknown config key 'train.epochs'"),
        ("train.epochs_step=abc", "train.epochs_step: expected int"),
        ("method.ce=weird", "method.ce='weird' is not one of"),
        ("inversion.scales=[0.0, 2]", "inversion.scales"),
        ("data.dataset=voc", "data.root is required"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("smoke", overrides=[override])


def test_missing_yaml_and_unknown_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(yaml_path=tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ValueError, match="unknown method"):
        load_config(method="plop2")


def test_dict_roundtrip():
    cfg = load_config("smoke", method="mib", overrides=["data.class_order=[10,9,8,7,6,5,4,3,2,1]"])
    again = from_dict(to_dict(cfg))
    assert again == cfg and isinstance(again, Config)


def test_exponent_without_a_dot_is_a_float():
    # YAML 1.1 reads 1e-3 as a string; a learning rate written that way must still work
    cfg = load_config("smoke", overrides=["train.lr_step=1e-3"])
    assert cfg.train.lr_step == 0.001


def test_defaults_are_hrhf_on_version_2_and_mib_keeps_its_kd_rule():
    cfg = load_config()
    assert cfg.data.shapes_version == 2 and cfg.train.min_iters_step == 400 and cfg.inversion.retry_below == 0.25
    assert cfg.method == load_config(method="hrhf").method and not cfg.method.kd_on_new
    assert load_config(method="mib").method.kd_on_new and load_config(method="lwf").method.kd_on_new
    assert load_config("smoke").train.min_iters_step == 0  # the smoke preset stays seconds long
