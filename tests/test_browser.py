"""One real browser: Debian's chromium, headless, driven by Playwright, opens the ComfyUI frontend
served by the test server, loads each examples/*.json through the page (as a user dropping the
file on the canvas), queues it, and checks that no node is missing and the output image arrives."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_host import error_of

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
CHROMIUM = os.environ.get("KLVAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(comfy):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium not found: `make test` installs Debian's chromium (apt); these tests do not skip"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1300, "height": 760})
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        # A returning user's settings: no first-run template browser over the canvas.
        comfy.post("/settings", {"Comfy.TutorialCompleted": True})
        pg.goto(comfy.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield pg
        browser.close()


def test_examples_exist():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_queues_and_outputs(comfy, page, path, tmp_path):
    wf = json.loads(path.read_text())
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
    loaded = page.evaluate("""() => window.app.graph.nodes.map(n => ({id: n.id, type: n.type,
        registered: !!window.LiteGraph.registered_node_types[n.type]}))""")
    assert sorted(n["type"] for n in loaded) == sorted(n["type"] for n in wf["nodes"])
    missing = [n["type"] for n in loaded if not n["registered"]]
    assert not missing, f"frontend reports missing nodes {missing}"
    assert "missing" not in page.inner_text("body").lower(), "the page shows a missing-nodes warning"
    before = set(comfy.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1) }")
    save = next(n["id"] for n in wf["nodes"] if n["type"] == "SaveImage")
    t0, entry = time.time(), None
    while time.time() - t0 < 600:
        new = {k: v for k, v in comfy.get("/history").items() if k not in before}
        entry = next(iter(new.values()), None)
        if entry and entry["status"].get("status_str") in ("success", "error"):
            break
        time.sleep(0.5)
    assert entry is not None, "the page queued nothing"
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (img,) = comfy.images(entry, str(save))
    assert img.shape == (768, 768, 3) and img.std() > 5
    # ... and the page received it (the websocket 'executed' message fills the node's preview)
    page.wait_for_function(f"() => (window.app.graph.getNodeById({save}).imgs || []).length > 0", timeout=60_000)
    assert not page.errors, page.errors
    shot = tmp_path / f"{path.stem}.png"
    page.keyboard.press("Escape")
    page.screenshot(path=str(shot))
    if os.environ.get("KLVAE_SCREENSHOTS"):  # how docs/comfyui_*.png were made
        shutil.copy(shot, Path(os.environ["KLVAE_SCREENSHOTS"]) / f"comfyui_{path.stem}.png")
