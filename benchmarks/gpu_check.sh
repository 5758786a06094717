#!/bin/bash
# The GPU checks, on any machine with a CUDA GPU and the project installed (run from the repository root):
#   bash benchmarks/gpu_check.sh            # logs and the small run's cost table under $OUT (default /tmp/gpu_check)
# 1. tests/test_small_recipe.py's GPU test: recipes/small.yaml cut to a few steps, every stage on the GPU (bf16);
# 2. benchmarks/generation.py on that run's sft model (eval's generation and PPO's rollouts against model.generate;
#    with vllm installed also generation.backend: vllm);
# 3. tests/test_vllm_engine.py (the real vLLM engine where vllm is installed);
# 4. the stages' tests that run on the GPU when one is there (diffusion, image pairs, ppo, eval), one worker per 2 cores.
# Each part has its own time limit (SMALL_T, GEN_T, VLLM_T, TEST_T seconds); a part cut short prints what it had.
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PY:-python3}
stamp() { echo "=== $(date +%T) $*"; }
stamp "$(nvidia-smi -L 2>/dev/null | head -1), $(nproc) CPUs"
stamp "small recipe on the GPU"
rm -rf /tmp/gpu_check_runs
timeout "${SMALL_T:-300}" $PY -m pytest -q -rs -p no:cacheprovider --basetemp=/tmp/gpu_check_runs \
    tests/test_small_recipe.py -k cuda > "$OUT/small_gpu.log" 2>&1
echo "exit code $?"; tail -3 "$OUT/small_gpu.log"
RUN=$(ls -d /tmp/gpu_check_runs/*/runs/small 2>/dev/null | head -1)
if [ -n "$RUN" ]; then
  cp "$RUN/cost.md" "$OUT/" 2>/dev/null && head -14 "$OUT/cost.md"
  stamp "generation benchmark"
  VLLM=$($PY -c "import importlib.util as u; print('--vllm' if u.find_spec('vllm') else '')")
  timeout "${GEN_T:-120}" $PY benchmarks/generation.py recipes/small.yaml --model "$RUN/sft" --prompts "${GEN_N:-64}" \
      --ppo-prompts "${GEN_N:-64}" --repeats "${REPEATS:-3}" $VLLM 2>&1 | grep -v "it/s" | tail -20
fi
stamp "vLLM engine tests"
timeout -s INT "${VLLM_T:-300}" $PY -m pytest -q -rs -p no:cacheprovider tests/test_vllm_engine.py 2>&1 | tail -5
stamp "the stages' GPU tests"
timeout -s INT -k 15 "${TEST_T:-600}" $PY -m pytest -q -rfE --tb=short -p no:cacheprovider -n "$(( $(nproc) / 2 ))" \
    --dist load tests/test_diffusion.py tests/test_image_pairs.py tests/test_ppo.py tests/test_evaluate.py \
    > "$OUT/pytest_gpu.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.log" | tail -30
stamp done
