#!/usr/bin/env bash
# Checks the Prometheus rules in deploy/prometheus with promtool: `check rules`
# (syntax, PromQL, templates) and `test rules` (the unit tests in
# ration-rules.test.yml: each alert fires on made-up series, with its labels and
# text). Installs Debian's `prometheus` package (which ships promtool) when promtool
# is missing and apt-get is there. Does not start a Prometheus server.
#
#   scripts/check-alert-rules.sh
#
# tests/deploy_observability.rs runs the same two checks (with promtool from PATH,
# or unpacked from Debian's package without installing it), and checks that every
# metric the rules and the Grafana dashboard name is one the code exports.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "promtool is missing and there is no apt-get: install Prometheus's promtool" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing promtool (Debian package prometheus)" >&2
  $sudo apt-get update -qq
  # policy-rc.d or no systemd keeps the packaged service from starting in a
  # container; elsewhere stop it again: only promtool is wanted.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
promtool --version 2>&1 | head -1
promtool check rules deploy/prometheus/ration-rules.yml
promtool test rules deploy/prometheus/ration-rules.test.yml
