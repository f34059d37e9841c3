"""The documentation holds together: links and pictures resolve, the README stays a front door, the
lists that name every family or every module name all of them. Fast, no network, no model run."""
import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "web" / "docs").glob("*.md")),
         ROOT / "models" / "MODEL_CARD.md"]
README_MAX_LINES = 400

# A name each family must be called by wherever the families are listed (any one of them will do).
# A family added to klvae.vae.FAMILIES fails test_every_family_has_a_name until it is named here.
NAMES = {
    "sd1": ("SD1.x", "Stable Diffusion 1.x"),
    "sdxl": ("SDXL",),
    "sd3": ("SD3", "Stable Diffusion 3"),
    "flux": ("Flux.1",),
    "flux2": ("Flux.2",),
    "qwenimage": ("Qwen-Image",),
    "wan22": ("Wan 2.2",),
    "qwenimage21": ("Qwen-Image 2.1",),
    "hunyuanimage": ("HunyuanImage-2.1",),
}

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def prose(path: Path):
    """(line number, line) outside fenced code blocks, inline code spans blanked."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield n, re.sub(r"`[^`]*`", "code", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for _, line in headings(path):
        base = slug(line)
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def headings(path: Path):
    """Headings outside fenced code, with their inline code kept (it is part of the anchor)."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6}\s", line):
            yield n, re.sub(r"^#{1,6}\s+|\s+#*\s*$", "", line)


def links(path: Path):
    for n, line in prose(path):
        for m in [*LINK.finditer(line), *IMG.finditer(line)]:
            yield n, m.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list:
    bad = []
    for n, target in links(path):
        if re.match(r"^(https?:|mailto:)", target, re.IGNORECASE):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading #{anchor} in {dest.name})")
    return bad


def test_the_pages_exist():
    for page in PAGES:
        assert page.exists(), page
    assert len(PAGES) > 8


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_picture_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_link_checker_sees_links_pictures_and_anchors(tmp_path):
    """The checker itself: a bad file, a bad picture, a bad anchor are caught; good ones pass."""
    (tmp_path / "other.md").write_text("# Other page\n## Files it loads\n```\n# not a heading\n```\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("# Page: one\n[ok](other.md#files-it-loads) ![ok](pic.png) [ok](#page-one) <img src=\"pic.png\">\n"
                    "[bad](missing.md) ![bad](nope.png) [bad](other.md#not-a-heading) [bad](#nowhere)\n"
                    "<img src='gone.png'> `[code](not-a-link.md)` [web](https://example.com/x)\n")
    bad = broken_links(page, root=tmp_path)
    assert [b.split(": ", 1)[1].split(" (")[0] for b in bad] == [
        "missing.md", "nope.png", "other.md#not-a-heading", "#nowhere", "gone.png"], bad


def test_github_anchors():
    assert slug("Qwen-Image and HunyuanImage-2.1") == "qwen-image-and-hunyuanimage-21"
    assert slug("Set-up: two commands") == "set-up-two-commands"
    assert slug("The untiled pass's GroupNorm (fixed: `vae/groupnorm.py`)") == \
        "the-untiled-passs-groupnorm-fixed-vaegroupnormpy"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    # tests/test_cli.py runs the README's first python block, the Quick start
    first = next(i for i, l in enumerate(lines) if l.startswith("```python"))
    heading = next(l for l in reversed(lines[:first]) if l.startswith("#"))
    assert heading.startswith("## Quick start"), f"the first python block is under {heading!r}, not the Quick start"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def families():
    from klvae.vae import FAMILIES
    return FAMILIES


def test_every_family_has_a_name():
    assert set(NAMES) == set(families()), "name each family of klvae.vae.FAMILIES in NAMES (tests/test_docs.py)"


def named(family: str, text: str) -> bool:
    return any(name in text for name in NAMES[family])


def test_the_readmes_families_table_lists_every_family():
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = line
    for family in families():
        assert family in rows, f"README.md's families table has no row for `{family}`"
        assert named(family, rows[family]), f"README.md's row for `{family}` names none of {NAMES[family]}"


@pytest.mark.parametrize("where", ["pyproject.toml description", "web/docs/KLVAELoader.md", "web/docs/KLVAEFromVAE.md",
                                   "vae/__init__.py docstring"])
def test_family_lists_name_every_family(where):
    if where == "pyproject.toml description":
        text = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    elif where == "vae/__init__.py docstring":
        text = vae_docstring()
    else:
        text = (ROOT / where).read_text(encoding="utf-8")
    missing = [f for f in families() if not named(f, text)]
    assert not missing, f"{where} does not name {[NAMES[f][0] for f in missing]}"


def vae_docstring() -> str:
    return ast.get_docstring(ast.parse((ROOT / "vae" / "__init__.py").read_text(encoding="utf-8")))


def modules_listed(text: str) -> list:
    """Module names in a module map: indented lines that start with `name.py`."""
    return re.findall(r"^\s+(\w+\.py)\s", text, re.MULTILINE)


def architecture_vae_block() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("\nvae/", 1)[1]
    return re.split(r"\n(?=\S)", block, maxsplit=1)[0]  # up to the next top-level entry


def test_every_vae_module_is_in_both_module_maps():
    files = sorted(p.name for p in (ROOT / "vae").glob("*.py") if p.name != "__init__.py")
    doc = modules_listed(vae_docstring())
    arch = modules_listed(architecture_vae_block())
    assert not set(files) - set(doc), f"vae/__init__.py's docstring misses {sorted(set(files) - set(doc))}"
    assert not set(doc) - set(files), f"vae/__init__.py's docstring lists modules that are gone: {sorted(set(doc) - set(files))}"
    assert not set(files) - set(arch), f"docs/architecture.md's vae/ layout misses {sorted(set(files) - set(arch))}"
    assert arch == doc, "docs/architecture.md lists vae/'s modules in another order than vae/__init__.py's docstring"


def tiling_table() -> dict:
    """docs/benchmarks.md's tiled-decode table: {(system, mode, tile px): psnr_vs_full text} for 1024 decodes."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8").split("<!-- BENCH-TILING -->", 1)[1]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 13 and cells[0] == "decode" and cells[1] == "1024":
            rows[(cells[2], cells[3], cells[4] or "0")] = cells[12]
        elif rows and not line.startswith("|"):
            break
    return rows


@pytest.mark.parametrize("picture", ["docs/heatmap_decode_1024.png", "web/docs/heatmap_decode_1024.png"])
def test_the_heat_maps_figures_are_the_tables(picture):
    """A shipped heat map carries the figures it draws (text chunks written by the benchmark run that
    printed the table); each must be the table's. The README's read 82.7 dB under a 121.3 dB table."""
    from PIL import Image
    text = Image.open(ROOT / picture).text
    drawn = {k.removeprefix("klvae.psnr_vs_full."): v for k, v in text.items() if k.startswith("klvae.psnr_vs_full.")}
    table = tiling_table()
    assert len(drawn) >= 4 and len(table) >= 6, (drawn, table)
    for key, value in drawn.items():
        system, mode, tile = key.split()
        assert table.get((system, mode, tile)) == value, (key, value, table)
    assert text["klvae.command"] in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_the_readmes_headline_figures_are_the_tables():
    """The README's short table quotes the benchmark table: every psnr_vs_full in it is one of its rows."""
    head = README.read_text(encoding="utf-8").split("## Against ComfyUI and diffusers", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"\*{0,2}(\d+\.\d) dB\*{0,2} \|", head)
    assert quoted and set(quoted) <= set(tiling_table().values()), (quoted, tiling_table())
