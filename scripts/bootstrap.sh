#!/usr/bin/env bash
# Set up everything refine-audit needs on a fresh machine of this kind:
# Debian packages (when root), the virtual environment and the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# The fault tests (tests/integration/test_worker_faults.py) kill and restart a redis-server
# of their own, never the machine's Redis.
command -v redis-server >/dev/null || need_apt+=(redis-server)
# Every audit of a submitted model runs in a bubblewrap sandbox (auditor/sandbox/).
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
command -v openssl >/dev/null || need_apt+=(openssl)  # the model-API client's TLS test makes a certificate
# The browser tests (tests/e2e/test_portal_*.py) drive Debian's headless Chromium, never a
# downloaded browser: install it whenever we can (root), or when asked (WITH_BROWSER=1).
if [ ! -x /usr/bin/chromium ] && { [ "$(id -u)" = 0 ] || [ "${WITH_BROWSER:-0}" = 1 ]; }; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: please install the Debian packages ${need_apt[*]} (needs root)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import auditor, torch, torchvision" # fail here, not in the tests
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
