"""``python PKG serve`` as users run it: its own process, its flags, SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from server_helpers import poll_until, serve_process


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port``, from /proc/net/tcp (Linux)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False


def test_serve_help_teaches():
    from llmc.runtime.cli import build_parser

    text = build_parser("python PKG")._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--host", "--port", "--api-key", "--device", "--kv-cache-bytes", "--max-num-seqs",
                 "--max-num-batched-tokens", "--max-queue", "--no-prefix-caching", "--served-model-name",
                 "--drain-timeout", "--max-request-bytes", "examples:", "LLMC_API_KEY"):
        assert flag in text


@pytest.mark.slow  # one subprocess start (torch import, engine load): ~10 s on a busy 2-core machine
def test_serve_process_binds_localhost_and_drains_on_sigterm(package):
    """One process, as users start it: 127.0.0.1 by default, env API key, served name, KV report line;
    SIGTERM while a request streams: no new connections, the request still completes, exit code 0."""
    body = {"model": "tiny", "prompt": "a", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": "Bearer from-env"}
    with serve_process(package, "--served-model-name", "tiny", "--kv-cache-bytes", "4MiB", "--drain-timeout", "120",
                       env={"LLMC_API_KEY": "from-env"}) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        if Path("/proc/net/tcp").is_file():
            assert listening_addresses(port) == {"127.0.0.1"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
        with httpx.Client(timeout=120, headers=headers) as client, \
                client.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept open: a closed iterator would close the connection
            events = [next(line for line in lines if line.startswith("data: "))]
            process.send_signal(signal.SIGTERM)
            poll_until(lambda: refused(url), what="the server to stop accepting connections")
            events += [line for line in lines if line.startswith("data: ")]
        assert process.wait(60) == 0
        out = process.stdout.read()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) > 2 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 40  # all of it, though SIGTERM came after the first
    assert "KV cache: 512 pages" in out  # 4 MiB / 8 KiB per page (16 tokens x 2 layers x K,V x 2 heads x 16 x 4 B)
    assert f"http://127.0.0.1:{port}/v1" in out


def test_bad_flag_is_a_one_line_error(package, capsys):
    from llmc.runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-queue", "-1"], package_dir=package)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--max-queue" in err and len(err.splitlines()) == 1
