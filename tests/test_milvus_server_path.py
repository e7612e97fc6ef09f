"""The vector store against a Milvus *server*: roles, readiness, timeouts, users.

The server is Milvus Lite's own gRPC server (milvus_lite 3.x runs one in-process per *.db; here it
is started on a TCP port and reached by an http:// URI, so the client takes the server path:
roles, tokens, timeouts). Unreachable servers are a closed TCP port and a proxy that stops
passing bytes (a hung server). Milvus Lite implements no users or roles (UNIMPLEMENTED), so
`milvus_roles` is checked against a fake client whose calls bind to `MilvusClient`'s signatures.
"""
from __future__ import annotations

import inspect
import select
import socket
import threading
import time

import pytest

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index import milvus_roles
from ecomcap.retrieval.index.gallery import open_gallery
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore
from tests.retrieval_fixtures import random_gallery

BOUND_S = 1.5  # timeout_s is 1.0: connection + every call must end well before a probe's timeout


def _lite_server(path):
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    server, db, port = start_server_in_thread(str(path), host="127.0.0.1", port=0)
    return server, db, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server, db, uri = _lite_server(tmp_path_factory.mktemp("milvus") / "server.db")
    yield uri
    server.stop(grace=0)
    db.close()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return open_gallery(random_gallery(tmp_path_factory.mktemp("g") / "g", n=300))


def _closed_port_uri() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _timed(fn):
    t0 = time.perf_counter()
    try:
        out = fn()
    except EcomcapError as exc:
        out = exc
    return out, time.perf_counter() - t0


def test_writer_builds_and_the_reader_finds_it_ready(server, gallery):
    writer = VectorStore(StoreConfig(uri=server, role="writer"))
    reader = VectorStore(StoreConfig(uri=server))
    try:
        name = writer.ensure(gallery)
        assert reader.ensure(gallery) == name  # checked, not built
        for target in ((), (gallery,), (name,)):
            ok, reason = reader.ready(*target)
            assert ok and "300 rows" in reason and "HNSW" in reason, reason
        hits = reader.search(name, gallery.vectors[[7]], 3)[0]
        assert hits[0].item_id == gallery.item_ids[7] and abs(hits[0].score - 1) < 1e-4
        with pytest.raises(EcomcapError, match="reader may not drop"):
            reader.drop(name)
        writer.client.release_collection(name)
        assert reader.ready() == (False, f"collection {name} is not loaded (NotLoad)")
        with pytest.raises(EcomcapError, match=r"is not loaded \(NotLoad\): run the index job"):
            VectorStore(StoreConfig(uri=server)).ensure(gallery)
        writer.client.load_collection(name)
        assert reader.ready()[0]
        lazy = VectorStore(StoreConfig(uri=server), connect=False)  # open(): no call until ready()
        assert lazy.open(gallery) == name and lazy._client is None and lazy.ready()[0]
        lazy.close()
    finally:
        reader.close()
        writer.close()


def test_reader_refuses_to_build_and_writer_rebuilds_an_incomplete_collection(server, tmp_path):
    gallery = open_gallery(random_gallery(tmp_path / "g", n=120, seed=3))
    reader = VectorStore(StoreConfig(uri=server))
    writer = VectorStore(StoreConfig(uri=server, role="writer"))
    try:
        name = reader.collection(gallery)
        assert reader.ready(gallery) == (False, f"collection {name} does not exist")
        with pytest.raises(EcomcapError, match=f"^collection {name} does not exist: run the index job"):
            reader.ensure(gallery)
        assert not writer.client.has_collection(name)  # the reader created nothing
        writer.ensure(gallery)
        writer.client.delete(name, filter="row >= 100")
        assert reader.ready(gallery) == (False, f"collection {name} holds 100 of 120 rows")
        with pytest.raises(EcomcapError, match="holds 100 of 120 rows: run the index job"):
            reader.ensure(gallery)
        assert writer.ensure(gallery) == name and writer.count(name) == 120  # dropped, rebuilt
        assert reader.ensure(gallery) == name and reader.ready()[0]
        writer.drop(name)
    finally:
        reader.close()
        writer.close()


def test_changed_index_parameters_are_a_new_collection(server, gallery):
    configs = [StoreConfig(uri=server), StoreConfig(uri=server, hnsw_m=8), StoreConfig(uri=server, ef_construction=100),
               StoreConfig(uri=server, index_type="IVF_FLAT"), StoreConfig(uri=server, index_type="IVF_FLAT", nlist=64),
               StoreConfig(uri=server, index_type="FLAT")]
    assert [c.index_tag for c in configs] == ["hnsw_m16_efc200", "hnsw_m8_efc200", "hnsw_m16_efc100",
                                              "ivf_flat_nlist128", "ivf_flat_nlist64", "flat"]
    names = {VectorStore(c, connect=False).collection(gallery) for c in configs}
    assert len(names) == len(configs) and all(n.startswith("ecomcap_gallery_") for n in names)
    assert StoreConfig(uri=server, ef=16).index_tag == configs[0].index_tag  # search breadth: same build
    writer = VectorStore(StoreConfig(uri=server, role="writer"))
    reader = VectorStore(StoreConfig(uri=server, hnsw_m=8))
    try:
        writer.ensure(gallery)  # M=16 exists; a reader configured for M=8 must not reuse it
        with pytest.raises(EcomcapError, match="_hnsw_m8_efc200 does not exist: run the index job"):
            reader.ensure(gallery)
    finally:
        reader.close()
        writer.close()


def test_closed_port_fails_fast_with_one_line(gallery):
    uri = _closed_port_uri()
    err, took = _timed(lambda: VectorStore(StoreConfig(uri=uri)))
    assert isinstance(err, EcomcapError) and took < BOUND_S, took
    assert str(err).startswith(f"Milvus server {uri} unreachable within 1 s as the reader ($MILVUS_READER_TOKEN")
    assert "\n" not in str(err)
    lazy = VectorStore(StoreConfig(uri=uri), connect=False)  # a page that starts, and reports not ready
    name = lazy.open(gallery)
    (ok, reason), took = _timed(lazy.ready)
    assert not ok and "unreachable" in reason and took < BOUND_S, (reason, took)
    for call in (lambda: lazy.ensure(gallery), lambda: lazy.search(name, gallery.vectors[:1], 3)):
        err, took = _timed(call)
        assert isinstance(err, EcomcapError) and "unreachable" in str(err) and took < BOUND_S, (err, took)


class _Proxy:
    """A TCP forwarder that can be frozen: connections stay open, no byte passes (a hung server)."""

    def __init__(self, target: str) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server behind was stopped: refuse, as it would
                a.close()
                continue
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        while True:
            readable, _, _ = select.select([a, b], [], [], 0.05)
            if self.frozen.is_set():
                continue
            for s in readable:
                data = s.recv(65536)
                if not data:
                    a.close()
                    b.close()
                    return
                (b if s is a else a).sendall(data)


def test_hung_then_stopped_server_calls_end_at_the_deadline(tmp_path, gallery):
    srv, db, uri = _lite_server(tmp_path / "hung.db")
    proxy = _Proxy(uri)
    writer = VectorStore(StoreConfig(uri=proxy.uri, role="writer"))
    reader = VectorStore(StoreConfig(uri=proxy.uri))
    try:
        name = writer.ensure(gallery)
        assert reader.ensure(gallery) == name
        proxy.frozen.set()
        (ok, reason), took = _timed(reader.ready)
        assert not ok and "DEADLINE_EXCEEDED" in reason and took < BOUND_S, (reason, took)
        err, took = _timed(lambda: reader.search(name, gallery.vectors[:1], 3))
        assert isinstance(err, EcomcapError) and "DEADLINE_EXCEEDED" in str(err) and took < BOUND_S, (err, took)
        err, took = _timed(lambda: VectorStore(StoreConfig(uri=proxy.uri)))
        assert isinstance(err, EcomcapError) and "unreachable" in str(err) and took < BOUND_S, (err, took)
        proxy.frozen.clear()
        assert reader.ready()[0]  # the same client recovers when the server answers again
        srv.stop(grace=0)
        (ok, reason), took = _timed(reader.ready)
        assert not ok and "unreachable" in reason and took < BOUND_S, (reason, took)
    finally:
        proxy.sock.close()
        reader.close()
        writer.close()
        srv.stop(grace=0)
        db.close()


def test_roles_pick_their_token_and_embedded_ignores_them(tmp_path, gallery, monkeypatch):
    assert StoreConfig().role == "reader" and StoreConfig().timeout_s == 1.0
    assert StoreConfig().token_var == "MILVUS_READER_TOKEN"
    assert StoreConfig(role="writer").token_var == "MILVUS_WRITER_TOKEN"
    assert StoreConfig(token_env="MY_TOKEN", role="writer").token_var == "MY_TOKEN"
    with pytest.raises(ValueError):
        StoreConfig(role="admin")
    seen = {}

    class Client:  # records what the store hands pymilvus
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("pymilvus.MilvusClient", Client)
    monkeypatch.setenv("MILVUS_WRITER_TOKEN", "writer:s3cret")
    VectorStore(StoreConfig(uri="http://milvus:19530", role="writer", timeout_s=0.5))
    assert seen == {"uri": "http://milvus:19530", "token": "writer:s3cret", "timeout": 0.5, "dedicated": True}
    monkeypatch.undo()
    lite = VectorStore(StoreConfig(uri=str(tmp_path / "m.db")))  # embedded: the reader builds
    try:
        name = lite.ensure(gallery)
        assert lite.ready() == (True, f"collection {name}: 300 rows, HNSW index built, loaded")
    finally:
        lite.close()


def test_search_reads_the_row_a_server_returns(gallery):
    """A Milvus server (2.3.5 from the `milvus` wheel, tried by hand) names a hit's primary key
    "id", Milvus Lite "row": the store asks for "row" as an output field and reads it there."""
    asked = {}

    class ServerShapedClient:
        def search(self, name, **kwargs):
            asked.update(kwargs)
            return [[{"id": 7, "distance": 0.9, "entity": {"item_id": "it0_00007", "row": 7}}]]

    store = VectorStore(StoreConfig(uri="http://milvus:19530"), connect=False)
    store._client = ServerShapedClient()
    assert [h.row for h in store.search("c", gallery.vectors[:1], 1)[0]] == [7]
    assert "row" in asked["output_fields"] and asked["timeout"] == 1.0


class FakeMilvusAdmin:
    """Stands in for a root `MilvusClient` (Milvus Lite has no RBAC): records the calls, keeps
    roles and users, and checks each call binds to pymilvus's real signature."""

    def __init__(self, roles=(), users=("root",)) -> None:
        from pymilvus import MilvusClient

        self.real, self.calls = MilvusClient, []
        self.roles, self.users = set(roles), set(users)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            inspect.signature(getattr(self.real, name)).bind(None, *args, **kwargs)
            self.calls.append((name, *args))
            if name == "list_roles":
                return sorted(self.roles)
            if name == "list_users":
                return sorted(self.users)
            {"create_role": self.roles.add, "create_user": self.users.add,
             "drop_user": self.users.discard}.get(name, lambda _: None)(args[0])
        return call


def test_setup_roles_grants_read_only_to_the_reader_and_is_idempotent():
    users = {"reader": ("reader", "r-pass-1"), "writer": ("writer", "w-pass-1")}
    fake = FakeMilvusAdmin()
    milvus_roles.setup_roles(fake, users)
    grants = {(c[1], c[2], c[3]) for c in fake.calls if c[0] == "grant_privilege_v2"}
    assert grants == {("ecomcap_reader", "DatabaseReadOnly", "*"), ("ecomcap_reader", "CollectionReadOnly", "*"),
                      ("ecomcap_writer", "DatabaseAdmin", "*"), ("ecomcap_writer", "CollectionReadWrite", "*")}
    assert ("create_user", "reader", "r-pass-1") in fake.calls
    assert ("grant_role", "reader", "ecomcap_reader") in fake.calls and ("grant_role", "writer", "ecomcap_writer") in fake.calls
    again = FakeMilvusAdmin(roles=fake.roles, users=fake.users)
    done = milvus_roles.setup_roles(again, {"reader": ("reader", "rotated-1")})
    assert not [c for c in again.calls if c[0] == "create_role"]  # roles exist: kept
    assert again.calls[-3:] == [("drop_user", "reader"), ("create_user", "reader", "rotated-1"),
                                ("grant_role", "reader", "ecomcap_reader")]  # the Secret's password wins
    assert done[-1] == "re-created user reader with role ecomcap_reader"
    for bad, match in (({"reader": ("root", "whatever")}, "not root"), ({"reader": ("1x", "whatever")}, "a letter"),
                       ({"writer": ("writer", "short")}, "6 to 256"), ({"admin": ("a", "whatever")}, "unknown")):
        with pytest.raises(EcomcapError, match=match):
            milvus_roles.setup_roles(FakeMilvusAdmin(), bad)


def test_roles_job_entry_point(server, capsys):
    env = {"MILVUS_URI": "http://milvus:19530", "MILVUS_ROOT_PASSWORD": "root-pw", "MILVUS_READER_USER": "reader",
           "MILVUS_READER_PASSWORD": "r-pass-1", "MILVUS_WRITER_USER": "writer", "MILVUS_WRITER_PASSWORD": "w-pass-1"}
    fake, seen = FakeMilvusAdmin(), []
    assert milvus_roles.main(env, connect=lambda uri, token: seen.append((uri, token)) or fake) == 0
    assert seen == [("http://milvus:19530", "root:root-pw")]
    assert "created user writer with role ecomcap_writer" in capsys.readouterr().out
    assert milvus_roles.main({**env, "MILVUS_WRITER_PASSWORD": ""}) == 1
    assert capsys.readouterr().err == "error: set MILVUS_WRITER_PASSWORD (k8s/secrets/milvus.env, milvus-users.env)\n"
    assert milvus_roles.main({**env, "MILVUS_URI": server}) == 1  # Milvus Lite: no RBAC
    err = capsys.readouterr().err
    assert err == f"error: Milvus {server}: UNIMPLEMENTED: Method not implemented!\n", err
