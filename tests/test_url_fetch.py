"""A photo from a link: fetched from the public internet only, bounded in time and size, decoded like an upload.

Every server here listens on 127.0.0.1, which the test-only setting I2M_URL_ALLOW_LOOPBACK lets through; names
are mapped to addresses by a stub resolver, so no real DNS or outside traffic is involved.
"""

from __future__ import annotations

import datetime
import json
import re
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.errors import InputError, UserFacingError
from pipeline.images import LoadedImage
from pipeline.settings import Settings, SettingsError
from pipeline.url_fetch import (USER_AGENT, address_refusal, fetch_bytes, fetch_image, looks_like_url, parse_link,
                                refuse_remote_path)
from scripts.sample_images import encoded, photo, png_header_claiming

JPEG = encoded(photo(320, 240), "JPEG", quality=85)
STUB_DNS = {
    "photos.test": ["127.0.0.1"],
    "intranet.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "v6-loopback.test": ["::1"],
    "mapped-loopback.test": ["::ffff:127.0.0.1"],
    "cgnat.test": ["100.64.0.1"],
    "mixed.test": ["127.0.0.1", "10.0.0.1"],  # one bad address among good ones refuses the host
}


def stub_resolver(host: str) -> list[str]:
    if host not in STUB_DNS:
        raise OSError(f"stub DNS: no such host {host}")
    return STUB_DNS[host]


# -- a local web server with one route per hostile behaviour -------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        route = self.path.split("?")[0].strip("/").split("/")
        try:
            getattr(self, "route_" + route[0].replace("-", "_").replace(".", "_"))(*route[1:])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client hung up on purpose: that is what several tests check

    def send(self, status: int, body: bytes, content_type: str, **extra: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, **extra: str):
        self.send(302, b"", "text/plain", Location=location, **extra)

    def route_photo_jpg(self):
        self.send(200, JPEG, "image/jpeg")

    def route_mislabelled(self):
        self.send(200, JPEG, "application/octet-stream")

    def route_page_html(self):
        self.send(200, b"<!doctype html><html><body><img src=photo.jpg></body></html>", "text/html; charset=utf-8")

    def route_svg(self):
        self.send(200, b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml")

    def route_bomb_png(self):
        self.send(200, png_header_claiming(60_000, 60_000), "image/png")

    def route_missing(self):
        self.send(404, b"not here", "text/plain")

    def route_gzip(self):
        self.send(200, JPEG, "image/jpeg", Content_Encoding="gzip")

    def route_hops(self, n: str):
        left = int(n)
        self.redirect("/photo.jpg" if left == 0 else f"/hops/{left - 1}")

    def route_to(self):
        self.redirect(urllib.request.unquote(self.path.split("?", 1)[1]))

    def route_cookie(self):
        self.redirect("/photo.jpg", Set_Cookie="session=secret; Path=/")

    def drip(self, response: bytes):
        # A byte every 0.1 s for 5 s, then the rest at once: each read is quick, and a fetcher that only bounds
        # single reads would wait the 5 s out and succeed, which the tests would catch.
        for byte in response[:50]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)
        self.wfile.write(response[50:])

    def route_drip(self):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(JPEG)
        self.wfile.write(head)
        self.wfile.flush()
        self.drip(JPEG)

    def route_drip_headers(self):
        self.drip(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 60
                  + b"\r\nContent-Length: %d\r\n\r\n" % len(JPEG) + JPEG)

    def route_endless(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff" * 65536
        for _ in range(2000):  # 128 MB at most, far past any cap the tests set
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))

    def route_endless_close(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        block = JPEG + b"\x00" * 65536
        for _ in range(2000):
            self.wfile.write(block)
        self.close_connection = True

    def route_claims_small(self):
        # Says 1000 bytes, then pushes megabytes: the declared length must not open the door to the rest.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(JPEG)
        self.close_connection = True

    def route_claims_huge(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(JPEG)
        self.close_connection = True

    def route_claims_more(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(JPEG) * 2))
        self.end_headers()
        self.wfile.write(JPEG)
        self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[dict] = []
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.seen]


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_settings(port: int, **changes) -> Settings:
    values = {"url_allow_loopback": True, "url_allowed_ports": f"80,443,{port}", "url_total_timeout_s": 5.0,
              "url_connect_timeout_s": 2.0, "max_upload_mb": 1.0}
    values.update(changes)
    return Settings.from_env({}, **values)


@pytest.fixture(scope="module")
def settings(server):
    return make_settings(server.port)


def refusal(url: str, settings: Settings, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fetch_image(url, settings, resolver=stub_resolver, **kwargs)
    assert isinstance(info.value, UserFacingError)
    return str(info.value)


# -- what a good link gives --------------------------------------------------------------------------------------

def test_a_good_jpeg_is_fetched_and_decoded_like_an_upload(server, settings):
    loaded = fetch_image(f"http://photos.test:{server.port}/photo.jpg", settings, resolver=stub_resolver)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB" and loaded.original_size == (320, 240)


def test_the_request_keeps_the_name_sends_an_honest_agent_and_nothing_else(server, settings):
    server.seen.clear()
    fetch_image(f"http://photos.test:{server.port}/photo.jpg?size=large#top", settings, resolver=stub_resolver)
    (request,) = server.seen
    assert request["path"] == "/photo.jpg?size=large"
    headers = request["headers"]
    assert headers["host"] == f"photos.test:{server.port}"
    assert headers["user-agent"] == USER_AGENT
    assert not {"cookie", "authorization", "proxy-authorization", "referer"} & set(headers)


def test_the_content_type_is_only_a_hint(server, settings):
    loaded = fetch_image(f"http://photos.test:{server.port}/mislabelled", settings, resolver=stub_resolver)
    assert loaded.original_size == (320, 240)


def test_the_host_is_resolved_once_and_the_checked_address_is_the_one_used(server, settings):
    calls: list[str] = []

    def rebinding(host: str) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.1"]

    fetch_image(f"http://photos.test:{server.port}/photo.jpg", settings, resolver=rebinding)
    assert calls == ["photos.test"]


def test_a_scheme_less_link_is_taken_as_https(settings):
    assert str(parse_link("example.com/cat.jpg", settings)) == "https://example.com/cat.jpg"


def test_redirects_within_the_limit_are_followed_and_each_hop_checked(server, settings):
    server.seen.clear()
    loaded = fetch_image(f"http://photos.test:{server.port}/hops/2", settings, resolver=stub_resolver)
    assert loaded.original_size == (320, 240)
    assert server.paths() == ["/hops/2", "/hops/1", "/hops/0", "/photo.jpg"]


def test_a_redirect_chain_past_the_limit_is_refused(server, settings):
    server.seen.clear()
    assert "redirects more than 3 times" in refusal(f"http://photos.test:{server.port}/hops/3", settings)
    assert "/photo.jpg" not in server.paths()


def test_cookies_set_by_a_redirect_are_never_sent_back(server, settings):
    server.seen.clear()
    fetch_image(f"http://photos.test:{server.port}/cookie", settings, resolver=stub_resolver)
    assert server.paths() == ["/cookie", "/photo.jpg"]
    assert "cookie" not in server.seen[1]["headers"]


# -- where a link may not go -------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, reason", [
    ("http://intranet.test:{port}/photo.jpg", "private network"),
    ("http://metadata.test/latest/meta-data/", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.1.2.3/photo.jpg", "private network"),
    ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@photos.test:{port}/photo.jpg", "user name or password"),
    ("http://[not-an-ip]/x", "not a valid web address"),
    ("//intranet.test:{port}/photo.jpg", "private network"),
])
def test_a_redirect_to_a_forbidden_place_is_refused_before_any_request_there(server, settings, target, reason):
    server.seen.clear()
    location = target.format(port=server.port)
    message = refusal(f"http://photos.test:{server.port}/to?{urllib.request.quote(location)}", settings)
    assert reason in message
    assert server.paths() == [f"/to?{urllib.request.quote(location)}"]


@pytest.mark.parametrize("host, reason", [
    ("intranet.test", "that address is on a private network"),
    ("metadata.test", "link-local"),
    ("v6-loopback.test", "loopback"),
    ("mapped-loopback.test", "loopback"),
    ("cgnat.test", "private network"),
    ("mixed.test", "loopback|private network"),
])
@pytest.mark.parametrize("allow_loopback", [False, True])
def test_names_resolving_to_internal_addresses_are_refused(server, host, reason, allow_loopback):
    settings = make_settings(server.port, url_allow_loopback=allow_loopback)
    server.seen.clear()
    assert re.search(reason, refusal(f"http://{host}:{server.port}/photo.jpg", settings))
    assert server.seen == []


def test_loopback_is_refused_unless_the_test_switch_is_on(server):
    settings = make_settings(server.port, url_allow_loopback=False)
    assert Settings.from_env({}).url_allow_loopback is False
    for url in (f"http://photos.test:{server.port}/photo.jpg", f"http://127.0.0.1:{server.port}/photo.jpg"):
        assert "loopback" in refusal(url, settings)


@pytest.mark.parametrize("url", ["http://localhost/x.jpg", "http://2130706433/x.jpg", "http://0x7f000001/x.jpg",
                                 "http://127.1/x.jpg", "http://[::1]/x.jpg", "http://[::ffff:7f00:1]/x.jpg",
                                 "http://0.0.0.0/x.jpg"])
def test_disguised_loopback_addresses_are_refused_with_the_system_resolver(url):
    settings = Settings.from_env({})
    with pytest.raises(InputError, match="loopback|unspecified|private"):
        fetch_image(url, settings)


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "only http and https"),
    ("data:image/png;base64,iVBORw0KGgo=", "only http and https"),
    ("ftp://photos.test/x.jpg", "only http and https"),
    ("gopher://photos.test/x", "only http and https"),
    ("https://user:secret@photos.test/x.jpg", "user name or password"),
    ("https://user@photos.test/x.jpg", "user name or password"),
    ("http://photos.test:8080/x.jpg", "port 8080 is not allowed"),
    ("http://photos.test:22/x.jpg", "port 22 is not allowed"),
    ("https://", "no host name"),
])
def test_links_of_the_wrong_form_are_refused_before_any_lookup(url, reason):
    def no_dns(host):
        raise AssertionError(f"looked up {host}")

    with pytest.raises(InputError, match=reason):
        fetch_image(url, Settings.from_env({}), resolver=no_dns)


def test_the_port_setting_is_validated():
    assert Settings.from_env({}).url_ports == {80, 443}
    assert Settings.from_env({"I2M_URL_PORTS": " 443, 8443 "}).url_ports == {443, 8443}
    for bad in ("80,x", "0", "70000", ","):
        with pytest.raises(SettingsError, match="I2M_URL_PORTS"):
            Settings.from_env({"I2M_URL_PORTS": bad})


def test_an_allowed_extra_port_is_honoured(server, settings):
    assert parse_link(f"http://photos.test:{server.port}/x", settings).port == server.port
    with pytest.raises(InputError, match="not allowed"):
        parse_link(f"http://photos.test:{server.port}/x", Settings.from_env({}))


@pytest.mark.parametrize("address, refused", [
    ("8.8.8.8", False), ("2606:4700:4700::1111", False), ("93.184.215.14", False),
    ("127.0.0.1", True), ("127.0.0.2", True), ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("100.127.255.254", True), ("224.0.0.1", True),
    ("0.0.0.0", True), ("240.0.0.1", True), ("255.255.255.255", True),
    ("::1", True), ("::", True), ("fe80::1", True), ("fc00::1", True), ("fd12:3456::1", True), ("ff02::1", True),
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("::ffff:8.8.8.8", False), ("::127.0.0.1", True), ("64:ff9b::a00:1", True), ("64:ff9b::808:808", False),
    ("2002:7f00:1::", True), ("2002:a9fe:a9fe::", True), ("2002:808:808::", False),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),  # Teredo, client 127.0.0.1
    ("not-an-address", True),
])
def test_address_classification(address, refused):
    assert (address_refusal(address) is not None) == refused


def test_the_loopback_switch_lets_only_127_0_0_1_through():
    assert address_refusal("127.0.0.1", allow_loopback=True) is None
    for address in ("127.0.0.2", "::1", "::ffff:127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1"):
        assert address_refusal(address, allow_loopback=True) is not None, address


# -- what comes back ---------------------------------------------------------------------------------------------

def test_an_html_page_is_not_an_image(server, settings):
    message = refusal(f"http://photos.test:{server.port}/page.html", settings)
    assert "the page is not an image" in message and "text/html" in message


def test_svg_and_missing_pages_and_compressed_bodies_are_refused(server, settings):
    assert "SVG" in refusal(f"http://photos.test:{server.port}/svg", settings)
    assert "404 Not Found" in refusal(f"http://photos.test:{server.port}/missing", settings)
    assert "compressed (gzip)" in refusal(f"http://photos.test:{server.port}/gzip", settings)


def test_a_decompression_bomb_is_refused_before_decoding(server, settings):
    assert "too many pixels" in refusal(f"http://photos.test:{server.port}/bomb.png", settings)


def test_a_slow_drip_is_cut_by_the_total_timeout(server):
    settings = make_settings(server.port, url_total_timeout_s=1.0)
    message = refusal(f"http://photos.test:{server.port}/drip", settings)
    assert "did not send the whole photo in 1 s" in message


def test_headers_dripped_a_byte_at_a_time_are_cut_by_the_total_timeout(server):
    settings = make_settings(server.port, url_total_timeout_s=1.0)
    assert "did not answer in 1 s" in refusal(f"http://photos.test:{server.port}/drip-headers", settings)


@pytest.mark.parametrize("route", ["endless", "endless-close", "claims-huge"])
def test_a_body_past_the_byte_cap_is_refused(server, settings, route):
    message = refusal(f"http://photos.test:{server.port}/{route}", settings)
    assert "the image is larger than 1 MB" in message


def test_fetch_bytes_never_holds_more_than_the_cap(server, settings):
    with pytest.raises(InputError, match="larger than"):
        fetch_bytes(f"http://photos.test:{server.port}/endless", settings, resolver=stub_resolver)
    body = fetch_bytes(f"http://photos.test:{server.port}/claims-small", settings, resolver=stub_resolver)
    assert len(body.data) == 1000  # framing follows the declared length; the pushed megabytes are never read


def test_a_lying_content_length_is_not_trusted(server, settings):
    # Declares less than it sends: only the declared bytes are read, and they are not a whole picture.
    assert "could not be decoded" in refusal(f"http://photos.test:{server.port}/claims-small", settings)
    # Declares more than it sends, then hangs up.
    assert "closed before the whole photo arrived" in refusal(f"http://photos.test:{server.port}/claims-more",
                                                              settings)


def test_an_unknown_host_gives_a_clear_message(server, settings):
    assert "could not be found" in refusal(f"http://nowhere.test:{server.port}/x.jpg", settings)


def test_a_closed_port_gives_a_clear_message(server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        assert "could not connect" in refusal(f"http://photos.test:{port}/x.jpg", make_settings(port))


# -- HTTPS: the connection goes to the checked address, the name stays for SNI and the certificate --------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "photos.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("photos.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni_seen: list[str | None] = []
    server_context.sni_callback = lambda sock, server_name, ctx: sni_seen.append(server_name)
    srv = Server(tls=server_context)
    srv.sni_seen = sni_seen
    srv.client_context = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    yield srv
    srv.shutdown()
    srv.server_close()


def test_https_connects_to_the_checked_address_with_the_original_sni_and_host(tls_server):
    settings = make_settings(tls_server.port)
    tls_server.seen.clear()
    loaded = fetch_image(f"https://photos.test:{tls_server.port}/photo.jpg", settings, resolver=stub_resolver,
                         ssl_context=tls_server.client_context)
    assert loaded.original_size == (320, 240)
    assert "photos.test" in tls_server.sni_seen
    assert tls_server.seen[-1]["headers"]["host"] == f"photos.test:{tls_server.port}"


def test_https_certificate_must_match_the_name_in_the_link(tls_server):
    STUB_DNS["impostor.test"] = ["127.0.0.1"]
    try:
        message = refusal(f"https://impostor.test:{tls_server.port}/photo.jpg", make_settings(tls_server.port),
                          ssl_context=tls_server.client_context)
    finally:
        del STUB_DNS["impostor.test"]
    assert "certificate" in message


# -- Gradio's own download of FileData links -----------------------------------------------------------------------

@pytest.mark.parametrize("path, is_link", [
    ("https://example.com/x.jpg", True), ("http://127.0.0.1:7860/x.jpg", True), ("HTTPS://EXAMPLE.COM/x", True),
    ("  http://example.com", True), ("file:///etc/passwd", True), ("data:image/png;base64,AAAA", True),
    ("/tmp/gradio/abc/photo.jpg", False), ("/home/u/.cache/x.png", False), (None, False), (42, False),
])
def test_link_like_file_paths_are_recognised(path, is_link):
    assert looks_like_url(path) == is_link
    if is_link:
        with pytest.raises(InputError, match="image_url"):
            refuse_remote_path(path)
    else:
        refuse_remote_path(path)


def test_gradio_never_downloads_a_filedata_link_when_the_component_refuses_it(server):
    """The hook the app's image component uses, exercised through Gradio's raw HTTP API: Gradio would download an
    http(s) FileData path in `Block.async_move_resource_to_block_cache`, before preprocess; overriding it is the
    earliest point the app controls."""
    import gradio as gr

    from tests.conftest import free_port

    class LinkRefusingImage(gr.Image):
        is_template = True

        async def async_move_resource_to_block_cache(self, url_or_file_path):
            try:
                refuse_remote_path(url_or_file_path)
            except InputError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            return await super().async_move_resource_to_block_cache(url_or_file_path)

    with gr.Blocks() as demo:
        image = LinkRefusingImage(type="filepath")
        out = gr.Textbox()
        gr.Button().click(lambda path: f"got {path}", image, out, api_name="echo")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        base = f"http://127.0.0.1:{port}/gradio_api/call/echo"
        payload = {"data": [{"path": f"http://127.0.0.1:{server.port}/photo.jpg",
                             "meta": {"_type": "gradio.FileData"}}]}
        server.seen.clear()
        request = urllib.request.Request(base, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            event_id = json.loads(response.read())["event_id"]
        with urllib.request.urlopen(f"{base}/{event_id}", timeout=30) as response:
            events = response.read().decode()
        assert "event: error" in events and "image_url" in events, events
        assert server.seen == []
    finally:
        demo.close()
