"""One real browser: Debian's chromium, headless, driven by Playwright, opens the ComfyUI frontend
served by the test server, loads each example_workflows/*.json through the page (as a user dropping
the file on the canvas), queues it, and checks that no node is missing, that the saved image is the
library's result for the same input and VAE, that the output reaches the page, and that the shipped
API-format twin (example_workflows/api/) is what the frontend itself makes of the example. The argmax
round trip then runs on a photograph (the demo photo, uploaded with the node's own button).

KLVAE_REGENERATE=1 rewrites what these runs produce: the API twins, the examples' thumbnails
(example_workflows/*.jpg) and the README's screenshot (docs/comfyui_<example>.png)."""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from klvae.vae import DEMO_PHOTO
from comfy_host import close, error_of, example_reference

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
REGENERATE = bool(os.environ.get("KLVAE_REGENERATE"))
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
        pg.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # "Introducing Nodes 2.0", seen
        pg.goto(comfy.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield pg
        browser.close()


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} == {"klvae_argmax_roundtrip", "klvae_exact_tiled_2048", "klvae_vae_in_core_nodes",
                                          "klvae_flux2_with_core_nodes", "klvae_wan_clip_exact"}


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
    page.keyboard.press("Escape")
    graph_shot = tmp_path / f"{path.stem}_graph.png"
    page.screenshot(path=str(graph_shot))
    # the API-format twin that ships is what the frontend makes of this example
    api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    twin = ROOT / "example_workflows" / "api" / path.name
    if REGENERATE:
        twin.parent.mkdir(exist_ok=True)
        twin.write_text(json.dumps(api, indent=1) + "\n")
    assert json.loads(twin.read_text()) == api, f"{twin} is stale: run the browser test with KLVAE_REGENERATE=1"
    if path.stem == "klvae_argmax_roundtrip":  # a user's own photograph, picked with the node's upload button
        load = next(n["id"] for n in wf["nodes"] if n["type"] == "LoadImage")
        with page.expect_file_chooser() as chooser:
            page.evaluate(f"() => window.app.graph.getNodeById({load}).widgets.find(w => w.name === 'upload').callback()")
        chooser.value.set_files(str(DEMO_PHOTO))
        page.wait_for_function(f"""() => {{ const n = window.app.graph.getNodeById({load});
            return n.widgets[0].value === '{DEMO_PHOTO.name}' && (n.imgs || []).length > 0 }}""", timeout=60_000)
        api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        assert api[str(load)]["inputs"]["image"] == DEMO_PHOTO.name
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
    images = comfy.images(entry, str(save))  # a clip's frames, or one image
    img = images[0]
    close(np.stack(images) if len(images) > 1 else img, example_reference(comfy, api))  # the library's own result
    # ... and the page received it (the websocket 'executed' message fills the node's preview)
    page.wait_for_function(f"() => (window.app.graph.getNodeById({save}).imgs || []).length > 0", timeout=60_000)
    assert not page.errors, page.errors
    shot = tmp_path / f"{path.stem}.png"
    page.keyboard.press("Escape")
    page.screenshot(path=str(shot))
    if REGENERATE:  # how the examples' thumbnails and the README's screenshots were made
        if "flux2" in path.stem or "wan" in path.stem:  # the tests' weights are seeded noise: show the graph
            thumb = Image.open(graph_shot).convert("RGB").crop((60, 40, 1000, 700))
        else:
            thumb = Image.fromarray(img)
        thumb.thumbnail((512, 512), Image.LANCZOS)
        thumb.save(path.with_suffix(".jpg"), quality=88)
        if path.stem == "klvae_argmax_roundtrip":  # the README's picture
            shutil.copy(shot, ROOT / "docs" / f"comfyui_{path.stem}.png")
