"""Graceful shutdown: on SIGTERM the server stops accepting, finishes in-flight streams, then exits."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest
from server_helpers import start_server, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_sigterm_finishes_in_flight_streams(tmp_path):
    log = tmp_path / "server.log"
    process, url = start_server(["--shutdown-timeout", "60", "--max-num-seqs", "4"], log)
    try:
        wait_ready(process, url, log)
        body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events: list[str] = []
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not events:
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line)
            process.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert '"completion_tokens":24' in events[-2]
        assert '"finish_reason":"length"' in "".join(events)
        threading.Event().wait(0.5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
        # uvicorn re-raises the signal once it has shut down cleanly, as a service manager expects
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text()
    finally:
        stop_server(process)
