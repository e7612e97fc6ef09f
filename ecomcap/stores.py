"""Which stores an `ecomcap` command reads. Run from a checkout, the checkout's own: MLflow at
`<checkout>/.mlflow/mlflow.db` and ZenML state in `<checkout>/.zen_config`, the stores `make run`
and `make retrieval` write (scripts/zenml_env.sh), so the CLI finds what the pipelines registered
without sourcing that script. An explicit URI (a flag, the config's registry.tracking_uri,
MLFLOW_TRACKING_URI) still wins. Each command says in one log line which MLflow store it reads."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ecomcap.errors import EcomcapError

log = logging.getLogger("ecomcap.stores")


def find_checkout(start: Path | None = None) -> Path | None:
    """The ecomcap checkout holding `start` (default: the working directory), if any."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "scripts" / "zenml_env.sh").is_file() and (d / "ecomcap" / "cli.py").is_file():
            return d
    return None


def checkout_mlflow_db(root: Path) -> Path:
    return root / ".mlflow" / "mlflow.db"  # as scripts/zenml_env.sh's MLFLOW_DB


def tracking_uri(flag: str | None = None, config: str | None = None, *, must_exist: bool = True,
                 start: Path | None = None) -> str | None:
    """The MLflow store to read, said in one log line: `flag` > `config` > MLFLOW_TRACKING_URI (or
    mlflow.set_tracking_uri) > the checkout's store > None (MLflow's default, outside a checkout).
    `must_exist`: a checkout whose store is not made yet is an error that says how to make it
    (else None: nothing to read)."""
    for uri, why in ((flag, "--tracking-uri"), (config, "registry.tracking_uri"),
                     (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")):
        if uri:
            log.info("MLflow store: %s (from %s)", uri, why)
            return uri
    root = find_checkout(start)
    if root is None:
        import mlflow

        log.info("MLflow store: %s (MLflow's default: not in an ecomcap checkout, no --tracking-uri or "
                 "MLFLOW_TRACKING_URI)", mlflow.get_tracking_uri())
        return None
    db = checkout_mlflow_db(root)
    if not db.is_file():
        if must_exist:
            raise EcomcapError(f"no MLflow store in this checkout yet ({db}): `make run` or `make retrieval` "
                               "makes it; or pass --tracking-uri / set MLFLOW_TRACKING_URI")
        return None
    uri = f"sqlite:///{db}"
    log.info("MLflow store: %s (this checkout's, as `make` uses; --tracking-uri or MLFLOW_TRACKING_URI "
             "overrides)", uri)
    return uri


def zenml_env(start: Path | None = None) -> dict[str, str]:
    """Environment for a `zenml` subprocess: the checkout's ZenML state when `make` set it up there
    and ZENML_CONFIG_PATH is not set (else ZenML's own default, e.g. CI's global client config)."""
    root = find_checkout(start)
    if "ZENML_CONFIG_PATH" in os.environ or root is None or not (root / ".zen_config").is_dir():
        return {}
    log.info("ZenML store: %s (this checkout's, as `make` uses; ZENML_CONFIG_PATH overrides)", root / ".zen_config")
    return {"ZENML_CONFIG_PATH": str(root / ".zen_config")}
