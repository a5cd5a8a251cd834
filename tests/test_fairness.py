"""One visitor must not be able to take the Space from everyone: the fair line in front of the music engine."""

import threading
import time

import pytest
import soundfile as sf
from gradio_client import Client

from pipeline.fairness import ClientBusy, FairGate


def test_a_client_holds_at_most_its_share_of_places():
    gate = FairGate(capacity=1, per_client=2)
    first, second = gate.enter("a"), gate.enter("a")
    with pytest.raises(ClientBusy, match="already have 2 music requests"):
        gate.enter("a")
    other = gate.enter("b")  # another client is not affected
    assert first.wait(0) and not second.wait(0) and not other.wait(0)
    gate.leave(first)
    assert gate.enter("a").client == "a"  # a place freed is a place again
    gate.leave(other)
    gate.leave(second)


def test_clients_take_turns():
    gate = FairGate(capacity=1, per_client=3)
    a1, a2, a3 = gate.enter("a"), gate.enter("a"), gate.enter("a")
    b1 = gate.enter("b")  # came last, but "a" was just served
    assert a1.position == 0 and b1.position == 1 and a2.position == 2 and a3.position == 3
    gate.leave(a1)
    assert b1.wait(0) and not a2.wait(0)
    c1 = gate.enter("c")
    gate.leave(b1)
    assert c1.wait(0), "a client never served goes before one served before"
    gate.leave(c1)
    assert a2.wait(0)
    for t in (a2, a3):
        gate.leave(t)
    assert gate.counts == {"running": 0, "waiting": 0}


def test_a_ticket_left_while_waiting_frees_its_place_and_wakes_nobody_wrongly():
    gate = FairGate(capacity=1, per_client=1)
    running, waiting = gate.enter("a"), gate.enter("b")
    with waiting:
        pass  # the visitor went away before its turn
    later = gate.enter("c")
    gate.leave(running)
    assert later.wait(0) and gate.counts == {"running": 1, "waiting": 0}


@pytest.fixture(scope="module")
def fair_app(settings, tmp_path_factory):
    import app as app_module
    from tests.conftest import free_port

    small = settings.replace(max_batch=1, client_max_jobs=2, cache_dir=str(tmp_path_factory.mktemp("c")))
    demo = app_module.build_app(small)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app_module.launch_options(small))
    from pipeline.core import get_pipeline

    pipe = get_pipeline(small)
    assert pipe.wait_until_ready(300)
    yield f"http://127.0.0.1:{port}/", pipe
    demo.close()


def _wait_until(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_through_the_api_a_third_request_is_refused_and_others_keep_their_turn(fair_app):
    url, pipe = fair_app
    greedy = Client(url, verbose=False, headers={"X-Forwarded-For": "198.51.100.7"})
    polite = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.9"})
    jobs = [greedy.submit("long drone", 12.0, i, api_name="/generate") for i in range(2)]
    assert _wait_until(lambda: pipe.music_line["running"] + pipe.music_line["waiting"] == 2)
    with pytest.raises(Exception, match="already have 2 music requests"):
        greedy.predict("one more", 1.0, 9, api_name="/generate")
    path = polite.predict("short tune", 1.0, 5, api_name="/generate")  # waits for one clip, not two
    assert abs(sf.info(path).duration - 1.0) < 0.05
    for i, job in enumerate(jobs):
        assert abs(sf.info(job.result(timeout=300)).duration - 12.0) < 0.05, i  # each accepted job got its clip


def test_a_caller_that_goes_away_loses_its_place_and_its_compute(fair_app):
    url, pipe = fair_app
    client = Client(url, verbose=False, headers={"X-Forwarded-For": "192.0.2.44"})
    job = client.submit("endless drone", 30.0, 3, api_name="/generate")
    assert _wait_until(lambda: pipe.music_line["running"] == 1)
    job.cancel()
    client.close()
    assert _wait_until(lambda: pipe.music_line == {"running": 0, "waiting": 0}), pipe.music_line
    assert not job.done() or job.status().code.name in ("CANCELLED", "FINISHED")
    after = threading.Event()

    def other():
        Client(url, verbose=False).predict("next visitor", 1.0, 1, api_name="/generate")
        after.set()

    threading.Thread(target=other, daemon=True).start()
    assert after.wait(120), "the next visitor is served"


class _Req:
    def __init__(self, forwarded=None, peer="10.0.0.9"):
        self.headers = {"x-forwarded-for": forwarded} if forwarded else {}
        self.client = type("Peer", (), {"host": peer})()


@pytest.mark.parametrize("forwarded, proxies, expected", [
    (None, 1, "10.0.0.9"),                                  # no proxy header: the socket's peer
    ("203.0.113.9", 1, "203.0.113.9"),                      # one proxy (a Space)
    ("6.6.6.6, 203.0.113.9", 1, "203.0.113.9"),             # the client forged a hop: the proxy's entry wins
    ("6.6.6.6, 203.0.113.9, 198.51.100.1", 2, "203.0.113.9"),  # two proxies: the outermost's entry
    ("203.0.113.9", 3, "203.0.113.9"),                      # fewer hops than proxies: the leftmost
    ("6.6.6.6", 0, "10.0.0.9"),                             # no trusted proxy: the header is ignored
])
def test_the_client_is_the_address_a_trusted_proxy_saw(forwarded, proxies, expected):
    import app as app_module

    assert app_module.client_id(_Req(forwarded), proxies) == expected


def test_a_place_nobody_touches_is_reclaimed_and_its_holder_told():
    gate = FairGate(capacity=1, per_client=1, lease_s=0.05)
    held, waiting = gate.enter("a"), gate.enter("b")
    time.sleep(0.1)
    waiting.touch()  # b still polls; a's holder was suspended and never closed
    assert gate.counts == {"running": 1, "waiting": 0}
    assert held.expired and not waiting.expired and waiting.wait(0)
    gate.leave(held)  # a late exit is harmless
    assert gate.counts == {"running": 1, "waiting": 0}


def test_a_waiting_request_is_told_what_is_ahead_and_about_how_long_it_waits():
    gate = FairGate(capacity=1, per_client=2)
    running, first, second = gate.enter("a", 60.0), gate.enter("b", 30.0), gate.enter("c", 10.0)
    place = first.line()
    assert (place.position, place.running, place.waiting_ahead, place.ahead) == (1, 1, 0, 1)
    assert place.wait_s is None and "1 request ahead of yours (1 being made, 0 waiting)" in place.text()
    running.started -= 10.0  # made 20 s of its 60 s in 10 s: 2 s of music a second, 20 s to go
    running.touch(made=20.0)
    assert first.line().wait_s == pytest.approx(20.0, abs=0.5)
    place = second.line()  # then the 30 s ahead of it: 15 s more
    assert (place.ahead, place.wait_s) == (2, pytest.approx(35.0, abs=0.5))
    assert "2 requests ahead of yours (1 being made, 1 waiting); expected wait about 35 s." in place.text()
    assert running.line().ahead == 0
    endless = gate.enter("b")  # endless: it is told its wait, those after it cannot be
    after = gate.enter("d")
    assert endless.line().wait_s == pytest.approx(35.0 + 5.0, abs=0.5) and after.line().wait_s is None
    assert "expected wait shows once" in after.line().text()
    for t in (running, first, second, endless, after):
        gate.leave(t)


def test_the_page_says_what_is_ahead_in_the_line_and_the_expected_wait(fair_app):
    url, pipe = fair_app
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            pages = []
            for i in range(2):
                context = browser.new_context(extra_http_headers={"X-Forwarded-For": f"203.0.113.{20 + i}"})
                page = context.new_page()
                page.goto(url)
                page.locator("#prompt textarea").fill(f"slow drone {i}")
                duration = page.locator("#duration input[type=number]")
                duration.fill("300")
                duration.press("Enter")
                pages.append(page)
            pages[0].click("#generate-btn")
            assert _wait_until(lambda: pipe.music_line["running"] == 1)
            pages[1].click("#generate-btn")
            status = pages[1].locator("#generate-status")
            status.filter(has_text="expected wait about").wait_for(timeout=30000)
            assert "1 request ahead of yours (1 being made, 0 waiting)" in status.inner_text()
            for page in pages:
                page.click("#stop-btn")
            assert _wait_until(lambda: pipe.music_line == {"running": 0, "waiting": 0})
        finally:
            browser.close()
