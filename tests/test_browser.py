"""The app in a real browser (Debian's Chromium driven by Playwright), in demo mode, fully offline.

Each flow uploads an example photo, analyzes it, checks the caption and the three song tables, generates a 2 s
clip, waits for the player and downloads a valid WAV; the same flow runs on a desktop window, on a 390×844 phone
screen and inside an iframe on a localhost page. Every request must stay on 127.0.0.1, and screenshots are
saved in tests/artifacts/.
"""

from __future__ import annotations

import http.server
import io
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import soundfile as sf

from tests.conftest import ROOT, ffprobe, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
EXAMPLE = ROOT / "assets" / "examples" / "coffee.jpg"
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def iframe_page(live_app):
    """A localhost page on another port that embeds the app, as a blog or docs site would."""
    html = (f"<!doctype html><html><head><title>Embed test</title></head><body><h1>My blog</h1>"
            f'<iframe id="space" src="{live_app}" style="width:100%;height:2600px;border:0" '
            'allow="autoplay; clipboard-write"></iframe></body></html>').encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{port}/"
    server.shutdown()


def _external_requests(urls: list[str]) -> list[str]:
    return [u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
            and urlparse(u).hostname not in ("127.0.0.1", "localhost")]


def run_flow(page, root, artifacts: Path, name: str) -> None:
    """root: the page or the iframe's frame locator, where the app lives."""
    root.locator("#image-input input[type=file]").set_input_files(str(EXAMPLE))
    root.locator("#analyze-btn").click()
    from playwright.sync_api import expect

    expect(root.locator("#caption textarea")).not_to_have_value("", timeout=TIMEOUT_MS)
    assert root.locator("#prompt textarea").input_value().strip()
    assert root.locator("#emotion").inner_text(timeout=TIMEOUT_MS).strip()
    for tab, table in (("By sound", "#songs-features"), ("By lyrics", "#songs-lyrics"),
                       ("Best of both", "#songs-fused")):
        root.get_by_role("tab", name=tab).click()
        # Gradio's dataframe is a virtual grid: data rows are role=row from aria-rowindex 2 on
        root.locator(f'{table} [role=row][aria-rowindex="2"]').first.wait_for(timeout=TIMEOUT_MS)
        assert root.locator(f"{table} [role=row]").count() >= 4, (name, table)
    page.screenshot(path=str(artifacts / f"{name}-analyzed.png"), full_page=True)

    duration = root.locator("#duration input[type=number]")
    duration.fill("2")
    duration.press("Enter")
    root.locator("#generate-btn").click()
    download = root.locator("#download-wav")
    download.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert root.locator("#audio-out audio, #audio-out [data-testid*=audio], #audio-out .waveform-container, "
                        "#audio-out button").count() > 0
    assert "Done" in root.locator("#generate-status").inner_text()
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        download.click()
    data = Path(info.value.path()).read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    audio, rate = sf.read(io.BytesIO(data))
    assert rate == 32000 and abs(len(audio) - 2 * rate) <= rate // 50
    page.screenshot(path=str(artifacts / f"{name}-generated.png"), full_page=True)


@pytest.mark.parametrize("name, viewport", [("desktop", {"width": 1280, "height": 900}),
                                            ("phone", {"width": 390, "height": 844})])
def test_full_flow(browser, live_app, artifacts_dir, name, viewport):
    context = browser.new_context(viewport=viewport, accept_downloads=True,
                                  is_mobile=name == "phone", has_touch=name == "phone")
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(live_app, wait_until="domcontentloaded")
    run_flow(page, page, artifacts_dir, name)
    if name == "phone":
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"] + 2, f"horizontal scroll on a phone: {width}px"
    assert not _external_requests(requests), _external_requests(requests)
    context.close()


def test_full_flow_inside_an_iframe(browser, iframe_page, artifacts_dir):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(iframe_page, wait_until="domcontentloaded")
    run_flow(page, page.frame_locator("#space"), artifacts_dir, "iframe")
    assert not _external_requests(requests), _external_requests(requests)
    context.close()


def test_demo_banner_limits_and_status_are_shown(browser, live_app):
    page = browser.new_page()
    page.goto(live_app, wait_until="domcontentloaded")
    assert "random-weight" in page.locator("#demo-banner").inner_text(timeout=TIMEOUT_MS)
    footer = page.locator("#status-footer")
    footer.get_by_text("music model").first.wait_for(timeout=TIMEOUT_MS)
    assert "song catalog" in footer.inner_text() and "ready" in footer.inner_text()
    page.close()


def test_clicking_an_example_photo_analyzes_it(browser, live_app):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(live_app, wait_until="domcontentloaded")
    page.locator("button.gallery-item:has(img[src*='grace_hopper'])").click(timeout=TIMEOUT_MS)
    expect(page.locator("#caption textarea")).not_to_have_value("", timeout=TIMEOUT_MS)
    page.locator('#songs-features [role=row][aria-rowindex="2"]').first.wait_for(timeout=TIMEOUT_MS)

    # a genre family chosen in Options re-runs the song lists: every song shown is of that family
    genre_cells = page.locator("#songs-features [role=row] [role=gridcell][aria-colindex='5']")
    page.get_by_text("Options").click()
    page.locator("#filter-genre input").click()
    page.get_by_role("option", name="latin", exact=True).click()
    expect(genre_cells.first).to_contain_text("latin", timeout=TIMEOUT_MS)
    texts = genre_cells.all_inner_texts()
    assert len(texts) >= 3 and all("latin" in text for text in texts), texts
    # latin songs released by 1951: next to none in the slice, and the note says so (a typed year counts once the
    # box loses focus, as a dragged slider once it is let go)
    year_to = page.locator("#filter-year-to input[type=number]")
    year_to.fill("1951")
    year_to.press("Tab")
    expect(page.locator("#analyze-notes")).to_contain_text("fewer than the 10", timeout=TIMEOUT_MS)
    page.close()


def test_stop_ends_a_generation_and_frees_its_place(browser, live_app, pipeline, artifacts_dir):
    import time

    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(live_app, wait_until="domcontentloaded")
    page.locator("#prompt textarea").fill("a long ambient drone")
    duration = page.locator("#duration input[type=number]")
    duration.fill("30")
    duration.press("Enter")
    page.locator("#generate-btn").click()
    expect(page.locator("#generate-status")).to_contain_text("🎶", timeout=TIMEOUT_MS)
    page.locator("#stop-btn").click()
    expect(page.locator("#generate-status")).to_contain_text("Stopped", timeout=TIMEOUT_MS)
    deadline = time.monotonic() + 60
    while pipeline.music_line["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pipeline.music_line == {"running": 0, "waiting": 0}
    assert not page.locator("#download-wav").is_visible()
    page.screenshot(path=str(artifacts_dir / "stopped.png"))
    page.close()


def test_endless_plays_for_a_minute_and_stops(browser, live_app, pipeline, artifacts_dir):
    """Endless mode streams past any clip length until Stop; the player keeps receiving audio for over a minute of
    wall-clock time, then Stop ends it and frees its place."""
    import re
    import time

    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(live_app, wait_until="domcontentloaded")
    page.locator("#prompt textarea").fill("an endless calm drone")
    page.locator("#endless input[type=checkbox]").check()
    page.locator("#generate-btn").click()
    status = page.locator("#generate-status")
    expect(status).to_contain_text("endless", timeout=TIMEOUT_MS)
    started = time.monotonic()
    made = []
    while time.monotonic() - started < 65:
        found = re.search(r"🎶 ([0-9.]+) s", status.inner_text())
        if found:
            made.append(float(found.group(1)))
        time.sleep(2)
    assert made and made == sorted(made) and made[-1] > 60, made[-5:]  # still growing after a minute
    page.screenshot(path=str(artifacts_dir / "endless.png"))
    page.locator("#stop-btn").click()
    expect(status).to_contain_text("Stopped", timeout=TIMEOUT_MS)
    deadline = time.monotonic() + 60
    while pipeline.music_line["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pipeline.music_line == {"running": 0, "waiting": 0}
    page.close()


# -- video & album -------------------------------------------------------------------------------------------------

def _open_media_tab(page, live_app, part: str) -> None:
    page.goto(live_app, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Video & album").click(timeout=TIMEOUT_MS)
    page.get_by_role("tab", name=part, exact=True).click(timeout=TIMEOUT_MS)


def _fits_the_window(page, width: int) -> None:
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width + 2, f"the page is {scroll}px wide in a {width}px window"


def _music_plays_before_the_video(page, prefix: str) -> None:
    """The music's player gets audio while the MP4 is still being made (no video in its player yet)."""
    page.wait_for_function(
        f"() => !!document.querySelector('#{prefix}-music audio') && "
        f"!document.querySelector('#{prefix}-video video')", timeout=TIMEOUT_MS)


def test_an_album_is_made_in_the_video_tab(browser, live_app, artifacts_dir):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _open_media_tab(page, live_app, "Album")
    photos = [str(ROOT / "assets" / "examples" / name) for name in ("cat.jpg", "rocket_launch.jpg")]
    page.locator("#album-files input[type=file]").set_input_files(photos)
    duration = page.locator("#album-duration input[type=number]")
    duration.fill("3")
    duration.press("Enter")
    assert page.locator("#album-music audio").count() == 0
    page.locator("#album-btn").click()
    _music_plays_before_the_video(page, "album")
    expect(page.locator("#album-status")).to_contain_text("✅", timeout=TIMEOUT_MS)
    video = page.locator("#album-video video")
    video.wait_for(timeout=TIMEOUT_MS)
    assert ".mp4" in (video.get_attribute("src") or "")
    page.locator('#album-parts [role=row][aria-rowindex="3"]').first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#album-download").is_visible()
    _fits_the_window(page, 1280)
    page.screenshot(path=str(artifacts_dir / "album.png"), full_page=True)
    page.locator("#media-tabs").screenshot(path=str(artifacts_dir / "video-tab-album.png"))
    page.close()


def test_a_clip_is_uploaded_scored_and_downloaded(browser, live_app, artifacts_dir, tmp_path):
    import subprocess

    from playwright.sync_api import expect

    clip = tmp_path / "my-clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y",
                    "-f", "lavfi", "-i", "smptebars=s=320x180:r=15:d=2.5",
                    "-f", "lavfi", "-i", "color=c=red:s=320x180:r=15:d=2.5",
                    "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]", "-map", "[v]", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(clip)],
                   check=True, capture_output=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    _open_media_tab(page, live_app, "Score a video")
    page.locator("#clip-in input[type=file]").set_input_files(str(clip))
    page.locator("#clip-in video").wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#clip-music audio").count() == 0
    page.locator("#clip-btn").click()
    _music_plays_before_the_video(page, "clip")
    expect(page.locator("#clip-status")).to_contain_text("✅", timeout=TIMEOUT_MS)
    page.locator("#clip-video video").wait_for(timeout=TIMEOUT_MS)
    # the cut at 2.5 s splits the music in two parts: one row each
    expect(page.locator("#clip-parts [role=row]")).to_have_count(3, timeout=TIMEOUT_MS)
    _fits_the_window(page, 1280)
    page.screenshot(path=str(artifacts_dir / "scored.png"), full_page=True)
    page.locator("#media-tabs").screenshot(path=str(artifacts_dir / "video-tab-scored.png"))
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#clip-download").click()
    saved = tmp_path / "scored.mp4"
    info.value.save_as(saved)
    facts = ffprobe(saved)
    kinds = sorted(s["codec_type"] for s in facts["streams"])
    assert kinds == ["audio", "video"] and abs(float(facts["format"]["duration"]) - 5.0) <= 0.1
    context.close()


def test_share_as_video_is_one_click_after_generate(browser, live_app, artifacts_dir, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.goto(live_app, wait_until="domcontentloaded")
    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLE))
    expect(page.locator("#prompt textarea")).not_to_have_value("", timeout=TIMEOUT_MS)
    duration = page.locator("#duration input[type=number]")
    duration.fill("2")
    duration.press("Enter")
    page.locator("#generate-btn").click()
    page.locator("#download-wav").wait_for(state="visible", timeout=TIMEOUT_MS)
    _says_below_and_is_above("#generate-status", "#download-wav", page)
    page.get_by_role("tab", name="Video & album").click()
    page.get_by_role("tab", name="Share as video", exact=True).click()
    page.locator("#share-square input[type=checkbox]").check()
    page.locator("#share-btn").click()
    expect(page.locator("#share-status")).to_contain_text("✅", timeout=TIMEOUT_MS)
    page.locator("#share-video video").wait_for(timeout=TIMEOUT_MS)
    _says_below_and_is_above("#share-status", "#share-download", page)
    page.screenshot(path=str(artifacts_dir / "share.png"), full_page=True)
    page.locator("#media-tabs").screenshot(path=str(artifacts_dir / "video-tab-share.png"))
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#share-download").click()
    saved = tmp_path / "share.mp4"
    info.value.save_as(saved)
    facts = ffprobe(saved)
    video = next(s for s in facts["streams"] if s["codec_type"] == "video")
    assert video["width"] == video["height"]  # square, as asked
    assert abs(float(facts["format"]["duration"]) - 2.0) <= 0.04 + 1e-6
    context.close()


def _says_below_and_is_above(status: str, download: str, page) -> None:
    """A "Done" status that says "Download … below" sits above its download button."""
    assert "below" in page.locator(status).inner_text()
    assert page.locator(status).bounding_box()["y"] < page.locator(download).bounding_box()["y"]


def _box_inside(locator, width: int) -> dict:
    box = locator.bounding_box()
    assert box is not None and box["width"] > 20, box  # rendered, with room for words
    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (box, width)
    return box


def test_why_is_on_screen_on_a_laptop_and_on_a_phone(browser, live_app, artifacts_dir):
    """At 1280 px every song column, Why included, sits inside the window without scrolling sideways; on a 390 px
    phone the compact layout shows song, artist and why, and hides rank, year, genre and score."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(live_app, wait_until="domcontentloaded")
    page.locator("#image-input input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#analyze-btn").click()
    expect(page.locator("#caption textarea")).not_to_have_value("", timeout=TIMEOUT_MS)
    for tab, table in (("By sound", "#songs-features"), ("By lyrics", "#songs-lyrics"),
                       ("Best of both", "#songs-fused")):
        page.get_by_role("tab", name=tab).click()
        first = page.locator(f'{table} [role=row][aria-rowindex="2"]').first
        first.wait_for(timeout=TIMEOUT_MS)
        cells = first.locator("[role=gridcell]")
        assert cells.count() == 7
        for i in range(7):
            _box_inside(cells.nth(i), 1280)
        why = cells.nth(6)
        assert why.inner_text().strip(), tab  # every song says why
        header = page.locator(f'{table} [role=columnheader][aria-colindex="7"]').first
        assert "Why" in header.inner_text()
        _box_inside(header, 1280)
    page.get_by_role("tab", name="Best of both").click()
    page.locator("#songs-fused").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir / "songs-1280.png"))

    page.set_viewport_size({"width": 390, "height": 844})
    row = page.locator('#songs-fused [role=row][aria-rowindex="2"]').first
    row.scroll_into_view_if_needed()
    cells = row.locator("[role=gridcell]")
    for shown in (1, 2, 6):
        _box_inside(cells.nth(shown), 390)
    for hidden in (0, 3, 4, 5):
        assert not cells.nth(hidden).is_visible()
    # a hidden column's text must not stand a letter a line in a 0-px cell, stretching every row
    heights = [box["height"] for box in (r.bounding_box() for r in
                                          page.locator("#songs-fused [role=row][aria-rowindex]").all()[1:6]) if box]
    assert heights and max(heights) < 260, heights
    page.screenshot(path=str(artifacts_dir / "songs-phone.png"))
    page.close()


def test_a_photo_from_a_link_is_fetched_and_analyzed_and_a_private_address_is_refused(browser, live_app,
                                                                                       photo_server, artifacts_dir):
    """The link field: Enter fetches a photo from an allowed address (a local server in the test app) and Analyze
    runs on it; a link to a private network gets a clear message and fetches nothing."""
    import re

    from playwright.sync_api import expect

    base, seen = photo_server
    seen.clear()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(live_app, wait_until="domcontentloaded")
    link = page.locator("#image-url textarea, #image-url input").first
    link.fill(f"{base}/holiday.jpg")
    link.press("Enter")
    expect(page.locator("#caption textarea")).not_to_have_value("", timeout=TIMEOUT_MS)
    assert seen == ["/holiday.jpg"]
    page.locator('#songs-features [role=row][aria-rowindex="2"]').first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(artifacts_dir / "photo-link.png"))

    link.fill("http://10.0.0.7/photo.jpg")
    page.locator("#image-url-btn").click()
    expect(page.get_by_text(re.compile("private network")).first).to_be_visible(timeout=TIMEOUT_MS)
    assert seen == ["/holiday.jpg"]
    page.close()


def test_dark_mode_banner_and_radar_are_readable(browser, live_app, artifacts_dir):
    """Dark mode: the demo banner's words stand out from its background and the radar chart has no white box;
    its top axes (dance, acoustic) are not hidden under its label."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    page.goto(live_app, wait_until="domcontentloaded")
    contrast = page.locator("#demo-banner p").first.evaluate("""(p) => {
        const rgb = (c) => c.match(/[0-9.]+/g).slice(0, 3).map(Number);
        const lum = (c) => { const [r, g, b] = rgb(c).map((v) => { v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const block = document.querySelector('#demo-banner');
        const [a, b] = [lum(getComputedStyle(p).color), lum(getComputedStyle(block).backgroundColor)];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }""")
    assert contrast >= 4.5, contrast
    page.locator("button.gallery-item:has(img[src*='grace_hopper'])").click(timeout=TIMEOUT_MS)
    expect(page.locator("#mood-radar text").filter(has_text="acoustic")).to_have_count(1, timeout=TIMEOUT_MS)
    background = page.locator("#mood-radar .main-svg").first.evaluate("(svg) => getComputedStyle(svg).backgroundColor")
    assert background in ("rgba(0, 0, 0, 0)", "transparent"), background
    label = page.locator("#mood-radar label").first.bounding_box()
    for name in ("dance", "acoustic", "energy"):
        box = page.locator("#mood-radar text").filter(has_text=name).first.bounding_box()
        assert box["y"] >= label["y"] + label["height"], (name, box, label)
    page.locator("#mood-radar").screenshot(path=str(artifacts_dir / "radar-dark.png"))
    page.close()


def test_phone_status_table_and_video_tabs_fit(browser, live_app):
    """On a 390 px phone the status table stays a table of words, not a column of single letters thousands of
    pixels tall, and Share as video, Album and Score a video are all in sight (none behind "More tabs")."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(live_app, wait_until="domcontentloaded")
    footer = page.locator("#status-footer")
    footer.get_by_text("music model").first.wait_for(timeout=TIMEOUT_MS)
    assert footer.bounding_box()["height"] < 1200, footer.bounding_box()
    page.get_by_role("tab", name="Video & album").click()
    expect(page.get_by_role("tab", name="Score a video", exact=True)).to_be_visible()
    page.close()
