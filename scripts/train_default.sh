#!/usr/bin/env bash
# Reproduce the shipped mmstory-small from scratch on a CPU: feature cache, stage 1 (caption decoder + projections),
# stage 2 (bridge into SmolLM2), export, dev-split evaluation. Needs ../shared/data/flickr8k beside the repository.
# Prints the wall time of each stage. Outputs: runs/flickr8k, runs/flickr8k_bridge, mmstory/pretrained/mmstory-small,
# runs/eval-mmstory-small/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
BIN=.venv/bin
start=$(date +%s)
stamp() { echo "[train_default] $1: $(( $(date +%s) - start )) s since start"; }

$BIN/mmstory train --config configs/flickr8k.yaml ${RESUME:+--resume}
stamp "stage 1 (feature cache + caption decoder + projections)"
$BIN/mmstory train --config configs/flickr8k_bridge.yaml ${RESUME:+--resume}
stamp "stage 2 (bridge)"
$BIN/python scripts/export_default.py runs/flickr8k/best --bridge-from runs/flickr8k_bridge/best \
    --captioner caption_decoder
stamp "export"
$BIN/mmstory eval --model mmstory-small --data ../shared/data/flickr8k --split dev --captioner caption_decoder \
    --stories 10 --out runs/eval-mmstory-small/report.json --plots runs/eval-mmstory-small --run-dir runs/flickr8k
stamp "evaluation"
