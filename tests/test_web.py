"""The web page in a real headless Chromium (Debian's, driven by Playwright): pick two classes and generate with
both models, in-paint a data-set image, and see that bad input is a message while the server keeps serving."""
import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from scalegen.pretrained import SHIPPED_DIT, SHIPPED_VAR  # noqa: E402
from scalegen.web.app import serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A closed network: no background connections, no component updates (as the machine's notes advise).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIDE = 32  # the shipped models' image size
TIMEOUT_MS = 60_000
SCREENSHOTS = os.environ.get("SCALEGEN_SCREENSHOTS")  # a folder: save a screenshot of each tab there (the README's)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def page():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = serve(str(SHIPPED_DIT), str(SHIPPED_VAR), port=port, block=False)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 1300})
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.wait_for_selector("#generate")
        yield tab
        browser.close()
    app.close()


def shown_image(page, selector: str) -> np.ndarray:
    """The image a Gradio image component shows, fetched as the browser got it."""
    source = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("L"))


def set_number(page, selector: str, value: int) -> None:
    field = page.locator(f"{selector} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def test_two_classes_from_both_models_give_grids_strips_and_figures(page):
    for name in ("Trouser", "Bag"):
        page.locator("#classes input").first.click()
        page.keyboard.type(name)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    set_number(page, "#per-class", 3)
    set_number(page, "#steps", 10)
    page.locator("#generate").click()
    page.wait_for_selector("#dit-grid img")
    page.wait_for_selector("#var-grid img")
    for selector in ("#dit-grid", "#var-grid"):
        grid = shown_image(page, selector)
        assert grid.shape == (2 * SIDE, 3 * SIDE) and grid.std() > 20  # two rows of three, not blank
    assert shown_image(page, "#var-strip").shape == (SIDE, 10 * SIDE)  # one frame per scale
    assert shown_image(page, "#dit-strip").shape == (SIDE, 8 * SIDE)  # x̂₀ at eight steps
    figures = page.locator("#sample-info").inner_text()
    assert "DiT" in figures and "VAR" in figures and "GFLOPs/image" in figures
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "web_sample.png"))


def test_in_painting_a_data_set_image_and_bad_input_keep_the_server_up(page):
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit").click()  # no image yet
    page.wait_for_function("document.querySelector('#edit-info').innerText.includes('no image')")
    page.locator("#take").click()
    page.wait_for_selector("#edit-input img")
    page.locator("#edit-class input").first.click()
    page.keyboard.type("Sneaker")
    page.keyboard.press("Enter")
    page.locator("#edit").click()
    page.wait_for_selector("#edit-result img")
    mask, result = shown_image(page, "#edit-mask"), shown_image(page, "#edit-result")
    assert mask.shape == result.shape == (SIDE, SIDE) and mask.min() == 0 and mask.max() == 255
    assert result.std() > 10
    page.locator("#box textarea, #box input").first.fill("0,0,1,1")  # an empty box: no token covered
    page.locator("#edit").click()
    page.wait_for_function("document.querySelector('#edit-info').innerText.includes('covers 0')")
    page.locator("#box textarea, #box input").first.fill("8,8,24,24")
    page.locator("#edit").click()  # still serving
    page.wait_for_function("document.querySelector('#edit-info').innerText.includes('inpainted')")
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "web_edit.png"))


def test_a_model_path_that_does_not_load_is_a_message(page):
    page.get_by_text("Models").first.click()
    page.locator("#dit-path textarea, #dit-path input").first.fill("/no/such/run")
    page.locator("#load").click()
    page.wait_for_function("document.querySelector('#load-message').innerText.includes('does not exist')")
    page.get_by_role("tab", name="Sample").click()
    page.locator("#generate").click()  # the loaded models still answer (no class picked: a message)
    page.wait_for_function("document.querySelector('#sample-info').innerText.length > 0")
