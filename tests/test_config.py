"""Configuration: flags beat variables, variables beat defaults, bad values are named."""

from __future__ import annotations

import pytest

from shared.config import BrokerConfig, GatewayConfig, StreamConfig, WorkerConfig, from_env


def test_defaults_without_environment():
    cfg = from_env(GatewayConfig, {})
    assert (cfg.host, cfg.port, cfg.broker) == ("127.0.0.1", 8086, "tcp://127.0.0.1:5555")


def test_variable_then_flag():
    env = {"LIPSYNC_PORT": "9001", "LIPSYNC_MAX_IN_FLIGHT": "7"}
    assert from_env(GatewayConfig, env).port == 9001
    cfg = from_env(GatewayConfig, env, port=9002, max_in_flight=None)
    assert (cfg.port, cfg.max_in_flight) == (9002, 7)


def test_broker_addresses_have_their_own_variables():
    env = {
        "LIPSYNC_BACKEND": "null",
        "LIPSYNC_BROKER_BACKEND": "tcp://0.0.0.0:6000",
        "LIPSYNC_WORKER_BROKER": "tcp://10.0.0.1:6000",
        "LIPSYNC_GATEWAY_BROKER": "tcp://10.0.0.1:6001",
    }
    assert from_env(WorkerConfig, env).backend == "null"
    assert from_env(WorkerConfig, env).broker == "tcp://10.0.0.1:6000"
    assert from_env(BrokerConfig, env).backend == "tcp://0.0.0.0:6000"
    assert from_env(GatewayConfig, env).broker == "tcp://10.0.0.1:6001"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("off", False), ("Yes", True)])
def test_booleans(raw, expected):
    assert from_env(WorkerConfig, {"LIPSYNC_FP16": raw}).fp16 is expected


def test_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="LIPSYNC_MAX_BATCH='many'"):
        from_env(WorkerConfig, {"LIPSYNC_MAX_BATCH": "many"})


def test_worker_index_from_supervisord_spreads_auto_devices():
    """supervisord gives each worker LIPSYNC_WORKER_INDEX; ``auto`` maps it onto the GPUs."""
    from workers.unet import resolve_device

    assert from_env(WorkerConfig, {"LIPSYNC_WORKER_INDEX": "3"}).worker_index == 3
    import torch

    expected = f"cuda:{3 % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto", 3)) == expected
    assert str(resolve_device("cpu", 3)) == "cpu"


def test_stream_settings_have_their_own_variables():
    """``LIPSYNC_STREAM_*`` (docs/streams.md, "Gateway settings"); a bad value names the
    variable that holds it."""
    assert from_env(StreamConfig, {}) == StreamConfig()
    env = {
        "LIPSYNC_STREAM_PER_CONNECTION": "2",
        "LIPSYNC_STREAM_GRACE_FRAMES": "75",
        "LIPSYNC_STREAM_SLOT_DEADLINES": "0",
        "LIPSYNC_MAX_AHEAD": "99",  # not a stream variable
    }
    cfg = from_env(StreamConfig, env)
    assert (cfg.max_streams_per_connection, cfg.grace_frames) == (2, 75.0)
    assert cfg.slot_deadlines is False and cfg.max_ahead == 8
    with pytest.raises(ValueError, match="LIPSYNC_STREAM_TTL_MS='soon'"):
        from_env(StreamConfig, {"LIPSYNC_STREAM_TTL_MS": "soon"})
