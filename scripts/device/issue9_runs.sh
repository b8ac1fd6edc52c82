#!/usr/bin/env bash
# Issue 9's remaining GPU measurements, for one lent nvidia-h200-x2 (2 x H200), run in the
# background so that they outlive the 10-minute device calls.
#
#   issue9_runs.sh start   DIR [JOB...]   snapshot the repo into DIR/repo, launch every job in the
#                                         background (setsid) and return at once; JOBs named here
#                                         are skipped (e.g. tp2_8b_bf16 smoke_tp_int8, the last two)
#   issue9_runs.sh status  DIR [WAIT_S]   progress table, log tails, numbers so far; with WAIT_S,
#                                         first wait until all jobs ended or WAIT_S seconds passed
#   issue9_runs.sh collect DIR OUTDIR     write DIR/results/summary.md, copy at most 8 result files
#                                         (summary, e2e md/json, TP=2 and tiny-MoE json, a plot)
#   issue9_runs.sh plan    DIR            print the job table and every command (runs nothing)
#   issue9_runs.sh stop    DIR            end the scheduler and the jobs it started (by their
#                                         process groups)
#
# Run from the repository root after the usual prefix (vLLM 0.26 kit + .whl wheels):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl; source scripts/gpu_kit_env.sh; export PYTHONPATH=$PYTHONPATH:/tmp/site
#
# Jobs (priority order; a GPU job takes a free GPU when its dependencies are met, so the lanes run
# side by side: Qwen3-MoE benchmarks on GPU 0, Llama-3-8B on GPU 1, TP=2 jobs alone):
#   make_moe, make_8b    random BF16 checkpoints (benchmarks/bench_e2e.py make-model, CPU)
#   serve_moe            vllm serve + openai on the tiny Qwen3-MoE checkpoint (vllm_gpu_smoke.py)
#   calib_*              w4a8-quantize's static calibration forward on a GPU (--calib-device cuda),
#                        amax saved; one 8B calibration serves its FP8 and INT8 exports
#   enc_*                w4a8-quantize with that amax (CPU): W4A8 MXFP4 x FP8 / x INT8 static
#   bench_*              benchmarks/bench_e2e.py run, the H100 run's settings (batches 1 8 32 128,
#                        64 decode steps, 8 x 2048 prefill), one engine per process, one GPU
#   report_*             benchmarks/bench_e2e.py report (markdown, JSON, PNG vs BF16)
#   tp2_8b_*             the 8B checkpoints at TP=2 (batches 1 and 32)
#   smoke_tp_*           tiny Qwen3-MoE, TP=1 vs TP=2 greedy tokens and reference agreement
# Everything goes under DIR: ckpt/ (~55 GB), runs/, results/, jobs/<job>/{log,state,rc,...}.
# W4A8_ISSUE9_DRYRUN=1: jobs print their commands and sleep W4A8_ISSUE9_DRY_SLEEP seconds
# (tests the scheduling on a CPU box; W4A8_ISSUE9_NGPU=1 pretends to have one GPU).
set -uo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
DRYRUN=${W4A8_ISSUE9_DRYRUN:-0}
DRY_SLEEP=${W4A8_ISSUE9_DRY_SLEEP:-1}
TICK=${W4A8_ISSUE9_TICK:-5}  # seconds between two looks of the scheduler
PY=python3

# name  resources  deps  limit_s
#   resources: cpu | g0 | g1 | g0,g1 / g1,g0 (either, first preferred) | g0+g1 (both GPUs)
#   deps: JOB = must have succeeded; ~JOB = must have ended (any outcome); - = none
JOB_TABLE="
make_moe        cpu    -                                             900
make_8b         cpu    -                                             900
serve_moe       g0,g1  -                                             480
calib_8b        g1,g0  make_8b                                       600
calib_moe       g0,g1  make_moe                                      900
enc_moe_fp8     cpu    calib_moe                                     1800
enc_8b_fp8      cpu    calib_8b                                      1500
enc_8b_int8     cpu    calib_8b                                      1500
bench_moe_bf16  g0     make_moe                                      900
bench_moe_fp8   g0     enc_moe_fp8,~bench_moe_bf16                   900
bench_8b_bf16   g1     make_8b                                       900
bench_8b_fp8    g1     enc_8b_fp8,~bench_8b_bf16                     900
bench_8b_int8   g1     enc_8b_int8,~bench_8b_fp8                     900
report_moe      cpu    ~bench_moe_bf16,~bench_moe_fp8                300
report_8b       cpu    ~bench_8b_bf16,~bench_8b_fp8,~bench_8b_int8   300
tp2_8b_fp8      g0+g1  enc_8b_fp8,~bench_moe_fp8,~bench_8b_int8      900
smoke_tp_fp8    g0+g1  ~tp2_8b_fp8,~serve_moe                        600
smoke_tp_int8   g0+g1  ~smoke_tp_fp8                                 600
tp2_8b_bf16     g0+g1  make_8b,~smoke_tp_int8                        900
report_tp2      cpu    ~tp2_8b_fp8,~tp2_8b_bf16                      300
"

declare -a NAMES=()
declare -A RES=() DEPS=() LIM=()
MAX_LIMIT=${W4A8_ISSUE9_MAX_LIMIT:-100000}  # caps every job's time limit (seconds)
while read -r n r d l; do
  [ -n "${n:-}" ] || continue
  NAMES+=("$n"); RES[$n]=$r; DEPS[$n]=$d; LIM[$n]=$(( l < MAX_LIMIT ? l : MAX_LIMIT ))
done <<< "$JOB_TABLE"

die() { echo "issue9_runs.sh: $*" >&2; exit 2; }

paths() {  # every path the jobs use, from DIR
  W=$(readlink -f "$1"); R=$W/repo; CK=$W/ckpt; RUNS=$W/runs; RESD=$W/results
  SUF=$(cat "$W/gpu_suffix" 2>/dev/null || echo h200)
  MQ=$CK/qwen3-30b-a3b-l16-bf16; MQF=$CK/qwen3-30b-a3b-l16-w4a8-fp8
  M8=$CK/llama3-8b-bf16; M8F=$CK/llama3-8b-w4a8-fp8; M8I=$CK/llama3-8b-w4a8-int8
  STEM_MOE=e2e_qwen3_30b_a3b_l16_$SUF; STEM_8B=e2e_llama3_8b_$SUF; STEM_TP2=e2e_llama3_8b_tp2_${SUF}x2
}

# ---------------------------------------------------------------------------------------------
# What each job runs (cwd: DIR/repo; CUDA_VISIBLE_DEVICES set by the scheduler)
# ---------------------------------------------------------------------------------------------
QARGS=(--calibration static --calib-max-length 64 --calib-device cuda --no-progress)
BENCH=(--batches 1 8 32 128 --decode-steps 64)
BENCH_TP2=(--tp 2 --batches 1 32 --decode-steps 64)

x() {  # run (or, dry, print) a command
  echo "+ $*"
  if [ "$DRYRUN" = 1 ]; then sleep "$DRY_SLEEP"; return 0; fi
  "$@"
}

make_model() {  # SHAPE OUT [make-model args]
  local shape=$1 out=$2; shift 2
  if [ -f "$out/config.json" ]; then echo "already made: $out"; return 0; fi
  [ "$DRYRUN" = 1 ] || { rm -rf "$out"; mkdir -p "$CK"; }
  x $PY benchmarks/bench_e2e.py make-model --shape "$shape" --out "$out" --device cpu "$@"
}

calib() {  # SRC AMAX
  if [ -f "$2" ]; then echo "already calibrated: $2"; return 0; fi
  x $PY scripts/device/issue9_helper.py calib "$1" "$2" -- --activations fp8 "${QARGS[@]}"
}

encode() {  # SRC OUT AMAX ACT
  if [ -f "$2/config.json" ]; then echo "already exported: $2"; return 0; fi
  x env CUDA_VISIBLE_DEVICES= $PY scripts/device/issue9_helper.py encode "$1" "$2" "$3" -- \
    --activations "$4" "${QARGS[@]}" || return
  [ "$DRYRUN" = 1 ] || du -sh "$2"
}

bench() {  # GROUP LABEL MODEL [bench_e2e.py run args]
  local grp=$1 label=$2 model=$3; shift 3
  local out=$RUNS/$grp/$label.json log=$RUNS/$grp/$label.log
  local cmd=(env CUDA_VISIBLE_DEVICES="$CUDA_VISIBLE_DEVICES" "$PY" benchmarks/bench_e2e.py run
             --model "$model" --label "$label" --out "$out" "$@")
  echo "+ ${cmd[*]} > $log 2>&1"
  if [ "$DRYRUN" = 1 ]; then sleep "$DRY_SLEEP"; return 0; fi
  mkdir -p "$RUNS/$grp"; rm -f "$out"
  echo "$log" > "$JD/watch"
  echo "${cmd[*]}" > "$RUNS/$grp/$label.cmd"
  "${cmd[@]}" > "$log" 2>&1
  local rc=$?
  grep -E "decode batch|prefill |Model loading took|uses kernel" "$log" | cut -c1-220 | sort -u | head -30
  [ $rc = 0 ] || tail -n 40 "$log"
  return $rc
}

report() {  # GROUP STEM
  local grp=$1 stem=$2 jsons=() cmds=() l
  for l in bf16 w4a8-fp8 w4a8-int8; do
    if [ -f "$RUNS/$grp/$l.json" ]; then jsons+=("$RUNS/$grp/$l.json"); cmds+=("$(cat "$RUNS/$grp/$l.cmd")"); fi
  done
  if [ "$DRYRUN" != 1 ] && [ ! -f "$RUNS/$grp/bf16.json" ]; then
    echo "no BF16 run in $RUNS/$grp: no report (the raw numbers are in summary.md)"; return 1
  fi
  local joined; joined=$(printf ' ; %s' "${cmds[@]+"${cmds[@]}"}"); joined=${joined# ; }
  [ "$DRYRUN" = 1 ] || mkdir -p "$RESD"
  x $PY benchmarks/bench_e2e.py report "${jsons[@]+"${jsons[@]}"}" --out-stem "$RESD/$stem" \
    --command "(one process each, scripts/device/issue9_runs.sh) $joined"
}

smoke() {  # NAME [vllm_gpu_smoke.py args]
  local out=$RESD/smoke_$1; shift
  [ "$DRYRUN" = 1 ] || mkdir -p "$out"
  x $PY tests/gpu/vllm_gpu_smoke.py "$out" "$@"
}

j_make_moe()       { make_model qwen3-30b-a3b "$MQ" --layers 16; }
j_make_8b()        { make_model llama3-8b "$M8"; }
j_serve_moe()      { smoke serve_moe --archs qwen3_moe --serve-only; }
j_calib_8b()       { calib "$M8" "$CK/llama3-8b.amax.pt"; }
j_calib_moe()      { calib "$MQ" "$CK/qwen3-30b-a3b-l16.amax.pt"; }
j_enc_moe_fp8()    { encode "$MQ" "$MQF" "$CK/qwen3-30b-a3b-l16.amax.pt" fp8; }
j_enc_8b_fp8()     { encode "$M8" "$M8F" "$CK/llama3-8b.amax.pt" fp8; }
j_enc_8b_int8()    { encode "$M8" "$M8I" "$CK/llama3-8b.amax.pt" int8; }
j_bench_moe_bf16() { bench moe bf16 "$MQ" "${BENCH[@]}"; }
j_bench_moe_fp8()  { bench moe w4a8-fp8 "$MQF" --quantization w4a8_mxfp4 "${BENCH[@]}"; }
j_bench_8b_bf16()  { bench 8b bf16 "$M8" "${BENCH[@]}"; }
j_bench_8b_fp8()   { bench 8b w4a8-fp8 "$M8F" --quantization w4a8_mxfp4 "${BENCH[@]}"; }
j_bench_8b_int8()  { bench 8b w4a8-int8 "$M8I" --quantization w4a8_mxfp4 "${BENCH[@]}"; }
j_report_moe()     { report moe "$STEM_MOE"; }
j_report_8b()      { report 8b "$STEM_8B"; }
j_tp2_8b_fp8()     { bench 8b_tp2 w4a8-fp8 "$M8F" --quantization w4a8_mxfp4 "${BENCH_TP2[@]}"; }
j_smoke_tp_fp8()   { smoke tp_fp8 --archs qwen3_moe --acts fp8 --tp 1 2 --no-serve; }
j_smoke_tp_int8()  { smoke tp_int8 --archs qwen3_moe --acts int8 --tp 1 2 --no-serve; }
j_tp2_8b_bf16()    { bench 8b_tp2 bf16 "$M8" "${BENCH_TP2[@]}"; }
j_report_tp2()     { report 8b_tp2 "$STEM_TP2"; }

# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------
jstate() { cat "$W/jobs/$1/state" 2>/dev/null || echo pending; }
ended() { case $1 in done|failed|timeout|skipped) return 0;; esac; return 1; }

gpu_mem_mib() {  # GPU index -> MiB in use (0 when nvidia-smi is missing)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$1" 2>/dev/null | head -1 | tr -dc 0-9
}

alive() { kill -0 -- "-$1" 2>/dev/null; }

kill_group() {  # NAME [now]: end what is left of a job's process group (its own setsid session)
  local jd=$W/jobs/$1 pg
  pg=$(cat "$jd/pgid" 2>/dev/null || cat "$jd/pid" 2>/dev/null) || return 0
  [ -n "$pg" ] || return 0
  if [ -z "${2:-}" ]; then  # a job that ended by itself: give its children 5 s to exit
    for _ in 1 2 3 4 5 6 7 8 9 10; do alive "$pg" || return 0; sleep 0.5; done
  fi
  alive "$pg" || return 0
  kill -TERM -- "-$pg" 2>/dev/null
  for _ in $(seq 30); do alive "$pg" || return 0; sleep 0.5; done
  kill -KILL -- "-$pg" 2>/dev/null
  return 0
}

finish() {  # NAME RC [why]
  local n=$1 rc=$2 jd=$W/jobs/$1
  if [ -f "$jd/rc" ]; then kill_group "$n"; else kill_group "$n" now; fi
  date +%s > "$jd/end"
  [ -f "$jd/rc" ] || echo "$rc" > "$jd/rc"
  if [ "$rc" = 0 ]; then echo "done" > "$jd/state"
  elif [ "$rc" = 124 ]; then echo timeout > "$jd/state"
  else echo failed > "$jd/state"; fi
  echo "$(date -u +%T) $n ended: $(cat "$jd/state") rc=$rc ${3:-}"
}

start_job() {  # NAME GPUS CORES
  local n=$1 jd=$W/jobs/$1 pre=()
  rm -rf "$jd"; mkdir -p "$jd"
  echo "$2" > "$jd/gpus"; echo "$3" > "$jd/cores"; date +%s > "$jd/start"; echo running > "$jd/state"
  if [ -n "$3" ] && command -v taskset > /dev/null; then pre=(taskset -c "$3"); fi
  setsid ${pre[@]+"${pre[@]}"} bash "$SELF" _job "$W" "$n" "$2" > "$jd/log" 2>&1 < /dev/null &
  echo $! > "$jd/pid"
  echo "$(date -u +%T) $n started on GPU '${2:-none}' cores '${3:-all}'"
}

sched() {
  paths "$1"; cd "$R" || exit 1
  local NGPU LANE0="" LANE1="" POOL="" sets
  NGPU=$(cat "$W/ngpu")
  sets=$(cat "$W/cpusets" 2>/dev/null || true)
  if [ -n "$sets" ]; then read -r LANE0 LANE1 POOL <<< "$sets"; fi
  echo running > "$W/sched.state"
  echo "$(date -u +%T) scheduler: $NGPU GPU(s), lanes '$LANE0' / '$LANE1', pool '$POOL'"
  while :; do
    local now n st busy=" " left=0
    now=$(date +%s)
    for n in "${NAMES[@]}"; do  # ended or overdue jobs; GPUs held
      local jd=$W/jobs/$n
      st=$(jstate "$n")
      if [ "$st" = running ]; then
        local pg; pg=$(cat "$jd/pgid" 2>/dev/null || cat "$jd/pid")
        if [ -f "$jd/rc" ]; then finish "$n" "$(cat "$jd/rc")"
        elif ! kill -0 "$pg" 2>/dev/null; then
          sleep 1
          if [ -f "$jd/rc" ]; then finish "$n" "$(cat "$jd/rc")"; else finish "$n" 137 "(died without an exit status)"; fi
        elif (( now - $(cat "$jd/start") > ${LIM[$n]} )); then finish "$n" 124 "(over its ${LIM[$n]} s limit)"
        fi
        st=$(jstate "$n")
      fi
      local g
      for g in $([ -f "$jd/gpus" ] && tr ',' ' ' < "$jd/gpus"); do
        if [ "$st" = running ]; then busy+="$g "; continue; fi
        if ended "$st" && [ ! -f "$jd/released" ]; then
          # A GPU is handed on only once the job's processes let go of its memory: vLLM asserts
          # that no other process frees memory on its GPU while it profiles at start.
          local mem; mem=$(gpu_mem_mib "$g")
          if [ "$DRYRUN" = 1 ] || [ -z "$mem" ] || (( mem < 2048 )) || (( now - $(cat "$jd/end") > 90 )); then
            touch "$jd/released"
          else busy+="$g "; fi
        fi
      done
    done
    for n in "${NAMES[@]}"; do  # start what can start, in priority order
      st=$(jstate "$n")
      ended "$st" && continue
      left=1
      [ "$st" = pending ] || continue
      local ok=1 d dn why=""
      for d in $(tr ',' ' ' <<< "${DEPS[$n]}"); do
        [ "$d" = - ] && continue
        dn=${d#\~}; local dst; dst=$(jstate "$dn")
        if [ "$d" != "$dn" ]; then ended "$dst" || ok=0
        elif [ "$dst" != "done" ]; then ok=0; ended "$dst" && why="$dn $dst"; fi
      done
      if [ -n "$why" ]; then
        mkdir -p "$W/jobs/$n"; echo skipped > "$W/jobs/$n/state"; echo "skipped: $why" > "$W/jobs/$n/log"
        echo "$(date -u +%T) $n skipped ($why)"; continue
      fi
      (( ok )) || continue
      local res=${RES[$n]} pick="" cores=""
      if (( NGPU < 2 )); then
        if [ "$res" = g0+g1 ]; then
          mkdir -p "$W/jobs/$n"; echo skipped > "$W/jobs/$n/state"; echo "skipped: needs 2 GPUs" > "$W/jobs/$n/log"; continue
        fi
        [ "$res" = cpu ] || res=g0
      fi
      case $res in
        cpu) pick=none; cores=$POOL ;;
        g0+g1) [[ $busy != *" 0 "* && $busy != *" 1 "* ]] && { pick=0,1; cores=$LANE0${LANE0:+,}$LANE1; } ;;
        *) local c
           for c in $(tr ',' ' ' <<< "$res"); do
             c=${c#g}
             if [[ $busy != *" $c "* ]]; then pick=$c; [ "$c" = 0 ] && cores=$LANE0 || cores=$LANE1; break; fi
           done ;;
      esac
      [ -n "$pick" ] || continue
      [ "$pick" = none ] && pick=""
      start_job "$n" "$pick" "$cores"
      for c in $(tr ',' ' ' <<< "$pick"); do busy+="$c "; done
    done
    (( left )) || break
    sleep "$TICK"
  done
  echo finished > "$W/sched.state"
  echo "$(date -u +%T) all jobs ended"
  $PY "$R/scripts/device/issue9_helper.py" summary "$W" > /dev/null 2>&1
}

run_job() {  # (in its own session) DIR NAME GPUS
  paths "$1"; cd "$R" || exit 1
  local n=$2
  export JD=$W/jobs/$n CUDA_VISIBLE_DEVICES=$3
  echo $$ > "$JD/pgid"
  if [ -z "$3" ] && [ -s "$W/cpusets" ]; then  # CPU job: threads for its share of the pool
    local pool; pool=$(awk '{print $3}' "$W/cpusets" | tr ',' '\n' | wc -l)
    export OMP_NUM_THREADS=$(( pool / 2 > 1 ? pool / 2 : 2 ))
  fi
  echo "[$n] $(date -u '+%F %T') UTC on $(hostname), CUDA_VISIBLE_DEVICES='$3', cores $(cat "$JD/cores")"
  "j_$n"
  local rc=$?
  echo "[$n] $(date -u '+%F %T') UTC exit $rc"
  echo $rc > "$JD/rc.partial"; mv "$JD/rc.partial" "$JD/rc"
  exit $rc
}

# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------
sched_alive() { [ -f "$W/sched.pid" ] && kill -0 "$(cat "$W/sched.pid")" 2>/dev/null; }

start() {
  [ -n "${1:-}" ] || die "usage: start DIR [JOB_TO_SKIP...]"
  local skip=" ${*:2} " n
  for n in "${@:2}"; do [ -n "${RES[$n]:-}" ] || die "no job named $n (see: plan DIR)"; done
  mkdir -p "$1"; paths "$1"
  sched_alive && die "a scheduler already runs for $W (pid $(cat "$W/sched.pid")); use status or stop"
  local src; src=$(cd "$(dirname "$SELF")/../.." && pwd)
  [ -f "$src/benchmarks/bench_e2e.py" ] || die "run from the repository ($src has no benchmarks/bench_e2e.py)"
  # A snapshot of the repo: the device's working tree is replaced by every call.
  rm -rf "$W/repo.new"; mkdir -p "$W/repo.new"
  (cd "$src" && tar -cf - --exclude=./.git --exclude=./.venv --exclude=./.scratch .) | tar -xf - -C "$W/repo.new" \
    || die "could not copy the repo into $W/repo.new"
  rm -rf "$R"; mv "$W/repo.new" "$R"
  mkdir -p "$W/jobs" "$CK" "$RUNS" "$RESD"
  # A new start re-runs every job that did not succeed (checkpoints already made are kept).
  for n in "${NAMES[@]}"; do
    [ "$(jstate "$n")" = "done" ] && continue
    rm -rf "$W/jobs/$n"
    if [[ $skip == *" $n "* ]]; then
      mkdir -p "$W/jobs/$n"; echo skipped > "$W/jobs/$n/state"; echo "skipped: named at start" > "$W/jobs/$n/log"
    fi
  done
  : > "$W/jobs.list"
  for n in "${NAMES[@]}"; do printf '%s\t%s\t%s\t%s\n' "$n" "${RES[$n]}" "${DEPS[$n]}" "${LIM[$n]}" >> "$W/jobs.list"; done
  [ -s "$W/launch_time" ] || date +%s > "$W/launch_time"  # a restart keeps the first launch time
  cd "$R" || die "no $R"
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
  unset W4A8_MXFP4_ACTIVATIONS W4A8_MXFP4_KERNEL W4A8_MXFP4_DYNAMIC_SCHEME
  local ngpu=2 name=""
  if [ "$DRYRUN" = 1 ]; then
    ngpu=${W4A8_ISSUE9_NGPU:-2}
  else
    set +u
    # shellcheck disable=SC1091
    source scripts/gpu_kit_env.sh || die "scripts/gpu_kit_env.sh failed (is .kit carried?)"
    set -u
    $PY - <<'EOF' || die "the environment lacks packages (run the pip/.whl + gpu_kit_env.sh prefix first)"
import importlib.util as u, sys
missing = [m for m in ("vllm", "compressed_tensors", "loguru", "transformers", "safetensors",
                       "matplotlib", "openai", "w4a8_backend") if u.find_spec(m) is None]
sys.exit(f"missing: {missing}" if missing else 0)
EOF
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || ngpu=0
    (( ngpu >= 1 )) || die "no GPU visible to nvidia-smi"
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | head -1)
  fi
  echo "$ngpu" > "$W/ngpu"
  local suf; suf=$(tr 'A-Z' 'a-z' <<< "$name" | grep -o 'h[0-9]\{3\}' | head -1 || true); echo "${suf:-h200}" > "$W/gpu_suffix"
  paths "$W"
  $PY scripts/device/issue9_helper.py cpusets > "$W/cpusets" 2>/dev/null || : > "$W/cpusets"
  # What collect copies, most wanted first (8 at most; summary.md holds every table and failure).
  printf '%s\n' summary.md "$STEM_MOE.md" "$STEM_MOE.json" "$STEM_8B.md" "$STEM_8B.json" \
    "$STEM_TP2.json" "vllm_gpu_moe_${SUF}x2.json" "$STEM_MOE.png" "$STEM_8B.png" "$STEM_TP2.md" \
    "$STEM_TP2.png" > "$W/collect.list"
  {
    echo "host $(hostname), $(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p')), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
    echo "CPU sets (GPU0 lane / GPU1 lane / CPU pool): $(cat "$W/cpusets")"
    [ "$DRYRUN" = 1 ] || nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
    df -h "$W" | tail -1
    echo "repo snapshot: $(cd "$src" && git rev-parse --short HEAD 2>/dev/null) $(cd "$src" && git status --short 2>/dev/null | wc -l) changed files"
    echo "python: $($PY -c 'import sys; print(sys.version.split()[0])'); PYTHONPATH=${PYTHONPATH:-}"
  } > "$W/env.txt" 2>&1
  local free; free=$(df -BG --output=avail "$W" | tail -1 | tr -dc 0-9)
  (( free >= 60 )) || echo "WARNING: $free GiB free under $W; the checkpoints need about 55 GB"
  setsid nohup bash "$R/scripts/device/issue9_runs.sh" _sched "$W" > "$W/sched.log" 2>&1 < /dev/null &
  echo $! > "$W/sched.pid"
  echo "[issue9] started: scheduler pid $(cat "$W/sched.pid"), $ngpu GPU(s), work in $W"
  cat "$W/env.txt"
}

status() {
  [ -n "${1:-}" ] || die "usage: status DIR [WAIT_S]"
  paths "$1"
  [ -f "$W/jobs.list" ] || die "nothing started in $W"
  local wait=${2:-0} t0; t0=$(date +%s)
  while (( $(date +%s) - t0 < wait )) && [ "$(cat "$W/sched.state" 2>/dev/null)" != finished ] && sched_alive; do
    sleep 10
  done
  if [ "$(cat "$W/sched.state" 2>/dev/null)" != finished ] && ! sched_alive; then
    echo "[issue9] WARNING: the scheduler is not running (see $W/sched.log)"
  fi
  $PY "$(dirname "$SELF")/issue9_helper.py" summary "$W"
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | sed 's/^/  GPU /'
  df -h "$W" | tail -1 | sed 's/^/  disk /'
  echo "  scheduler log:"; tail -n 5 "$W/sched.log" 2>/dev/null | sed 's/^/    /'
}

collect() {
  [ -n "${1:-}" ] && [ -n "${2:-}" ] || die "usage: collect DIR OUTDIR"
  paths "$1"
  $PY "$(dirname "$SELF")/issue9_helper.py" collect "$W" "$2"
}

stop() {
  [ -n "${1:-}" ] || die "usage: stop DIR"
  paths "$1"
  if sched_alive; then kill "$(cat "$W/sched.pid")"; echo "scheduler $(cat "$W/sched.pid") stopped"; fi
  local n
  for n in "${NAMES[@]}"; do
    if [ "$(jstate "$n")" = running ]; then finish "$n" 143 "(stopped)"; fi
  done
  echo stopped > "$W/sched.state"
}

plan() {
  [ -n "${1:-}" ] || die "usage: plan DIR"
  paths "$1"; DRYRUN=1; DRY_SLEEP=0; JD=$(mktemp -d); CUDA_VISIBLE_DEVICES="<gpu>"
  local n
  printf '%-15s %-6s %-45s %s\n' job resources deps limit_s
  for n in "${NAMES[@]}"; do printf '%-15s %-6s %-45s %s\n' "$n" "${RES[$n]}" "${DEPS[$n]}" "${LIM[$n]}"; done
  for n in "${NAMES[@]}"; do echo; echo "[$n]"; (cd "$(dirname "$SELF")/../.." && "j_$n") 2>&1 | grep '^+ '; done
  rm -rf "$JD"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  status) status "${2:-}" "${3:-0}" ;;
  collect) collect "${2:-}" "${3:-}" ;;
  stop) stop "${2:-}" ;;
  plan) plan "${2:-}" ;;
  _sched) sched "$2" ;;
  _job) run_job "$2" "$3" "${4:-}" ;;
  *) sed -n '2,16p' "$SELF"; exit 2 ;;
esac
