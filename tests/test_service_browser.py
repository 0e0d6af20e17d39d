"""The upload page in headless Chromium (Debian's /usr/bin/chromium driven by Python playwright)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from tests.service_support import model_dir, run_server, wait_for
from training.data.non_item_frames import non_item_frame

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextmanager
def chromium_page() -> Iterator[tuple[Page, list[str]]]:
    """A page in headless Chromium and the JavaScript errors it raises (a test asserts there are none)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: `make system-deps` (Debian packages chromium, chromium-driver)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def test_upload_page_shows_verdict_and_bars(tmp_path: Path, trashnet_dir: Path) -> None:
    model = model_dir()
    photo = trashnet_dir / "metal" / "metal1.jpg"
    with run_server(model, tmp_path) as server, server.client() as client:
        expected = client.post("/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"}).json()
        with chromium_page() as (page, errors):
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


def test_upload_page_shows_no_item(tmp_path: Path) -> None:
    """A frame with no item in it (a covered lens, generated) is shown as such, not as a recyclable."""
    frame = non_item_frame("covered", (384, 512), np.random.default_rng(0))
    photo = tmp_path / "covered.png"
    Image.fromarray(frame).save(photo)
    with run_server(model_dir(), tmp_path) as server, chromium_page() as (page, errors):
        page.goto(server.url + "/")
        page.wait_for_selector("#model:has-text('normal classes')", timeout=15_000)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#result", state="visible", timeout=15_000)
        assert page.get_attribute("#verdict", "data-verdict") == "no_item"
        assert page.inner_text("#verdict") == "No item in the frame"
        assert page.get_attribute("#verdict", "class") == "no_item"
        assert errors == []


def test_review_page_labels_survive_a_reload(tmp_path: Path, trashnet_dir: Path) -> None:
    """Label three captures (a click, the anomaly key, a class key), reload: the labels are still there."""
    token = "review-test-token"
    photos = [
        sorted((trashnet_dir / name).glob("*.jpg"))[3] for name in ("glass", "paper", "trash", "metal", "plastic")
    ]
    flags = ("--capture-dir", str(tmp_path / "captures"), "--operator-token", token, "--threshold", "0")
    with run_server(model_dir(), tmp_path, *flags) as server, server.client() as client:
        for photo in photos:
            client.post("/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
        auth = {"Authorization": f"Bearer {token}"}
        assert wait_for(lambda: client.get("/captures", headers=auth).json()["total"] == len(photos))
        labels = client.get("/captures", headers=auth).json()["labels"]
        anomaly = client.get("/captures", headers=auth).json()["anomaly_labels"][0]
        with chromium_page() as (page, errors):
            page.goto(server.url + "/review")
            page.fill("#token", token)
            page.click("#login button[type=submit]")
            page.wait_for_selector(f".card >> nth={len(photos) - 1}", timeout=15_000)
            ids = [card.get_attribute("data-id") for card in page.query_selector_all(".card")]
            assert len(ids) == len(photos)
            # Thumbnails load through the cookie the page set (an <img> sends no Authorization header).
            page.wait_for_function(
                "[...document.querySelectorAll('.thumb')].every(img => img.complete && img.naturalWidth > 0)",
                timeout=15_000,
            )

            page.click(f".card[data-id='{ids[0]}'] button[data-label='{labels[1]}']")  # a click
            page.wait_for_selector(f".card[data-id='{ids[0]}'][data-label='{labels[1]}']", timeout=15_000)
            page.keyboard.press("t")  # the selection moved to the second card
            page.wait_for_selector(f".card[data-id='{ids[1]}'][data-label='{anomaly}']", timeout=15_000)
            page.keyboard.press("ArrowRight")  # skip the third
            page.keyboard.press("1")
            page.wait_for_selector(f".card[data-id='{ids[3]}'][data-label='{labels[0]}']", timeout=15_000)
            expected = {ids[0]: labels[1], ids[1]: anomaly, ids[2]: "", ids[3]: labels[0], ids[4]: ""}

            page.reload()  # the token is remembered for the tab: no second prompt
            page.wait_for_selector(f".card >> nth={len(photos) - 1}", timeout=15_000)
            assert page.is_hidden("#login")
            shown = {
                card.get_attribute("data-id"): card.get_attribute("data-label")
                for card in page.query_selector_all(".card")
            }
            assert shown == expected
            assert page.inner_text(f".card[data-id='{ids[1]}'] .current") == f"label: {anomaly}"
            assert errors == []
            page.screenshot(path=str(tmp_path / "review-page.png"), full_page=True)
        on_server = {item["id"]: item["label"] or "" for item in client.get("/captures", headers=auth).json()["items"]}
        assert on_server == expected
