#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with moebench and its dependencies.
# A torch that the Python in use already has (a GPU build, say) is kept: the venv sees the
# system site-packages and moebench asks only for torch>=2.4. Where there is no torch, the CPU
# build torch==2.13.0 is installed (an unpinned torch pulls several GB of CUDA packages).
# Set TORCH_SPEC to install another torch (e.g. TORCH_SPEC="torch==2.13.0+cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --disable-pip-version-check -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --disable-pip-version-check -q -e ".[test]"
if [ "$(id -u)" = 0 ] && ! PATH="$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null 2>&1; then
    echo "set-up: installing slurm-wlm and munge system-wide (apt-get, as root) for the Slurm executor tests, which start a single-node cluster"
    scripts/slurm/install.sh || echo "warning: could not install Slurm (slurm-wlm, munge); the Slurm executor tests will be skipped" >&2; fi
# pdffonts (poppler-utils) lets the report tests check that no figure font is Type 3
if [ "$(id -u)" = 0 ] && ! command -v pdffonts >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "set-up: installing poppler-utils system-wide (apt-get, as root): its pdffonts lets the report tests check the PDF fonts"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends poppler-utils >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
           --no-install-recommends poppler-utils >/dev/null; }; } \
      || echo "warning: could not install poppler-utils; the pdffonts check of the report tests will be skipped" >&2
fi
.venv/bin/python -c "import torch, transformers, lm_eval, moebench; print('moebench', moebench.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
