#!/usr/bin/env bash
# Reproduce the shipped mmstory-small from scratch on a CPU: image and caption feature caches; stage 1 (caption
# decoder, cross-entropy) then stage 1b (the caption decoder fine-tuned by self-critical sequence training on
# CIDEr-D), while stage 2 (the bridge into SmolLM2) then the contrastive heads (an ensemble of 4) run beside them;
# export; dev-split evaluation. Needs ../shared/data/flickr8k beside the repository; prints the wall time of each step.
#
# The two chains touch disjoint tensors and each runs on one thread (on a 2-core machine, two 1-thread processes
# beat one 2-thread process: OpenMP barriers cost more than they gain at these sizes).
# RESUME=1 continues interrupted runs.
# Outputs: runs/flickr8k, runs/flickr8k_scst, runs/flickr8k_bridge, runs/flickr8k_heads,
# mmstory/pretrained/mmstory-small, runs/eval-mmstory-small/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${RESUME:-}" ]; then  # fail now, not after the feature caches, if an earlier run's outputs are in the way
    for dir in runs/flickr8k runs/flickr8k_scst runs/flickr8k_bridge runs/flickr8k_heads; do
        if [ -e "$dir" ]; then echo "$dir exists: move it away, or RESUME=1 to continue it" >&2; exit 1; fi
    done
fi
make setup
mkdir -p runs  # the stages' logs go there (a fresh clone has no runs/)
BIN=.venv/bin
export OMP_NUM_THREADS=1
start=$(date +%s)
stamp() { echo "[train_default] $1: $(( $(date +%s) - start )) s since start"; }

# the feature caches first, on both cores: EfficientNet-Lite2 tokens per image, MiniLM features per caption
OMP_NUM_THREADS=2 $BIN/mmstory train --config mmstory/configs/flickr8k.yaml --prepare-only --no-progress
stamp "feature caches (images and captions)"

captioner() {
    $BIN/mmstory train --config mmstory/configs/flickr8k.yaml ${RESUME:+--resume} > runs/flickr8k_stage1.log 2>&1
    stamp "stage 1 (caption decoder), log in runs/flickr8k_stage1.log"
    $BIN/mmstory train --config mmstory/configs/flickr8k_scst.yaml ${RESUME:+--resume} > runs/flickr8k_scst.log 2>&1
    stamp "stage 1b (self-critical caption decoder), log in runs/flickr8k_scst.log"
}
bridge_and_heads() {
    $BIN/mmstory train --config mmstory/configs/flickr8k_bridge.yaml ${RESUME:+--resume} > runs/flickr8k_stage2.log 2>&1
    stamp "stage 2 (bridge), log in runs/flickr8k_stage2.log"
    $BIN/mmstory train --config mmstory/configs/flickr8k_heads.yaml ${RESUME:+--resume} > runs/flickr8k_heads.log 2>&1
    stamp "contrastive heads, log in runs/flickr8k_heads.log"
}
captioner &
chain1=$!
bridge_and_heads &
chain2=$!
wait $chain2
wait $chain1

$BIN/python scripts/export_default.py runs/flickr8k_scst/best --bridge-from runs/flickr8k_bridge/best \
    --projections-from runs/flickr8k_heads/best --captioner caption_decoder
stamp "export"
OMP_NUM_THREADS=2 $BIN/mmstory eval --model mmstory-small --data ../shared/data/flickr8k --split dev \
    --captioner caption_decoder --tasks captioning,retrieval --stories 0 --out runs/eval-mmstory-small/report.json \
    --plots runs/eval-mmstory-small --run-dir runs/flickr8k
stamp "evaluation"
