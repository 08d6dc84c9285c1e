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

# 4. extproc fit on dcrouter: a head for gemma-2-9b-it -> nemotron-51b fitted on the train split,
#    against the shipped head for the same pair, both scored on the test split.
extproc fit --data "$work/dcrouter_train.jsonl" --weak gemma-2-9b-it --strong llama-3.1-nemotron-51b-instruct \
    --name dcrouter-pair --out "$out/dcrouter-pair.json" | tee "$out/dcrouter-pair.fit.txt"
eval_ --config bench/eval/dcrouter_pair_fitted.yaml --data "$work/dcrouter_test.jsonl" \
    --target-quality 95% --out "$out/dcrouter_pair_fitted_test.json"
eval_ --config bench/eval/dcrouter_pair.yaml --data "$work/dcrouter_test.jsonl" \
    --target-quality 95% --out "$out/dcrouter_pair_test.json"

# 5. Transfer tables for the model card (needs litellm in a scratch venv for its baseline).
# python bench/transfer.py --data ../shared/data --litellm /path/to/litellm-venv/bin/python
