#!/usr/bin/env bash
# One setup for a fresh machine, used by the README, .ci/run and the cluster images.
# Creates .venv (Python 3.11) with the pinned torch/torchvision registry builds, the project, and Detectron2.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

apt=()
command -v java >/dev/null || apt+=(default-jre-headless)  # pycocoevalcap's METEOR and tokenizer run on Java
command -v chromium >/dev/null || apt+=(chromium)  # the search page's browser test (Playwright drives Debian's)
if [ ${#apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${apt[@]}" >/dev/null
fi
command -v uv >/dev/null || "$PY" -m pip install -q uv
[ -x .venv/bin/python ] || uv venv -q --python "$PY" .venv
# uv ignores this machine's pip config, which would otherwise pick a CPU torch wheel that the registry's
# torchvision cannot import against ("operator torchvision::nms does not exist").
uv pip install -q --python .venv/bin/python -e ".[dev]"
# Detectron2 (no C extension): see cluster/install_detectron2.py
if [ -f cluster/install_detectron2.py ]; then
  .venv/bin/python cluster/install_detectron2.py
fi
.venv/bin/python -c "import torch, torchvision, ray, mlflow, stanza, webdataset; print('densevse setup ok: torch', torch.__version__, 'ray', ray.__version__)"
