"""The chat page at GET / in headless Chromium (Debian's `chromium`, Playwright's Python API)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import REQUIRE_EXTRAS, requires_extra
from serving import Server, request, tiny_run

sync_api = requires_extra("playwright.sync_api", "dev")
CHROMIUM = shutil.which("chromium")
SNN_RAG = ("model.name=snn_rag", "model.memory_capacity=64", "model.memory_chunk=8")


@pytest.mark.slow
def test_type_stream_stop_and_see_memories(tmp_path: Path) -> None:
    if CHROMIUM is None:  # `make install` installs it; then its absence is a failure
        message = "needs Debian's chromium: apt-get install chromium (make install does)"
        if os.environ.get(REQUIRE_EXTRAS) == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = Server(tiny_run(tmp_path, *SNN_RAG), "--memory-dir", str(tmp_path / "memory"),
                    "--max-tokens-limit", "1000000")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.base)
            page.fill("#max_tokens", "5")
            page.fill("#input", "my name is Zed and I like green apples")
            page.press("#input", "Enter")
            sync_api.expect(page.locator("#messages li")).to_have_count(2)
            sync_api.expect(page.locator("#send")).to_be_enabled(timeout=30_000)
            sync_api.expect(page.locator("#memory-info")).to_contain_text("4 from conversations")

            page.fill("#max_tokens", "1000000")
            page.fill("#input", "what is my name? I like green apples")
            page.press("#input", "Enter")
            reply = page.locator("#messages li.assistant").last
            sync_api.expect(reply).not_to_have_text("", timeout=30_000)  # streamed text
            sync_api.expect(page.locator("#stop")).to_be_enabled()
            page.click("#stop")
            sync_api.expect(reply).to_have_class("assistant stopped", timeout=10_000)
            sync_api.expect(page.locator("#status")).to_have_text("stopped")
            health = request(server.port, "GET", "/health")[1]
            for _ in range(100):
                if health["active"] == 0:
                    break
                page.wait_for_timeout(100)
                health = request(server.port, "GET", "/health")[1]
            assert health["cancelled"] == 1 and health["active"] == 0  # the server stopped too
            sync_api.expect(page.locator("#messages li")).to_have_count(4)
            sync_api.expect(page.locator("#memories li").first).to_contain_text("Zed")
            page.reload()  # the conversation is kept in the browser
            sync_api.expect(page.locator("#messages li")).to_have_count(4)
            sync_api.expect(page.locator("#history li")).to_have_count(1)
            browser.close()
    finally:
        assert server.stop(signal.SIGTERM) == 128 + signal.SIGTERM
