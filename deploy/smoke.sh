#!/usr/bin/env bash
# Smoke test of the compose `sim` stack on a machine with Docker:
# build the image, `docker compose --profile sim up`, send one chat request
# through the proxy, check its answer, the proxy's and Prometheus's metrics
# and Grafana's dashboard, then tear everything down.
#
#   deploy/smoke.sh
#
# Where there is no Docker engine (or no compose), it says so and exits 0.
# Host ports: SLUICE_API_PORT (8080), SLUICE_ADMIN_PORT (9090),
# PROMETHEUS_PORT (9091), GRAFANA_PORT (3000).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "smoke: skipped: no docker engine (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "smoke: skipped: no docker compose (neither the plugin nor docker-compose)"
  exit 0
fi

api="http://localhost:${SLUICE_API_PORT:-8080}"
admin="http://localhost:${SLUICE_ADMIN_PORT:-9090}"
prom="http://localhost:${PROMETHEUS_PORT:-9091}"
grafana="http://localhost:${GRAFANA_PORT:-3000}"
export TEAM_A_API_KEY="${TEAM_A_API_KEY:-sk-smoke-team-a}"
project="sluice-smoke"

dc() { "${compose[@]}" -p "$project" -f deploy/compose.yaml --profile sim "$@"; }
fail() {
  echo "smoke: FAILED: $*" >&2
  dc ps >&2 || true
  dc logs --tail 40 >&2 || true
  exit 1
}
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

# poll SECONDS CMD...: run CMD every second until it succeeds.
poll() {
  local limit=$1
  shift
  for _ in $(seq "$limit"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  return 1
}

# A Docker engine that cannot reach a registry (a sandbox, an air-gapped CI
# runner) cannot build or start the stack: that is a skip, not a failure.
# Any other pull error (a wrong tag, say) fails.
echo "smoke: pulling the stack's images"
if ! pulled=$(dc pull redis prometheus grafana 2>&1); then
  if grep -qiE "no such host|dial tcp|i/o timeout|connection refused|network is unreachable|TLS handshake timeout|temporary failure in name resolution" <<<"$pulled"; then
    echo "smoke: skipped: the Docker engine cannot reach an image registry"
    grep -m1 -iE "no such host|dial tcp|timeout|refused|unreachable|name resolution" <<<"$pulled" | sed 's/^/smoke:   /'
    exit 0
  fi
  fail "pulling images: $pulled"
fi

echo "smoke: building the image and starting the sim stack"
dc up -d --build || fail "docker compose up"

poll 120 curl -fsS "$admin/readyz" || fail "the proxy never became ready ($admin/readyz)"
echo "smoke: proxy ready"

status=$(curl -sS -o /tmp/sluice-smoke-body.json -w '%{http_code}' "$api/v1/chat/completions" \
  -H 'content-type: application/json' -H "authorization: Bearer $TEAM_A_API_KEY" \
  -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}') \
  || fail "request"
[ "$status" = 200 ] || fail "chat request answered $status: $(cat /tmp/sluice-smoke-body.json)"
grep -q '"choices"' /tmp/sluice-smoke-body.json || fail "no choices in $(cat /tmp/sluice-smoke-body.json)"
echo "smoke: chat request through the proxy: 200"

metrics=$(curl -fsS "$admin/metrics") || fail "proxy /metrics"
grep -q 'sluice_requests_total{.*status="200"' <<<"$metrics" || fail "no 200 in sluice_requests_total"
grep -q 'sluice_tenant_requests_total{tenant="team-a"}' <<<"$metrics" || fail "no team-a request counted"
grep -q 'sluice_pool_routable_endpoints{pool="chat"} 3' <<<"$metrics" || fail "the pool does not see 3 sim replicas"
echo "smoke: proxy metrics count the request; 3 replicas routable"

# Prometheus scrapes the proxy and the three engines (4 targets up).
up_count() {
  curl -fsS "$prom/api/v1/query" --data-urlencode 'query=count(up == 1)' | grep -q '"value":\[[^]]*,"4"\]'
}
poll 60 up_count || fail "Prometheus does not see 4 targets up"
echo "smoke: Prometheus scrapes the proxy and 3 engines"

poll 60 curl -fsS "$grafana/api/dashboards/uid/sluice-overview" || fail "Grafana has no provisioned dashboard"
echo "smoke: Grafana serves the provisioned dashboard"
echo "smoke: OK"
