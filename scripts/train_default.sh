#!/usr/bin/env bash
# Reproduce the shipped mmstory-small from scratch on a CPU: feature cache + stage 1 (caption decoder and image/text
# projections), export, dev-split evaluation. Needs ../shared/data/flickr8k beside the repository; prints the wall
# time of each step. WITH_BRIDGE=1 also runs stage 2 (the bridge into SmolLM2, configs/flickr8k_bridge.yaml) and
# ships it, which turns on the visual prefix for the story writer; the shipped weights were made without it.
# RESUME=1 continues interrupted runs. Outputs: runs/flickr8k[, runs/flickr8k_bridge], mmstory/pretrained/mmstory-small,
# runs/eval-mmstory-small/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
BIN=.venv/bin
start=$(date +%s)
stamp() { echo "[train_default] $1: $(( $(date +%s) - start )) s since start"; }

$BIN/mmstory train --config configs/flickr8k.yaml ${RESUME:+--resume}
stamp "stage 1 (feature cache + caption decoder + projections)"
bridge=()
if [ -n "${WITH_BRIDGE:-}" ]; then
    $BIN/mmstory train --config configs/flickr8k_bridge.yaml ${RESUME:+--resume}
    stamp "stage 2 (bridge)"
    bridge=(--bridge-from runs/flickr8k_bridge/best)
fi
$BIN/python scripts/export_default.py runs/flickr8k/best "${bridge[@]}" --captioner caption_decoder
stamp "export"
$BIN/mmstory eval --model mmstory-small --data ../shared/data/flickr8k --split dev --captioner caption_decoder \
    --tasks captioning,retrieval --stories 0 --out runs/eval-mmstory-small/report.json \
    --plots runs/eval-mmstory-small --run-dir runs/flickr8k
stamp "evaluation"
