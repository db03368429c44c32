import pytest

from config import LATENCY_PRESETS, parse_args, session_options


def test_preset_fills_unset_options_and_command_line_wins(tmp_path):
    args = parse_args(["--latency_mode", "balanced"])
    assert args.batch_size == LATENCY_PRESETS["balanced"]["batch_size"]
    assert (args.l, args.r) == (LATENCY_PRESETS["balanced"]["l"], LATENCY_PRESETS["balanced"]["r"])
    args = parse_args(["--latency_mode", "balanced", "--batch_size", "3", "-r", "4"])
    assert args.batch_size == 3 and args.r == 4


def test_yaml_config_between_preset_and_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("latency_mode: high_quality\nbatch_size: 5\nport: 9000\n")
    args = parse_args(["--config", str(cfg), "--port", "9100"])
    assert args.latency_mode == "high_quality" and args.batch_size == 5 and args.port == 9100
    assert args.prebuffer == LATENCY_PRESETS["high_quality"]["prebuffer"]
    assert session_options(args).batch_size == 5


def test_listenport_alias_and_bad_config(tmp_path):
    assert parse_args(["--listenport", "8123"]).port == 8123
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    with pytest.raises(SystemExit):
        parse_args(["--batch_size", "0"])
