"""The declared route table: no two routes claim a path, writes are authorised by route, HEAD is
GET without a body, admission from the headers alone, and request-line bounds."""

import hashlib
import io
import json

import pytest

from polykit_cache.app import MAX_PATH, MAX_QUERY, REFUSED
from polykit_cache.http import HTTPError
from polykit_cache.routes import Route, Router
from support import KEY, Reply, call, make_environ, new_app

TOKENS = "read reader-token-1\nread-write writer-token-1\n"
READ, WRITE = {"Authorization": "Bearer reader-token-1"}, {"Authorization": "Bearer writer-token-1"}


@pytest.fixture
def secured(tmp_path):
    (tmp_path / "tokens").write_text(TOKENS)
    return new_app(tmp_path / "secured", token_file=tmp_path / "tokens")


def test_no_two_routes_claim_one_path(app):
    routes = app.router.routes
    assert {r.protocol for r in routes} == {"polykit", "turbo", "nx", "bazel", "kv"}
    for route in routes:
        assert route.samples, f"{route.pattern} declares no sample paths"
        for sample in route.samples:
            assert route.regex.fullmatch(sample), (route.pattern, sample)
            assert app.router.match(sample)[0] is route
            for other in routes:
                if other is not route:
                    assert other.regex.fullmatch(sample) is None, (sample, route.pattern, other.pattern)


def test_every_route_is_found_under_a_namespace_and_namespaces_never_hold_a_root(app):
    for route in app.router.routes:
        for sample in route.samples:
            found, params = app.router.match("/team/cache-v2" + sample)
            assert found is route and params["namespace"] == "team/cache-v2", sample
            assert app.router.match(sample)[1]["namespace"] == ""
    for root in app.router.roots:  # the leftmost root decides: a root is never a namespace part
        found = app.router.match(f"/{root}/v1/artifacts/{KEY}")
        assert found is None or found[0].root == root


def test_routing_does_not_depend_on_the_order_of_the_table(app):
    reversed_router = Router(list(reversed(app.router.routes)))
    for route in app.router.routes:
        for sample in route.samples:
            assert reversed_router.match(sample)[0] is route


def test_a_table_where_a_path_of_its_own_is_also_matched_by_a_pattern_is_refused():
    def handler(environ, params):
        raise AssertionError("never called")

    status = Route("polykit", "v9", r"/v9/things/status", {"GET": handler})
    thing = Route("polykit", "v9", r"/v9/things/(?P<name>[a-z]+)", {"GET": handler})
    with pytest.raises(ValueError, match="also matched"):
        Router([status, thing])
    with pytest.raises(ValueError, match="declared twice"):
        Router([status, Route("polykit", "v9", r"/v9/things/status", {"GET": handler})])
    with pytest.raises(ValueError, match="outside its root"):
        Router([Route("polykit", "v9", r"/v8/things", {"GET": handler})])
    router = Router([status, Route("polykit", "v9", r"/v9/things/(?!status$)(?P<name>[a-z]+)", {"GET": handler})])
    assert router.match("/v9/things/status")[0] is status
    assert router.match("/ns/v9/things/status") == (status, {"namespace": "ns"})
    assert router.match("/v9/things/other")[1] == {"name": "other", "namespace": ""}


def test_bazel_instance_names_never_swallow_another_protocol_s_root(app):
    digest = hashlib.sha256(b"x").hexdigest()
    assert call(app, "PUT", f"/v8/artifacts/cas/{digest}", b"x").status == 404
    assert call(app, "GET", f"/v8/artifacts/cas/{digest}").status == 404
    assert call(app, "PUT", f"/kv/ns/cas/{digest}", b"x").status == 201  # a key-value entry, not a CAS blob
    assert call(app, "GET", f"/cas/{digest}").status == 404
    assert call(app, "GET", f"/kv/cas/{digest}").status == 404  # "/kv" is the key-value root, not an instance
    assert call(app, "PUT", f"/v1/cas/{digest}", b"x").status == 404


def test_every_method_is_declared_a_read_or_a_write():
    with pytest.raises(ValueError, match="classify"):
        Route("x", "x", r"/x", {"POST": lambda environ, params: None})
    assert Route("x", "x", r"/x", {"POST": lambda e, p: None}, writes=frozenset({"POST"})).is_write("POST")
    assert not Route("x", "x", r"/x", {"GET": lambda e, p: None}).is_write("GET")


def test_writes_are_authorised_by_route_for_every_method(secured):
    for route in secured.router.routes:
        sample = route.samples[0]
        for method in route.handlers:
            path = sample + ("?team=t" if route.protocol == "turbo" else "")
            if route.is_write(method):
                assert call(secured, method, path, b"x").status == 401, (method, path)
                assert call(secured, method, path, b"x", headers=READ).status == 403, (method, path)
            elif method == "OPTIONS":  # a CORS preflight carries no credentials
                assert call(secured, method, path).status == 204, path
            elif not route.public:
                assert call(secured, method, path, b"" if method == "POST" else None).status == 401, (method, path)
                assert call(secured, method, path, b"" if method == "POST" else None, headers=READ).status != 403


def test_turbo_reads_by_post_need_only_a_read_token(secured):
    body = json.dumps({"hashes": ["abc"]}).encode()
    assert call(secured, "POST", "/v8/artifacts?team=t", body, headers=READ).json() == {"abc": None}
    assert call(secured, "POST", "/v8/artifacts/events", b"[]", headers=READ).status == 200


@pytest.mark.parametrize("path", ["/metrics", "/v1/stats", "/healthz", "/v8/artifacts/status"])
def test_head_answers_wherever_get_does(app, path):
    get, head = call(app, "GET", path), call(app, "HEAD", path)
    assert get.status == head.status == 200
    assert head.body == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_every_get_route_takes_head(app):
    for route in app.router.routes:
        if "GET" in route.handlers:
            assert "HEAD" in route.handlers, route.pattern


def test_reason_phrases_come_from_the_standard_table(app):
    assert call(app, "PUT", "/v8/artifacts/abcd?team=t", b"x").reason == "Accepted"
    assert call(app, "GET", "/nothing").reason == "Not Found"


# --- admission from the method, path and headers alone --------------------------------------


def admit(app, method: str, path: str, headers: dict | None = None):
    """admit()'s verdict on a request's head (``path`` may carry a query string)."""
    return app.admit(make_environ(method, path, headers=headers))


def answer(app, method: str, path: str, refusal) -> Reply:
    """A refusal as the server layer answers it: through the app, under REFUSED, with no body."""
    return call(app, method, path, body_stream=io.BytesIO(), extra={REFUSED: refusal})


def test_admit_lets_a_good_request_through(secured):
    assert admit(secured, "PUT", f"/v1/artifacts/{KEY}", {**WRITE, "Content-Length": "10"}) is None
    assert admit(secured, "GET", "/healthz") is None
    assert admit(secured, "GET", "/v1/stats", READ) is None


def test_admit_refuses_in_the_route_s_error_shape(secured):
    limit = secured.config.max_artifact_size
    cases = [
        ("GET", "/nothing", {}, 404, "not_found"),
        ("DELETE", f"/v1/artifacts/{KEY}", WRITE, 405, "method_not_allowed"),
        ("PUT", f"/v1/artifacts/{KEY}", {"Content-Length": "10"}, 401, "unauthorized"),
        ("PUT", f"/v1/artifacts/{KEY}", {**READ, "Content-Length": "10"}, 403, "forbidden"),
        ("PUT", f"/v1/artifacts/{KEY}", {**WRITE, "Content-Length": str(limit + 1)}, 413, "too_large"),
        ("PUT", f"/v1/artifacts/{KEY}", {**WRITE, "Content-Length": "ten"}, 400, "bad_length"),
        ("PUT", f"/v1/artifacts/{KEY}", WRITE, 411, "length_required"),
        ("GET", "/x" * MAX_PATH, {}, 414, "uri_too_long"),
        ("GET", "/v1/stats?" + "x" * (MAX_QUERY + 1), READ, 414, "uri_too_long"),
    ]
    for method, path, headers, status, word in cases:
        refusal = admit(secured, method, path, headers)
        assert refusal is not None and refusal.status == status, (method, path, headers)
        reply = answer(secured, method, path, refusal)
        assert reply.status == status and reply.json()["error"] == word
    turbo = answer(secured, "PUT", "/v8/artifacts/abcd?team=t",
                   admit(secured, "PUT", "/v8/artifacts/abcd?team=t", {"Content-Length": "1"}))
    assert turbo.status == 401 and set(turbo.json()["error"]) == {"code", "message"}
    assert turbo.all("www-authenticate")[0] == 'Bearer realm="polykit-cache"'
    nx = answer(secured, "PUT", "/v1/cache/abc", admit(secured, "PUT", "/v1/cache/abc", {"Content-Length": "1", **READ}))
    assert nx.status == 403 and nx.headers["content-type"].startswith("text/plain")


def test_admit_counts_nothing_and_the_app_gives_the_same_answer(secured):
    refusal = admit(secured, "PUT", f"/v1/artifacts/{KEY}", {"Content-Length": "5"})
    assert secured.metrics.stats()["requests"] == 0 and secured.metrics.stats()["uploads_rejected"] == {}
    reply = call(secured, "PUT", f"/v1/artifacts/{KEY}", b"12345")
    assert reply.status == refusal.status == 401 and reply.json()["error"] == refusal.error
    assert secured.metrics.stats()["uploads_rejected"] == {"unauthorized": 1}
    answer(secured, "PUT", f"/v1/artifacts/{KEY}", refusal)  # the server layer's answer is counted too
    assert secured.metrics.stats()["uploads_rejected"] == {"unauthorized": 2}


def test_a_chunked_upload_is_not_refused_for_its_missing_length(app):
    assert admit(app, "PUT", f"/v1/artifacts/{KEY}", {"Transfer-Encoding": "chunked"}) is None


# --- bounds on the request line and on numbers --------------------------------------------


def test_the_path_and_query_string_are_bounded(app):
    reply = call(app, "GET", "/kv/ns/" + "a" * MAX_PATH)
    assert reply.status == 414 and reply.json()["error"] == "uri_too_long"
    reply = call(app, "GET", "/v8/artifacts/abcd?" + "x=y&" * (MAX_QUERY // 4 + 1))
    assert reply.status == 414 and set(reply.json()["error"]) == {"code", "message"}  # turbo's shape
    assert call(app, "GET", "/healthz?" + "x" * MAX_QUERY).status == 200


@pytest.mark.parametrize("value", ["abc", "+5", " 5", "5 ", "1_0", "-1", "٥", "9" * 20])
def test_a_content_length_that_is_not_digits_is_a_clear_400(app, value):
    for method, path in (("PUT", f"/v1/artifacts/{KEY}"), ("PUT", "/kv/ns/k"), ("POST", "/v8/artifacts/events"),
                         ("POST", "/v8/artifacts?team=t")):
        reply = call(app, method, path, headers={"Content-Length": value}, body_stream=io.BytesIO(b"12345"))
        assert reply.status == 400, (method, path, value, reply.body)
        body = reply.json()
        assert (body["error"]["code"] if isinstance(body["error"], dict) else body["error"]) == "bad_length"


def test_unknown_methods_fold_into_one_metric_label(app):
    for i in range(40):
        call(app, f"X{i:03d}" + "Z" * 200, f"/v1/artifacts/{KEY}", body_stream=io.BytesIO())  # no validator: made-up methods
        call(app, "GET", f"/no/such/path/{i}")
    lines = [line for line in call(app, "GET", "/metrics").body.decode().splitlines()
             if line.startswith("polykit_cache_requests_total{")]
    assert 'polykit_cache_requests_total{protocol="polykit",method="OTHER",status="405"} 40' in lines
    assert 'polykit_cache_requests_total{protocol="none",method="GET",status="404"} 40' in lines
    assert len(lines) == 2


def test_errors_the_server_layer_gives_itself_take_the_route_s_shape(app):
    exc = HTTPError(413, "too_large", "The body is over the limit.")
    assert answer(app, "PUT", "/v8/artifacts/abcd", exc).json()["error"]["code"] == "too_large"
    assert answer(app, "PUT", f"/v1/artifacts/{KEY}", exc).json()["error"] == "too_large"
    assert answer(app, "PUT", "/v1/cache/abc", exc).body == b"The body is over the limit.\n"
    assert answer(app, "PUT", "/nowhere", exc).json()["error"] == "too_large"
