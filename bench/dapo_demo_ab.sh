#!/usr/bin/env bash
# Held-out reward against wall-clock time on the demo's task, with and without DAPO's dynamic sampling and
# overlong filtering: both runs at once, one thread each, so that whatever else the machine does slows
# both alike. Usage: bench/dapo_demo_ab.sh OUT_DIR [MINUTES]   (then: python bench/dapo_demo_table.py OUT_DIR)
set -euo pipefail
out=${1:?usage: bench/dapo_demo_ab.sh OUT_DIR [MINUTES]}; minutes=${2:-10}
common=(-c examples/demo.yaml "max_minutes=$minutes" steps=1000 eval_every=10 eval_prompts=32 threads=1
        save_every=1000 tensorboard=false)
python -m seqpg train "${common[@]}" "run_dir=$out/plain" > "$out.plain.log" 2>&1 &
a=$!
python -m seqpg train "${common[@]}" "run_dir=$out/dapo" sampling.dynamic_sampling=true algo.overlong_filter=true \
  > "$out.dapo.log" 2>&1 &
b=$!
wait $a $b
