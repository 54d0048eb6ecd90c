"""The compiled hot path is the one that runs: a guard against bypassing it by accident."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from trisocks.net import channel, session
from trisocks.wire import codec

from .inproc import echo_handler, echo_roundtrip, serve_tcp, start_tunnel

COMPILED_BUILT = importlib.util.find_spec("trisocks.wire._relay") is not None


def require_compiled() -> None:
    if COMPILED_BUILT:
        return
    if os.environ.get("CI") or os.environ.get("TRISOCKS_REQUIRE_COMPILED"):
        pytest.fail("the compiled extension trisocks.wire._relay is not built")
    pytest.skip("trisocks.wire._relay is not built here (run `make build`)")


def test_codec_uses_the_extension():
    require_compiled()
    from trisocks.wire import _relay

    assert codec.IMPLEMENTATION == "compiled"
    assert codec.Decoder is _relay.Decoder
    assert codec.encode_data is _relay.encode_data
    assert codec.encode_frame is _relay.encode_frame
    # the data path imports its hot functions from codec, not from the pure twin
    assert channel.encode_data is _relay.encode_data
    assert "_relay_py" not in vars(channel) and "_relay_py" not in vars(session)


async def test_live_sessions_decode_with_the_extension(nursery):
    require_compiled()
    from trisocks.wire import _relay

    tunnel = await start_tunnel(nursery)
    echo = await serve_tcp(nursery, echo_handler)
    assert await echo_roundtrip(tunnel.socks_port, echo, os.urandom(1 << 20))
    decoders = [s.decoder for s in tunnel.server.sessions] + [s.decoder for s in tunnel.client.sessions]
    assert decoders and all(type(d) is _relay.Decoder for d in decoders)


def _version(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRISOCKS_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "trisocks", "version"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_version_names_the_implementation():
    require_compiled()
    assert "(compiled hot path)" in _version({}).stdout
    assert "(pure hot path)" in _version({"TRISOCKS_PURE": "1"}).stdout
    assert "(compiled hot path)" in _version({"TRISOCKS_REQUIRE_COMPILED": "1"}).stdout


def test_requiring_compiled_while_forcing_pure_is_an_error():
    result = _version({"TRISOCKS_PURE": "1", "TRISOCKS_REQUIRE_COMPILED": "1"})
    assert result.returncode != 0
    assert "TRISOCKS_PURE and TRISOCKS_REQUIRE_COMPILED" in result.stderr
