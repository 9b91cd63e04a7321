#!/bin/bash
# warm start from the shipped drafter (1.42M self-distilled targets) on what it never saw: the last 30 generated
# shards of the plan (~0.27M self-distilled) + 18 corpus shards (~0.39M teacher-forced) + 2 rebuilt generated shards
# it did see (replay). Usage: runs/train_2m.sh STEPS BUDGET_MINUTES
cd /work/main
exec .venv/bin/python train.py --config configs/draft_layer_store.toml --set data.corpus_records=1152 \
  --set 'run.out_dir="runs/draft_layer_store_2m"' --set run.steps=$1 --set run.time_budget_minutes=$2 \
  --set train.learning_rate=1e-4 --set train.warmup_steps=20
