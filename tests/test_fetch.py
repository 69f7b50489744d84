"""Safe fetching: address checks, manual redirects, retries with backoff, size and type limits."""

import socket
import time
from email.utils import formatdate

import pytest
import requests

from rating.sources.fetch import FetchError, FetchPolicy, check_url, get_image_bytes, get_json

pytest_plugins = ("tests.fake_civitai",)

ADVICE = "(allow private addresses in settings to fetch it)"


@pytest.fixture
def sleeps():
    """Return the list the injected `sleep` appends to, so no test really waits."""
    return []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/", f"refused: 127.0.0.1 is a loopback address {ADVICE}"),
        ("http://10.0.0.1/", "refused: 10.0.0.1 is a private address"),
        ("http://192.168.1.20:8080/x.png", "refused: 192.168.1.20 is a private address"),
        ("http://[::1]/", "refused: ::1 is a loopback address"),
        ("https://[fd00::5]/", "refused: fd00::5 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://0.0.0.0/", "refused: 0.0.0.0 is an unspecified address"),
        ("http://224.0.0.1/", "refused: 224.0.0.1 is a multicast address"),
        ("http://100.64.0.1/", "refused: 100.64.0.1 is a non-public address"),
        (
            "http://[::ffff:127.0.0.1]/",
            "::ffff:127.0.0.1 resolves to 127.0.0.1, which is a loopback",
        ),
        ("http://localhost:5000/", "refused: localhost resolves to "),
        ("file:///etc/passwd", "refused: file:///etc/passwd is not an http or https URL"),
        ("ftp://example.com/a.png", "refused: ftp://example.com/a.png is not an http or https URL"),
        ("http:///a.png", "refused: http:///a.png has no host"),
        ("http://[::1/", "is not a valid URL"),
        ("http://example.com:99999/", "is not a valid URL"),
    ],
)
def test_refuses_what_is_not_a_public_http_url(url, message):
    with pytest.raises(FetchError) as caught:
        check_url(url, FetchPolicy())
    assert message in str(caught.value)
    assert not caught.value.retryable


def test_a_host_is_refused_if_any_of_its_addresses_is_private(monkeypatch):
    answers = {"mixed.test": ["93.184.216.34", "10.1.2.3"], "public.test": ["93.184.216.34"]}

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    check_url("https://public.test/a.png", FetchPolicy())
    with pytest.raises(FetchError, match=r"mixed\.test resolves to 10\.1\.2\.3, which is a priv"):
        check_url("https://mixed.test/a.png", FetchPolicy())


def test_private_addresses_can_be_allowed_all_or_host_by_host():
    check_url("http://127.0.0.1/", FetchPolicy(allow_private=True))
    check_url("http://10.0.0.1:8080/", FetchPolicy(allowed_hosts={"10.0.0.1:8080"}))
    check_url("http://NAS.local/", FetchPolicy(allowed_hosts={"nas.LOCAL"}))  # any port
    check_url("http://[::1]:8080/", FetchPolicy(allowed_hosts={"[::1]:8080"}))
    check_url("https://intranet:8443/", FetchPolicy(allowed_hosts="intranet:8443"))
    with pytest.raises(FetchError, match="10.0.0.1 is a private address"):
        check_url("http://10.0.0.1:9090/", FetchPolicy(allowed_hosts={"10.0.0.1:8080"}))
    with pytest.raises(FetchError, match="not an http or https URL"):
        check_url("file:///etc/passwd", FetchPolicy(allow_private=True))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5099\\@127.0.0.1:5098/x.png",  # urllib3: :5099, urlsplit: :5098
        "http://127.0.0.1:5099\\@93.184.216.34/",  # checked as public, connects to loopback
        "http://user:pw@127.0.0.1:5098/x.png",
        "http://127.0.0.1:5098@evil.example/",
        "http://127.0.0.1:5098 /x.png",
        "http://127.0.0.1:5098/\tx.png",
    ],
)
def test_urls_two_parsers_could_read_differently_are_refused(url):
    # Even with the host allowed: what is checked must be what requests connects to.
    policy = FetchPolicy(allowed_hosts={"127.0.0.1:5098"})
    with pytest.raises(FetchError, match="refused"):
        check_url(url, policy)


def test_fetches_an_image_and_says_who_is_asking(fake_civitai, http_session, sleeps):
    body = get_image_bytes(
        http_session,
        f"{fake_civitai.url}/img/a.png",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert body == fake_civitai.images["/img/a.png"][1]
    sent = fake_civitai.requests[-1].headers
    assert sent["user-agent"] == FetchPolicy().user_agent
    assert sent["accept"].startswith("image/")
    assert sleeps == []


def test_a_redirect_to_another_loopback_host_is_refused(fake_civitai, http_session):
    for path, message in [
        ("/redirect-to-loopback", "refused: localhost resolves to "),
        ("/redirect-to-127-0-0-2", "refused: 127.0.0.2 is a loopback address"),
    ]:
        with pytest.raises(FetchError) as caught:
            get_image_bytes(http_session, fake_civitai.url + path, policy=fake_civitai.policy())
        assert message in str(caught.value)
        assert "(allow private addresses in settings to fetch it)" in str(caught.value)
    assert "/img/a.png" not in fake_civitai.paths()  # refused before connecting


def test_redirects_are_followed_hop_by_hop(fake_civitai, http_session):
    body = get_image_bytes(
        http_session, f"{fake_civitai.url}/redirect-relative", policy=fake_civitai.policy()
    )
    assert body == fake_civitai.images["/img/a.png"][1]
    assert fake_civitai.paths() == ["/redirect-relative", "/img/a.png"]


def test_credentials_do_not_follow_a_redirect_to_another_host(fake_civitai, http_session):
    policy = fake_civitai.policy(allowed_hosts={f"localhost:{fake_civitai.port}"})
    body = get_image_bytes(
        http_session,
        f"{fake_civitai.url}/redirect-to-loopback",
        headers={"Authorization": "Bearer secret"},
        policy=policy,
    )
    assert body == fake_civitai.images["/img/a.png"][1]
    first, second = fake_civitai.requests
    assert first.headers["authorization"] == "Bearer secret"
    assert (second.path, second.headers["host"]) == ("/img/a.png", f"localhost:{fake_civitai.port}")
    assert "authorization" not in second.headers
    assert second.headers["user-agent"] == policy.user_agent


def test_a_redirect_loop_ends(fake_civitai, http_session):
    with pytest.raises(FetchError, match=r"too many redirects \(more than 3\) from http://"):
        get_image_bytes(
            http_session,
            f"{fake_civitai.url}/redirect-loop",
            policy=fake_civitai.policy(max_redirects=3),
        )
    assert fake_civitai.paths() == ["/redirect-loop"] * 4


def test_429_waits_as_long_as_retry_after_says(fake_civitai, http_session, sleeps):
    answer = get_json(
        http_session,
        f"{fake_civitai.url}/api/v1/images",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert sleeps == [1.0]
    assert len(answer["items"]) == 4
    assert fake_civitai.paths() == ["/api/v1/images"] * 2


def test_retry_after_is_capped_at_backoff_max(fake_civitai, http_session, sleeps):
    fake_civitai.fail("/img/a.png", 429, retry_after="3600")
    get_image_bytes(
        http_session,
        f"{fake_civitai.url}/img/a.png",
        policy=fake_civitai.policy(backoff_max=30.0),
        sleep=sleeps.append,
    )
    assert sleeps == [30.0]


def test_retry_after_may_be_an_http_date(fake_civitai, http_session, sleeps):
    fake_civitai.fail("/img/a.png", 503, retry_after=formatdate(time.time() + 20, usegmt=True))
    fake_civitai.fail("/img/a.png", 503, retry_after=formatdate(time.time() - 60, usegmt=True))
    get_image_bytes(
        http_session,
        f"{fake_civitai.url}/img/a.png",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert len(sleeps) == 2
    assert 17.0 < sleeps[0] <= 20.0
    assert sleeps[1] == 0.0  # a date already past: no wait


def test_without_retry_after_the_wait_doubles_up_to_a_cap(fake_civitai, http_session, sleeps):
    fake_civitai.fail("/img/a.png", 503, times=10)
    with pytest.raises(FetchError) as caught:
        get_image_bytes(
            http_session,
            f"{fake_civitai.url}/img/a.png",
            policy=fake_civitai.policy(backoff_max=5.0),
            sleep=sleeps.append,
        )
    assert str(caught.value) == f"gave up after 6 tries: HTTP 503 for {fake_civitai.url}/img/a.png"
    assert caught.value.retryable
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert fake_civitai.paths() == ["/img/a.png"] * 6


def test_default_backoff_is_one_two_four(fake_civitai, http_session, sleeps):
    fake_civitai.fail("/img/a.png", 429, times=6)
    with pytest.raises(FetchError, match=r"^gave up after 6 tries: HTTP 429 for http://"):
        get_image_bytes(
            http_session,
            f"{fake_civitai.url}/img/a.png",
            policy=fake_civitai.policy(),
            sleep=sleeps.append,
        )
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_an_unreadable_retry_after_falls_back_to_backoff(fake_civitai, http_session, sleeps):
    for nonsense in ["soon", "1.5", "-3", "\u00b2", "9" * 30]:
        fake_civitai.fail("/img/a.png", 503, retry_after=nonsense)
    get_image_bytes(
        http_session,
        f"{fake_civitai.url}/img/a.png",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_a_failed_name_lookup_is_retried_only_when_temporary(monkeypatch, sleeps):
    def getaddrinfo(host, *args, **kwargs):
        if host == "busy.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    policy = FetchPolicy(max_tries=3)
    with requests.Session() as session:
        with pytest.raises(FetchError) as caught:
            get_json(session, "https://busy.test/feed", policy=policy, sleep=sleeps.append)
        assert str(caught.value) == (
            "gave up after 3 tries: cannot resolve busy.test: Temporary failure in name resolution"
        )
        assert sleeps == [1.0, 2.0]
        with pytest.raises(FetchError) as caught:
            get_json(session, "https://gone.test/feed", policy=policy, sleep=sleeps.append)
        assert str(caught.value) == "cannot resolve gone.test: Name or service not known"
        assert not caught.value.retryable and sleeps == [1.0, 2.0]


def test_a_503_once_is_retried_and_then_served(fake_civitai, http_session, sleeps):
    body = get_image_bytes(
        http_session,
        f"{fake_civitai.url}/img/flaky.png",
        policy=fake_civitai.policy(),
        sleep=sleeps.append,
    )
    assert body == fake_civitai.images["/img/flaky.png"][1]
    assert sleeps == [1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 500, 502])
def test_other_http_errors_fail_at_once(fake_civitai, http_session, sleeps, status):
    fake_civitai.fail("/img/a.png", status)
    with pytest.raises(FetchError) as caught:
        get_image_bytes(
            http_session,
            f"{fake_civitai.url}/img/a.png",
            policy=fake_civitai.policy(),
            sleep=sleeps.append,
        )
    assert str(caught.value) == f"HTTP {status} for {fake_civitai.url}/img/a.png"
    assert not caught.value.retryable
    assert sleeps == []


def test_connection_errors_are_retried_like_503(http_session, sleeps):
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.png"
    with pytest.raises(FetchError) as caught:
        get_image_bytes(
            http_session,
            url,
            policy=FetchPolicy(allow_private=True, max_tries=3),
            sleep=sleeps.append,
        )
    assert str(caught.value) == f"gave up after 3 tries: connection refused for {url}"
    assert caught.value.retryable
    assert sleeps == [1.0, 2.0]


def test_timeouts_are_retried(sleeps):
    class SilentServer(requests.Session):
        def get(self, url, **kwargs):
            assert kwargs["timeout"] == 2.5 and kwargs["stream"] and not kwargs["allow_redirects"]
            raise requests.ReadTimeout("read timed out")

    policy = FetchPolicy(allowed_hosts={"images.test"}, max_tries=2, timeout=2.5)
    with SilentServer() as session, pytest.raises(FetchError) as caught:
        get_json(session, "https://images.test/feed", policy=policy, sleep=sleeps.append)
    assert str(caught.value) == (
        "gave up after 2 tries: no answer within 2.5 s for https://images.test/feed"
    )
    assert sleeps == [1.0]


def test_a_declared_size_over_the_cap_is_refused_unread(fake_civitai, http_session):
    url = f"{fake_civitai.url}/img/declared-huge.png"
    with pytest.raises(FetchError) as caught:
        get_image_bytes(http_session, url, policy=fake_civitai.policy())
    assert str(caught.value) == (
        f"too large: {url} is {fake_civitai.declared_size:,} bytes, "
        f"over the limit of {30 * 2**20:,}"
    )
    assert not caught.value.retryable


def test_a_body_without_length_is_cut_off_at_the_cap(fake_civitai, http_session):
    url = f"{fake_civitai.url}/img/oversized.png"
    with pytest.raises(FetchError, match=r"^too large: .* sent more than 1,048,576 bytes$"):
        get_image_bytes(http_session, url, policy=fake_civitai.policy(max_bytes=2**20))


def test_the_cap_is_inclusive(fake_civitai, http_session):
    url, size = f"{fake_civitai.url}/img/a.png", len(fake_civitai.images["/img/a.png"][1])
    assert len(get_image_bytes(http_session, url, policy=fake_civitai.policy(max_bytes=size)))
    with pytest.raises(FetchError, match="too large"):
        get_image_bytes(http_session, url, policy=fake_civitai.policy(max_bytes=size - 1))


def test_an_image_must_be_served_as_one(fake_civitai, http_session):
    url = f"{fake_civitai.url}/not-an-image"
    with pytest.raises(FetchError) as caught:
        get_image_bytes(http_session, url, policy=fake_civitai.policy())
    assert str(caught.value) == f"not an image: {url} is text/html"
    assert not caught.value.retryable


def test_json_must_be_a_json_object(fake_civitai, http_session):
    with pytest.raises(FetchError, match=r"^not JSON: http://.*/not-an-image"):
        get_json(http_session, f"{fake_civitai.url}/not-an-image", policy=fake_civitai.policy())


def test_the_server_is_not_reached_without_permission(fake_civitai, http_session):
    with pytest.raises(FetchError, match="127.0.0.1 is a loopback address"):
        get_json(http_session, f"{fake_civitai.url}/api/v1/images", policy=FetchPolicy())
    assert fake_civitai.requests == []


def test_every_response_is_closed(fake_civitai, sleeps):
    # an abandoned streamed response keeps its connection (and socket) open without any
    # ResourceWarning, so watch the responses themselves
    class Watched(requests.Session):
        def __init__(self):
            super().__init__()
            self.trust_env, self.responses = False, []

        def get(self, url, **kwargs):
            self.responses.append(super().get(url, **kwargs))
            return self.responses[-1]

    fake_civitai.fail("/img/a.png", 503)
    policy = fake_civitai.policy(max_bytes=2**20)
    with Watched() as session:
        for path in [
            "/img/a.png",
            "/redirect-relative",
            "/img/oversized.png",
            "/not-an-image",
            "/img/declared-huge.png",
            "/redirect-to-loopback",
            "/api/v1/images",
        ]:
            try:
                get_image_bytes(
                    session, fake_civitai.url + path, policy=policy, sleep=sleeps.append
                )
            except FetchError:
                pass
        assert len(session.responses) == 10
        assert all(response.raw.closed for response in session.responses)


@pytest.fixture
def resolver(monkeypatch):
    """Answer lookups of names under .test from a script: a dict of name -> list of addresses,
    one popped per lookup (the last one stays); every lookup is recorded."""
    real, script, lookups = socket.getaddrinfo, {}, []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            lookups.append(host)
            answers = script[host]
            host = answers.pop(0) if len(answers) > 1 else answers[0]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return script, lookups


def test_a_name_that_rebinds_to_loopback_after_the_check_is_refused(
    fake_civitai, http_session, resolver
):
    # DNS rebinding: public when checked, loopback when connected. The connection itself
    # resolves, checks and connects to what it checked, so the server is never reached.
    script, _lookups = resolver
    script["rebind.test"] = ["93.184.216.34", "127.0.0.1"]
    url = f"http://rebind.test:{fake_civitai.port}/img/a.png"
    with pytest.raises(FetchError, match=r"rebind\.test resolves to 127\.0\.0\.1, which is a loop"):
        get_image_bytes(http_session, url, policy=FetchPolicy(max_tries=1))
    assert fake_civitai.requests == []


def test_the_connection_goes_to_the_address_looked_up_once(fake_civitai, http_session, resolver):
    # an allowed intranet name: looked up once, at connect time, and connected to that address
    script, lookups = resolver
    script["nas.test"] = ["127.0.0.1", "10.255.255.1"]
    policy = FetchPolicy(allowed_hosts={f"nas.test:{fake_civitai.port}"}, max_tries=1, timeout=3)
    body = get_image_bytes(
        http_session, f"http://nas.test:{fake_civitai.port}/img/a.png", policy=policy
    )
    assert body == fake_civitai.images["/img/a.png"][1]
    assert lookups == ["nas.test"]
    assert fake_civitai.requests[-1].headers["host"] == f"nas.test:{fake_civitai.port}"


def test_a_proxy_from_the_environment_is_not_used(fake_civitai, monkeypatch):
    # a proxy would connect to a target the checks never saw
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with requests.Session() as session:  # trusts the environment, as requests does by default
        body = get_image_bytes(
            session, f"{fake_civitai.url}/img/a.png", policy=fake_civitai.policy(max_tries=1)
        )
    assert body == fake_civitai.images["/img/a.png"][1]
