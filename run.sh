#!/bin/bash
# The README's two commands: `./run.sh demo` and `./run.sh test` (as root on a
# fresh Debian 12 machine). Installs make if the machine lacks it, then hands
# over to the Makefile, whose targets install everything else they need.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v make >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends make >/dev/null
fi
exec make "${@:-demo}"
