"""The upload page in headless Chromium (Debian's /usr/bin/chromium driven by Python playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.service_support import model_dir, run_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_upload_page_shows_verdict_and_bars(tmp_path: Path, trashnet_dir: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: `make system-deps` (Debian packages chromium, chromium-driver)")
    model = model_dir()
    photo = trashnet_dir / "metal" / "metal1.jpg"
    with run_server(model, tmp_path) as server, server.client() as client:
        expected = client.post("/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"}).json()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(server.url + "/")
                page.wait_for_selector("#model:has-text('normal classes')", timeout=15_000)
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#result", state="visible", timeout=15_000)

                assert page.get_attribute("#verdict", "data-verdict") == expected["verdict"]
                assert page.inner_text("#nearest") == expected["nearest_class"]
                bars = page.query_selector_all(".bar")
                assert [bar.get_attribute("data-class") for bar in bars] == list(expected["distances"])
                widths = [bar.evaluate("b => b.getBoundingClientRect().width") for bar in bars]
                assert all(width > 0 for width in widths)
                # Bar lengths are proportional to the distances.
                distances = list(expected["distances"].values())
                longest = max(range(len(distances)), key=distances.__getitem__)
                assert max(range(len(widths)), key=widths.__getitem__) == longest
                assert len(page.query_selector_all(".threshold")) == len(bars)
                assert errors == []
                page.screenshot(path=str(tmp_path / "upload-page.png"), full_page=True)

                # A broken upload shows the API's error message, not a stack trace.
                bad = tmp_path / "not-a-photo.jpg"
                bad.write_bytes(b"definitely not a jpeg")
                page.set_input_files("#file", str(bad))
                page.wait_for_selector("#error:has-text('400')", timeout=15_000)
            finally:
                browser.close()
