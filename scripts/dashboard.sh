#!/usr/bin/env bash
# `make dashboard`: ZenML's dashboard (pipeline DAGs, step logs, the materializers' visualisations)
# for this checkout's runs, served offline on 127.0.0.1 by a local ZenML server (zenml[server]).
# The local server has no login: it runs with auth scheme NO_AUTH as the "default" user (no
# password). `make dashboard-stop` (`zenml logout --local`) stops it and points the client back at
# the local database. Port: ZENML_DASHBOARD_PORT (default 8237).
set -euo pipefail
source "$(dirname "$0")/zenml_env.sh"
cd "$ROOT"
PORT="${ZENML_DASHBOARD_PORT:-8237}"
[ -d .zen ] || zenml init >/dev/null
zenml login --local --port "$PORT" --ip-address 127.0.0.1
python - <<'PY'
from zenml.client import Client
from zenml.models import UserUpdate
from zenml.utils.dashboard_utils import get_run_url

client = Client()
user = client.active_user
# A new user first gets ZenML's sign-up survey (name, e-mail); offline there is nobody to send it
# to: answer "no e-mail" once so run pages open directly.
if user.email_opted_in is None:
    client.zen_store.put(f"/users/{user.id}/email-opt-in", body=UserUpdate(email_opted_in=False))
if not (user.user_metadata or {}).get("finished_onboarding_survey"):
    client.update_user(user.id, updated_metadata={**(user.user_metadata or {}), "finished_onboarding_survey": True})
for pipeline in client.list_pipelines(size=50).items:
    for run in pipeline.get_runs(size=1):  # the newest
        print(f"last {pipeline.name} run ({run.status.value}): {get_run_url(run)}")
PY
echo "ZenML dashboard: http://127.0.0.1:$PORT  (stop: make dashboard-stop)"
