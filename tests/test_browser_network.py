"""The browser tests' own network namespace (tests/helpers/browser_network.py): while interfaces come and go
on the host as sandboxes start and stop, a Chromium on the host's network loses requests in flight
(ERR_NETWORK_CHANGED) and the tests' Chromium, in its namespace, loses none and still reaches the host's
loopback on any port."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers.browser import chromium

# Forty requests at once, ten times over; each answer waits 50 ms, so requests queue for connections.
PARALLEL_FETCHES = """async (url) => {
    let failed = 0;
    for (let round = 0; round < 10; round++) {
        const requests = [];
        for (let i = 0; i < 40; i++) requests.push(fetch(`${url}?${round}-${i}`).catch(() => { failed++; }));
        await Promise.all(requests);
    }
    return failed;
}"""


class SlowAnswers(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.05)
        body = b"answer"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowAnswers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def host_interface_churn() -> Iterator[None]:
    """A veth pair to a namespace, with an address on the host's end, made and removed over and over, as
    a sandbox's network slot is."""
    stop = threading.Event()
    script = ("ip netns add ctest-churn && "
              "ip link add ctestchurn0 type veth peer name ctestchurn1 netns ctest-churn && "
              "ip addr add 10.255.77.1/30 dev ctestchurn0 && ip link set ctestchurn0 up && "
              "ip -n ctest-churn link set ctestchurn1 up; sleep 0.3; "
              "ip netns del ctest-churn; ip link del ctestchurn0 2>/dev/null; true")

    def churn() -> None:
        while not stop.is_set():
            subprocess.run(["sh", "-c", script], capture_output=True)
            stop.wait(0.1)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        subprocess.run(["sh", "-c", "ip netns del ctest-churn; ip link del ctestchurn0"], capture_output=True)


def failed_fetches(browser, url: str) -> int:
    page = browser.new_page()
    try:
        page.goto(url)
        return page.evaluate(PARALLEL_FETCHES, url)
    finally:
        page.close()


def test_the_tests_chromium_loses_no_request_while_host_interfaces_change(site):
    with host_interface_churn():
        # The churn is what breaks a browser on the host's network (else this test would prove nothing).
        with chromium(own_network=False) as exposed:
            lost_on_the_host = failed_fetches(exposed, site)
        if lost_on_the_host == 0:
            reason = "this Chromium lost no request on the host's network under the churn either"
            print(f"\nskipped: {reason}")
            pytest.skip(reason)
        with chromium() as isolated:
            lost_in_its_namespace = failed_fetches(isolated, site)
    assert lost_in_its_namespace == 0, (f"lost {lost_in_its_namespace} of 400 requests in its namespace "
                                        f"({lost_on_the_host} on the host's network)")


def test_the_tests_chromium_reaches_any_loopback_port_and_sees_a_closed_one_refused(site):
    with chromium() as browser:
        page = browser.new_page()
        page.goto(site)
        assert page.inner_text("body") == "answer"
        closed = page.evaluate("""async () => {
            try { await fetch('http://127.0.0.1:1/'); return 'answered'; } catch (e) { return e.name; }
        }""")
    assert closed == "TypeError"  # fetch's network error
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"ctest-browser-{os.getpid()}-" not in leftovers  # this process's (the other worker has its own)
