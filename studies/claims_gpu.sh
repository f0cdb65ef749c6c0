#!/usr/bin/env bash
# The claim presets' own `full` budgets on one lent GPU (the device tool's H200), inside one call of at most 10 minutes.
#
# First the GPU tests (tests/test_cuda_paths.py, skipped where there is no GPU), then many runs at once on the GPU:
# `studies/claims.py --jobs $JOBS` keeps that many `attnlab compare` workers busy, each a process of its own with its
# dataset held on the GPU (the engine does so for any dataset that fits a quarter of the free memory). Resumable: a
# second call on a still-warm machine continues where the first stopped. What finished comes back as one archive of
# small files (the device tool returns at most 8 files from $OUT).
#
#   here, once:  mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
#   device:      run(command="bash studies/claims_gpu.sh", carry=[".data"], timeout_s=600)
#   back here:   tar -xzf <files_at>/claims-full.tar.gz -C studies/results/ && python studies/digest.py
#                (then commit studies/results/claims-full and docs/_generated/claims.md)
#   on a CPU, a tiny trial of the whole path (tests/test_claims_script.py runs one):
#                DEVICE=cpu JOBS=2 SECONDS_LEFT=300 bash studies/claims_gpu.sh --epochs 1 --subset 64 ...
#
# Environment: DEVICE (cuda), JOBS (16: one per CPU core of the H200 machine), PRESETS (every claim preset),
# SECONDS_LEFT (540: stop training then, so the archive is written inside the call), OUT (where the archive goes:
# the device tool's $OUT, else runs/), RUNS (runs/claims-full: the comparisons, weights included), RESULTS
# (studies/results/claims-full: their small files, labelled by the device's name in each run's summary.json). Arguments go to
# every `attnlab compare`.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-16}
PRESETS=${PRESETS:-fmm,consistency,smoothness,aw,cram,aw-detection,families}
SECONDS_LEFT=${SECONDS_LEFT:-540}
RUNS=${RUNS:-runs/claims-full}
RESULTS=${RESULTS:-studies/results/claims-full}
ARCHIVE_DIR=${OUT:-runs}
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ATTNLAB_DATA=${ATTNLAB_DATA:-$PWD/.data}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
fi
"$PY" -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'timm')))" \
  || exit 1  # the versions, without the seconds of importing them
if [ "$DEVICE" = cuda ]; then  # the CUDA-only code paths first (about a minute): a broken one would waste the lease
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py || exit 1
fi

started=$(date +%s)
timeout --signal=INT --kill-after=20 "$SECONDS_LEFT" \
  "$PY" studies/claims.py --budget full --device "$DEVICE" --jobs "$JOBS" --presets "$PRESETS" \
  --runs "$RUNS" --results "$RESULTS" -- "$@"
code=$?
mkdir -p "$RESULTS"
"$PY" studies/claims.py --export --presets "$PRESETS" --runs "$RUNS" --results "$RESULTS"
"$PY" studies/claims.py --status --budget full --presets "$PRESETS" --runs "$RUNS" --results "$RESULTS" \
  | tee "$RESULTS/status.txt"
mkdir -p "$ARCHIVE_DIR"
tar -czf "$ARCHIVE_DIR/claims-full.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
echo "claims_gpu: $(($(date +%s) - started)) s, exit code $code (124/130: stopped at SECONDS_LEFT, resumable)"
echo "claims_gpu: archive $ARCHIVE_DIR/claims-full.tar.gz"
exit $code
