"""Milvus users for the two clients of a server, so that neither connects as root.

- reader (the search page, `StoreConfig(role="reader")`, token MILVUS_READER_TOKEN): role
  `ecomcap_reader`, privilege groups DatabaseReadOnly + CollectionReadOnly (search, query, load
  state, index details): it cannot create, load, insert or drop anything.
- writer (the index job, `role="writer"`, token MILVUS_WRITER_TOKEN): role `ecomcap_writer`,
  DatabaseAdmin (create/drop collections) + CollectionReadWrite (insert, index, flush, load).

Both on every collection (`*`) of one database (`default`; the server holds only galleries, and
Milvus grants no name prefixes). Run as root by the `milvus-users` Job (k8s/search-page.yaml):

    python -m ecomcap.retrieval.index.milvus_roles

Idempotent: roles and grants are created when missing, and each user is re-created with the
password from the Secret, which is the one source of truth (a changed password takes effect by
re-running the Job). Milvus Lite has no users or roles: tests check the calls against a fake
client whose calls bind to pymilvus's own `MilvusClient` signatures.
"""
from __future__ import annotations

import logging
import os
import re
import sys

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.milvus import error_line

ROLES = {"reader": "ecomcap_reader", "writer": "ecomcap_writer"}
GRANTS = {  # role -> built-in privilege groups (Milvus >= 2.5), granted on collection "*" of the database
    "ecomcap_reader": ("DatabaseReadOnly", "CollectionReadOnly"),
    "ecomcap_writer": ("DatabaseAdmin", "CollectionReadWrite"),
}
_USER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")  # Milvus's rule for user names


def _check_user(kind: str, user: str, password: str) -> None:
    if not _USER.fullmatch(user or "") or user == "root":
        raise EcomcapError(f"MILVUS_{kind.upper()}_USER={user!r}: a letter then letters, digits or _ "
                           "(at most 32), not root")
    if not 6 <= len(password or "") <= 256:
        raise EcomcapError(f"MILVUS_{kind.upper()}_PASSWORD must be 6 to 256 characters (Milvus's rule)")


def setup_roles(client, users: dict[str, tuple[str, str]], db_name: str = "default",
                timeout: float = 30.0) -> list[str]:
    """Create the roles of `users` ({"reader"|"writer": (user, password)}), grant their
    privilege groups, (re)create the users and bind them. `client`: a root `MilvusClient`.
    Returns what was done, one line each."""
    for kind, (user, password) in users.items():
        if kind not in ROLES:
            raise EcomcapError(f"unknown Milvus role {kind!r}: one of {sorted(ROLES)}")
        _check_user(kind, user, password)
    done = []
    roles, existing = set(client.list_roles(timeout=timeout)), set(client.list_users(timeout=timeout))
    for kind, (user, password) in users.items():
        role = ROLES[kind]
        if role not in roles:
            client.create_role(role, timeout=timeout)
            done.append(f"created role {role}")
        for group in GRANTS[role]:
            client.grant_privilege_v2(role, group, "*", db_name=db_name, timeout=timeout)
        done.append(f"granted {role}: {', '.join(GRANTS[role])} on {db_name}.*")
        if user in existing:
            client.drop_user(user, timeout=timeout)
        client.create_user(user, password, timeout=timeout)
        client.grant_role(user, role, timeout=timeout)
        done.append(f"{'re-created' if user in existing else 'created'} user {user} with role {role}")
    return done


def main(env: dict[str, str] | None = None, connect=None) -> int:
    """The Job's entry point: MILVUS_URI, MILVUS_ROOT_PASSWORD, MILVUS_{READER,WRITER}_{USER,PASSWORD},
    optional MILVUS_DB. `connect(uri, token)` -> client (tests pass a fake)."""
    import pymilvus  # noqa: F401  (its import resets its loggers' levels)

    env = dict(os.environ if env is None else env)
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)  # a traceback per failed call
    try:
        missing = [k for k in ("MILVUS_ROOT_PASSWORD", "MILVUS_READER_USER", "MILVUS_READER_PASSWORD",
                               "MILVUS_WRITER_USER", "MILVUS_WRITER_PASSWORD") if not env.get(k)]
        if missing:
            raise EcomcapError(f"set {', '.join(missing)} (k8s/secrets/milvus.env, milvus-users.env)")
        uri = env.get("MILVUS_URI", "http://milvus:19530")
        if connect is None:
            from pymilvus import MilvusClient

            def connect(uri: str, token: str):
                return MilvusClient(uri=uri, token=token, timeout=10)
        try:
            client = connect(uri, f"root:{env['MILVUS_ROOT_PASSWORD']}")
            users = {kind: (env[f"MILVUS_{kind.upper()}_USER"], env[f"MILVUS_{kind.upper()}_PASSWORD"])
                     for kind in ROLES}
            for line in setup_roles(client, users, env.get("MILVUS_DB", "default")):
                print(line, flush=True)
        except EcomcapError:
            raise
        except Exception as exc:  # pymilvus / gRPC: one line, the Job retries
            raise EcomcapError(f"Milvus {uri}: {error_line(exc)}") from None
    except EcomcapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
