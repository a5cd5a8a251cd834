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
