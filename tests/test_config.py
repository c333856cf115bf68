import argparse
import json

import pytest

from hyclora import HyCLoRAConfig


def test_defaults_match_the_reference():
    cfg = HyCLoRAConfig()
    assert cfg.use_hyclora is True
    assert cfg.layer_type == "intra_inter"
    assert cfg.q_bit == 4
    assert cfg.softmax_outlier_ratio == 0.05
    assert cfg.layernorm_outlier_ratio == 0.005
    assert cfg.iteration_threshold == 5


@pytest.mark.parametrize(
    "field,value",
    [
        ("layer_type", "fused"),
        ("q_bit", 3),
        ("q_bit", 16),
        ("q_bit", True),
        ("softmax_outlier_ratio", -0.1),
        ("softmax_outlier_ratio", 1.5),
        ("softmax_outlier_ratio", float("nan")),
        ("layernorm_outlier_ratio", 2),
        ("layernorm_outlier_ratio", "0.1"),
        ("iteration_threshold", -1),
        ("iteration_threshold", 2.5),
        ("use_hyclora", "yes"),
        ("on_nonfinite", "warn"),
        ("kernel_backend", "cuda"),
        ("attention_probs", "flash"),
    ],
)
def test_invalid_values_name_the_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        HyCLoRAConfig(**{field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message
    assert "expected" in message


def test_json_round_trip(tmp_path):
    cfg = HyCLoRAConfig(layer_type="intra", q_bit=2, softmax_outlier_ratio=0.1, iteration_threshold=0)
    assert HyCLoRAConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "hyclora.json"
    cfg.to_json(str(path))
    assert HyCLoRAConfig.from_json(str(path)) == cfg
    with pytest.raises(ValueError, match="Unknown HyCLoRAConfig field"):
        HyCLoRAConfig.from_dict({**json.loads(cfg.to_json()), "bits": 3})


def test_argparse_flags():
    parser = HyCLoRAConfig.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        "--use_hyclora false --layer_type intra --q_bit 2 --softmax_outlier_ratio 0.1 "
        "--layernorm_outlier_ratio 0.01 --iteration_threshold 3".split()
    )
    cfg = HyCLoRAConfig.from_args(args)
    assert cfg == HyCLoRAConfig(
        use_hyclora=False, layer_type="intra", q_bit=2, softmax_outlier_ratio=0.1,
        layernorm_outlier_ratio=0.01, iteration_threshold=3,
    )
    assert HyCLoRAConfig.from_args(parser.parse_args([])) == HyCLoRAConfig()
    assert parser.parse_args(["--use_hyclora"]).use_hyclora is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--q_bit", "3"])


def test_hf_argument_parser_accepts_the_dataclass():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(HyCLoRAConfig).parse_args_into_dataclasses(
        ["--layer_type", "baseline", "--q_bit", "8"]
    )
    assert cfg.layer_type == "baseline" and cfg.q_bit == 8
    parser = HyCLoRAConfig.add_arguments(HfArgumentParser([]))
    assert HyCLoRAConfig.from_args(parser.parse_args(["--q_bit", "2"])).q_bit == 2


def test_recalibrate_mode_is_checked_and_reaches_the_statistics():
    import argparse

    import pytest

    from hyclora import HyCLoRAConfig

    with pytest.raises(ValueError, match="recalibrate_mode='sometimes'.*refresh, reset"):
        HyCLoRAConfig(recalibrate_mode="sometimes")
    parser = HyCLoRAConfig.add_arguments(argparse.ArgumentParser())
    assert HyCLoRAConfig.from_args(parser.parse_args([])).recalibrate_mode == "refresh"
    assert HyCLoRAConfig.from_args(parser.parse_args(["--recalibrate_mode", "reset"])).recalibrate_mode == "reset"
    from hyclora import apply_hyclora, revert_hyclora
    from hyclora.demo import build_lora_llama
    from hyclora.quant import ChannelStats

    model, _ = build_lora_llama(hidden=32, layers=1, heads=2, kv_heads=2, ffn=48, vocab=64)
    for mode, refresh in (("refresh", True), ("reset", False)):
        apply_hyclora(model, HyCLoRAConfig(layer_type="intra_inter", recalibrate_mode=mode))
        stats = [m for m in model.modules() if isinstance(m, ChannelStats)]
        assert stats and all(s.refresh is refresh for s in stats)
        revert_hyclora(model)


def test_calibration_is_checked_resolved_and_reaches_the_statistics():
    import argparse

    import pytest

    from hyclora import HyCLoRAConfig, apply_hyclora, revert_hyclora
    from hyclora.demo import build_lora_llama
    from hyclora.quant import ChannelStats

    with pytest.raises(ValueError, match="calibration='soon'.*auto, quick, eager"):
        HyCLoRAConfig(calibration="soon")
    with pytest.raises(ValueError, match="calibration='quick'.*recalibrate_mode='reset'"):
        HyCLoRAConfig(calibration="quick", recalibrate_mode="reset")
    with pytest.raises(ValueError, match="calibration='quick'.*iteration_threshold=0"):
        HyCLoRAConfig(calibration="quick", iteration_threshold=0)
    parser = HyCLoRAConfig.add_arguments(argparse.ArgumentParser())
    assert HyCLoRAConfig.from_args(parser.parse_args(["--calibration", "eager"])).calibration == "eager"
    model, _ = build_lora_llama(hidden=32, layers=1, heads=2, kv_heads=2, ffn=48, vocab=64)
    for kwargs, quick in (({}, True), ({"recalibrate_mode": "reset"}, False), ({"iteration_threshold": 0}, False),
                          ({"calibration": "eager"}, False), ({"calibration": "quick", "recalibrate_every": 0}, True)):
        cfg = HyCLoRAConfig(layer_type="intra_inter", **kwargs)
        assert cfg.quick_calibration is quick, kwargs
        apply_hyclora(model, cfg)
        stats = [m for m in model.modules() if isinstance(m, ChannelStats)]
        assert stats and all(s.quick is quick for s in stats), kwargs
        revert_hyclora(model)
