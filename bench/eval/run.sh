#!/bin/sh
# Reproduces the figures in bench/eval/RESULTS.md. Eval sets are derived from ../shared/data into
# a scratch directory (never into the repository). Run from anywhere; takes a few minutes.
set -eu
cd "$(dirname "$0")/../.."
work="${TMPDIR:-/tmp}/extproc-eval"
mkdir -p "$work"
out=bench/eval
eval_() { python -m extproc.evaluation "$@"; }  # = extproc eval "$@"

python -m extproc.evaluation.convert mmlu-pro --data-dir ../shared/data --split val --out "$work/mmlu_pro_val.jsonl"
python -m extproc.evaluation.convert mmlu-pro --data-dir ../shared/data --split test --out "$work/mmlu_pro_test.jsonl"
python -m extproc.evaluation.convert dcrouter --data-dir ../shared/data --split train --out "$work/dcrouter_train.jsonl"
python -m extproc.evaluation.convert dcrouter --data-dir ../shared/data --split test --out "$work/dcrouter_test.jsonl"

# 1. MMLU-Pro, Llama-3.1-8B -> 70B on complexity. The threshold for 95% of the 70B's quality is
#    calibrated on the validation split; the figures are on the held-out test split.
eval_ --config extproc/evaluation/policies/mmlu_llama_pair.yaml --data "$work/mmlu_pro_val.jsonl" \
    --target-quality 95% --out "$out/mmlu_pro_val_calibration.json"
eval_ --config extproc/evaluation/policies/mmlu_llama_pair.yaml --data "$work/mmlu_pro_test.jsonl" \
    --target-quality 95% --out "$out/mmlu_pro_test.json" --plot "$out/mmlu_pro_test.png" \
    --title "MMLU-Pro held-out split: Llama-3.1-8B → 70B on complexity"

# 2. dcrouter, nine models, three tiers. Thresholds calibrated on the train split.
eval_ --config extproc/evaluation/policies/dcrouter_tiers.yaml --data "$work/dcrouter_train.jsonl" \
    --target-quality 95% --out "$out/dcrouter_train_calibration.json"
eval_ --config extproc/evaluation/policies/dcrouter_tiers.yaml --data "$work/dcrouter_test.jsonl" \
    --target-quality 95% --out "$out/dcrouter_test.json" --plot "$out/dcrouter_test.png" \
    --title "dcrouter test split: nine models, three-tier policy"

# 3. The CI gate's slice (tests/eval/data), as the gate measures it.
eval_ --config extproc/evaluation/policies/mmlu_llama_pair.yaml --data tests/eval/data/mmlu_pro_heldout_small.jsonl \
    --out "$out/mmlu_pro_heldout_small.json"
