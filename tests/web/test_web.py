"""The web page in a real headless Chromium (Debian's, driven by Playwright): each model's own defaults, pick two
classes and generate with both models (grids with their rows named), the VAR's speed-ups (FastVAR pruning, a CoDe
refiner), in-paint a data-set image, and see that bad input — a file that is not an image, a negative top-k, a seed
past 64 bits, a model path outside the page's model folders — is a one-line message in the page, with no server
traceback, while the server keeps serving; a page started with a login refuses a wrong password and lets the right one
in. The page's functions are also called directly (no browser): the speed-ups reach the VAR, and a refiner missing is
a message."""
import io
import os
import re
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from scalegen.runs.names import SHIPPED_DIT, SHIPPED_VAR  # noqa: E402
from scalegen.runs.weights import stored_config  # noqa: E402
from scalegen.models.sampling_settings import SAMPLING_KEY  # noqa: E402
from scalegen.web.app import WARNING, Models, edit, load, sample, serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A closed network: no background connections, no component updates (as the machine's notes advise).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIDE = 32  # the shipped models' image size
TIMEOUT_MS = 60_000
# The shipped models' recommended settings, where the page starts.
SHIPPED_DIT_CFG = stored_config(SHIPPED_DIT)[SAMPLING_KEY]["cfg"]
SHIPPED_VAR_CFG, SHIPPED_VAR_TOP_P = (stored_config(SHIPPED_VAR)[SAMPLING_KEY][name] for name in ("cfg", "top_p"))
SCREENSHOTS = os.environ.get("SCALEGEN_SCREENSHOTS")  # a folder: save a screenshot of each tab there (the README's)



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, for the pages of this module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    """The page in headless Chromium, serving the shipped DiT and VAR, the VAR also as its own CoDe refiner."""
    port = free_port()
    app = serve(str(SHIPPED_DIT), str(SHIPPED_VAR), port=port, block=False, refiner=str(SHIPPED_VAR))
    tab = browser.new_page(viewport={"width": 1280, "height": 1300})
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(f"http://127.0.0.1:{port}/")
    tab.wait_for_selector("#generate")
    yield tab
    tab.close()
    app.close()


def shown_image(page, selector: str) -> np.ndarray:
    """The image a Gradio image component shows, fetched as the browser got it."""
    source = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("L"))


def set_number(page, selector: str, value: int | str) -> None:
    field = page.locator(f"{selector} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def shown_number(page, selector: str) -> float:
    return float(page.locator(f"{selector} input[type=number]").first.input_value())


def wait_for_message(page, selector: str, text: str) -> None:
    page.wait_for_function(f"document.querySelector({selector!r}).innerText.includes({text!r})")


@pytest.mark.browser
def test_each_model_starts_at_its_own_guidance_and_top_p_as_the_command_line(page):
    assert shown_number(page, "#dit-cfg") == SHIPPED_DIT_CFG and shown_number(page, "#var-cfg") == SHIPPED_VAR_CFG
    assert SHIPPED_DIT_CFG != SHIPPED_VAR_CFG and shown_number(page, "#top-p") == SHIPPED_VAR_TOP_P
    assert not page.locator("#download").is_visible()  # no empty download box before there is a file


@pytest.mark.browser
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
        assert grid.shape[0] == 2 * SIDE and grid.shape[1] > 3 * SIDE  # two rows of three, their names on the left
        assert grid[:, -3 * SIDE:].std() > 20 and grid[:, :-3 * SIDE].max() > 128  # not blank; the names written
    assert page.locator("#download").is_visible()
    assert shown_image(page, "#var-strip").shape == (SIDE, 10 * SIDE)  # one frame per scale
    assert shown_image(page, "#dit-strip").shape == (SIDE, 8 * SIDE)  # x̂₀ at eight steps
    figures = page.locator("#sample-info").inner_text()
    assert "DiT" in figures and "VAR" in figures and "GFLOPs/image" in figures and "network calls/image" in figures
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "web_sample.png"))


@pytest.mark.browser
def test_unlabelled_rows_and_bad_settings_are_one_line_messages_without_a_traceback(page, capfd):
    page.locator("#label-rows input").first.uncheck()
    page.locator("#model-choice").get_by_label("VAR", exact=True).check()
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sample-info').innerText.includes('VAR') && "
                           "!document.querySelector('#sample-info').innerText.includes('DiT')")
    page.wait_for_selector("#var-grid img")
    assert shown_image(page, "#var-grid").shape == (2 * SIDE, 3 * SIDE)  # two rows of three, no names
    for field, value, message in (("#top-k", -3, "top-k must be"), ("#seed", "1e30", "seed must be")):
        set_number(page, field, value)
        page.locator("#generate").click()
        wait_for_message(page, "#sample-info", message)
        set_number(page, field, 0)
        assert "Error" not in page.locator("#var-grid").inner_text()
        assert not page.locator("#download").is_visible()
    page.locator("#model-choice").get_by_label("both", exact=True).check()
    page.locator("#label-rows input").first.check()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.browser
def test_the_var_speed_ups_checked_are_named_in_the_figures(page):
    page.locator("#model-choice").get_by_label("VAR", exact=True).check()
    for checkbox in ("#var-prune", "#var-refine"):
        page.locator(f"{checkbox} input").first.check()
    page.locator("#generate").click()
    wait_for_message(page, "#sample-info", "(pruned, refined by a depth-")
    for checkbox in ("#var-prune", "#var-refine"):
        page.locator(f"{checkbox} input").first.uncheck()
    page.locator("#model-choice").get_by_label("both", exact=True).check()


@pytest.mark.browser
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


@pytest.mark.browser
def test_a_file_that_is_not_an_image_and_a_huge_seed_are_messages_in_edit(page, capfd):
    set_number(page, "#edit-seed", "1e30")
    page.locator("#edit").click()
    wait_for_message(page, "#edit-info", "seed must be")
    set_number(page, "#edit-seed", 0)
    page.locator("#edit-input input[type=file]").set_input_files(
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"a text file, not a PNG"}])
    page.locator("#edit").click()
    wait_for_message(page, "#edit-info", "notes.png is not an image")
    assert "Error" not in page.locator("#edit-result").inner_text()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.browser
def test_a_model_path_outside_the_model_folders_is_refused_and_one_that_does_not_load_is_a_message(page):
    page.get_by_text("Models").first.click()
    dit_path = page.locator("#dit-path textarea, #dit-path input").first
    shipped = SHIPPED_DIT.parent  # the shipped models' folder: the one this page may load from
    for path in ("/etc", f"{shipped}/../.."):
        dit_path.fill(path)
        page.locator("#load").click()
        wait_for_message(page, "#load-message", f"{path} is outside the folders this page loads models from")
    dit_path.fill(str(shipped / "no-such-run"))
    page.locator("#load").click()
    page.wait_for_function("document.querySelector('#load-message').innerText.includes('does not exist')")
    page.get_by_role("tab", name="Sample").click()
    page.locator("#generate").click()  # the loaded models still answer (no class picked: a message)
    page.wait_for_function("document.querySelector('#sample-info').innerText.length > 0")


@pytest.mark.browser
def test_the_shipped_one_step_dit_loads_at_its_own_settings_and_samples(page):
    """Last in this module: it changes the page's DiT (and puts the shipped one back)."""
    if not page.locator("#load-meanflow").is_visible():  # the Models section may be open from an earlier test
        page.get_by_text("Models").first.click()
    page.locator("#load-meanflow").click()
    page.wait_for_function("document.querySelector('#load-message').innerText.includes('loaded DiT')")
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '1'")
    assert shown_number(page, "#steps") == 1 and shown_number(page, "#dit-cfg") == 1.0
    page.get_by_role("tab", name="Sample").click()
    page.locator("#classes input").first.click()
    page.keyboard.type("Sneaker")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.locator("#generate").click()
    wait_for_message(page, "#sample-info", "1 network calls/image")
    page.locator("#dit-path textarea, #dit-path input").first.fill(str(SHIPPED_DIT))
    page.locator("#load").click()
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '50'")


@pytest.mark.browser
def test_with_a_login_a_wrong_password_is_refused_and_the_right_one_gets_in(browser):
    port = free_port()
    app = serve(None, None, port=port, block=False, auth=[("ann", "right")])  # no model: the login alone is tested
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{url}/config")  # the page's API, asked without logging in
        tab = browser.new_page()  # a page of its own: no cookie of the other page
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(url)
        for password in ("wrong", "right"):
            tab.locator("input[type=text]").first.fill("ann")
            tab.locator("input[type=password]").first.fill(password)
            tab.get_by_role("button", name="Login").click()
            if password == "wrong":
                tab.get_by_text("Incorrect Credentials").wait_for()
                assert tab.locator("#generate").count() == 0
        tab.wait_for_selector("#generate")  # the page itself
        tab.close()
    finally:
        app.close()


# The page's functions called directly: the VAR alone, two classes of two, fixed seed.
VAR_SETTINGS = dict(choice="VAR", classes=["Trouser", "Bag"], per_class=2, seed=0, dit_cfg=SHIPPED_DIT_CFG,
                    var_cfg=SHIPPED_VAR_CFG, sampler="euler", steps=10, top_k=0, top_p=SHIPPED_VAR_TOP_P,
                    flow_steps=10, flow_sampler="euler", label_rows=False)  # a flow head's: not the shipped VAR's


@pytest.fixture(scope="module")
def models() -> Models:
    """The shipped VAR, with itself loaded as its CoDe refiner."""
    models = Models()
    message = models.load(None, str(SHIPPED_VAR), refiner_path=str(SHIPPED_VAR))
    assert "VAR refiner: a depth-" in message
    return models


def sampled_var(models: Models, prune: bool = False, refine: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """The VAR's grid and strip as arrays, and the figures line."""
    _, grid, _, forming, figures, _ = sample(models, **VAR_SETTINGS, prune=prune, refine=refine)
    assert grid is not None, figures
    return np.asarray(grid), np.asarray(forming), figures


def gigaflops(figures: str) -> float:
    return float(re.search(r"([0-9.]+) GFLOPs/image", figures).group(1))


def test_pruning_reaches_the_var_and_the_figures_name_it(models):
    grid, _, figures = sampled_var(models)
    pruned_grid, _, pruned_figures = sampled_var(models, prune=True)
    assert pruned_grid.shape == grid.shape == (2 * SIDE, 2 * SIDE) and pruned_grid.std() > 20
    assert "(pruned)" in pruned_figures and "pruned" not in figures
    assert not np.array_equal(pruned_grid, grid)  # the same seed: pruning changed the tokens
    assert gigaflops(pruned_figures) < gigaflops(figures)  # counted apart, not the unpruned count cached


def test_the_refiner_checked_with_none_loaded_is_a_one_line_message(models, tmp_path):
    without_refiner = Models(var=models.var)
    dit_grid, var_grid, _, _, figures, _ = sample(without_refiner, **VAR_SETTINGS, prune=False, refine=True)
    assert dit_grid is var_grid is None
    assert figures.startswith(WARNING + "no VAR refiner is loaded") and "\n" not in figures
    picture = tmp_path / "picture.png"
    Image.new("L", (SIDE, SIDE), 128).save(picture)
    *shown, message = edit(without_refiner, {"path": str(picture)}, "8,8,24,24", "inpaint", "", 0, SHIPPED_VAR_CFG,
                           False, True)
    assert shown == [None, None, None] and message.startswith(WARNING + "no VAR refiner is loaded")
    assert load(Models(), "", "", str(SHIPPED_VAR))[0] == WARNING + "a VAR refiner needs a VAR: give the VAR path too"


def test_the_shipped_var_refining_its_own_drafts_gives_the_same_images(models, tmp_path):
    grid, forming, _ = sampled_var(models)
    refined_grid, refined_forming, figures = sampled_var(models, refine=True)
    refined_by = f"refined by a depth-{models.refiner.config.depth} VAR"
    assert f"({refined_by})" in figures
    assert np.array_equal(refined_grid, grid) and np.array_equal(refined_forming, forming)
    picture = tmp_path / "picture.png"
    Image.fromarray(grid[:SIDE, :SIDE]).save(picture)  # a sample of the grid
    edited = [edit(models, {"path": str(picture)}, "8,8,24,24", "inpaint", "Bag", 0, SHIPPED_VAR_CFG, False, refine)
              for refine in (False, True)]
    assert edited[0][3] == "inpainted the box 8,8,24,24" and edited[1][3] == f"{edited[0][3]} ({refined_by})"
    assert np.array_equal(np.asarray(edited[0][2]), np.asarray(edited[1][2]))
