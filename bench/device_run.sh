#!/bin/bash
# One GPU device call: installs the carried wheels (.whl: platformdirs, pyzmq, msgspec, pyrwkv-tokenizer, rwkv 0.8.32), starts the
# reference's CUDA extension build in the background, builds and verifies our kernels, verifies
# the fused RWKV-7 paths, runs the benchmark rows, then the comparisons with the reference.
#   bash bench/device_run.sh [BUDGET_SECONDS] [STEP...]      (default 560 s; steps: see `step` lines below)
# Steps run in the order the command line names them (unknown names are reported), each skipped once the time budget
# runs short; our kernels are built and checked before the first step that needs them. Everything lands in $OUT: each
# step's table (headed
# by its command and machine line), bench.jsonl, and $OUT/<gpu>.md = bench/results/<gpu>.md with the
# sections of the steps taken replaced (bench/assemble.py): copy it over bench/results/<gpu>.md.
# The tables name the source tree from git; a copy without .git names none.
BUDGET=${1:-560}; shift || true
STEPS=${*:-"kernels fused kbench b01 b15 b72 b72i8 b15i8 pip cmp"}   # also: vpers pstep gemvq gbench daemon daemons daemonsp vsamp sparse b72sp b15sp b01sp b72x256 fbenchb fbenchf peers ops opsbench prenorm qwen formats qb15 qb15ours fbench qpeers qb7 tree pcache qprof fprof ...
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/shim/rwkv_chat && touch /tmp/shim/rwkv_chat/__init__.py
for d in models app daemon csrc; do ln -sfn "$PWD/$d" /tmp/shim/rwkv_chat/$d; done
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/rwkv_ext
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
[[ " $STEPS " == *" pip "* || " $STEPS " == *" cmp "* ]] && ( cd /tmp && RWKV_V7_ON=1 RWKV_CUDA_ON=1 MAX_JOBS=6 python3 -c 'import rwkv.model' > "$OUT/ref_build.log" 2>&1; echo "reference build rc=$? at ${SECONDS}s" >> "$OUT/ref_build.log" ) &
REF=$!
B="python3 -m rwkv_chat.app.bench --md $OUT/bench.md --json $OUT/bench.jsonl"
declare -A NEED TMO CMD
step() {  # step NAME NEED_SECONDS TIMEOUT CMD...: defines a step (run below, in the order of $STEPS)
    local name=$1; NEED[$name]=$2; TMO[$name]=$3; shift 3
    CMD[$name]=$(printf '%q ' "$@")
}
run_step() {
    local name=$1
    [[ -n ${CMD[$name]:-} ]] || { echo "=== unknown step $name"; return 0; }
    if (( SECONDS + NEED[$name] > BUDGET )); then echo "=== skip $name (t=${SECONDS}s)"; return 0; fi
    case $name in kernels|gemvq|gbench) ;; *) ensure_kernels || exit 1 ;; esac
    case $name in pip|cmp) wait_ref ;; esac
    echo "=== $name (t=${SECONDS}s): ${CMD[$name]}"
    eval "timeout ${TMO[$name]} ${CMD[$name]}" 2>&1 | grep -v "^$" | grep -v "UserWarning\|warnings.warn"
    echo "=== $name rc=${PIPESTATUS[0]} (t=${SECONDS}s)"
}
KERNELS_OK=
ensure_kernels() {  # once: our kernels built, the fused RWKV-7 family among them
    [[ -n $KERNELS_OK ]] && return 0
    python3 -c 'from rwkv_chat.models import kernels; import sys; s=kernels.ensure_built("cuda"); print(s); sys.exit(0 if s["v7fused"]=="ok" else 1)' || { echo "our kernels did not build"; return 1; }
    KERNELS_OK=1
}
REF_DONE=
wait_ref() {  # once: the reference's CUDA build, started in the background above
    [[ -n $REF_DONE ]] && return 0
        REF_DONE=1
}
step kernels 200 300 python3 tests/gpu/verify_kernels.py --out "$OUT/verify_kernels.md"
step gemvq 120 300 python3 tests/gpu/verify_kernels.py --family gemvq --out "$OUT/verify_gemvq.md"
step gbench 90 300 python3 bench/kernels.py --only gemvq --out "$OUT/gemvq_bench.md"
step fused 60 150 python3 tests/gpu/verify_fused.py --out "$OUT/verify_fused.md"
step ops 120 330 python3 tests/gpu/verify_ops.py --out "$OUT/verify_ops.md"
step opsbench 120 300 python3 bench/ops.py --out "$OUT/ops_bench.md"
step kbench 60 200 python3 bench/kernels.py --ref-src /tmp/site/rwkv/cuda --out "$OUT/kernels_bench.md"
step sparse 60 300 python3 bench/sparse_ffn.py --tiles --out "$OUT/sparse_ffn.md"
step prof 60 200 python3 bench/prefill_profile.py --shape 1.5B --prompt-len 1024 --out "$OUT/prefill_profile.md"
step b15 60 150 $B --shape 1.5B --batch 1 --prompt-len 1024 --tokens 200
step qwen 60 180 python3 tests/gpu/verify_qwen2.py --shapes tiny 1.5B --dtypes bf16 --out "$OUT/verify_qwen2.md"
step formats 40 120 python3 tests/gpu/verify_formats.py --shape 0.1B --out "$OUT/verify_formats.md"
step qb15 60 150 python3 -m rwkv_chat.app.bench --md "$OUT/qwen_bench.md" --family qwen2 --shape 1.5B --strategy "cuda bf16" --batch 1 64 --prompt-len 1024 --tokens 100
step fbench 120 240 python3 bench/formats.py --shapes 1.5B 7.2B --batch 1 --tokens 100 --sweep --out "$OUT/formats_bench.md"
step fbenchf 120 300 python3 bench/formats.py --shapes 7.2B 1.5B --batch 2 3 4 --tokens 30 --skip-ops --i4-gemm tensor-cores triton --out "$OUT/formats_few.md"
step fbenchb 150 300 python3 bench/formats.py --shapes 7.2B --batch 16 64 128 --tokens 20 --skip-ops --i4-gemm tensor-cores triton --i8-gemm tensor-cores tensor-cores-stack triton --out "$OUT/formats_batches.md"
step vf72i4 90 300 python3 tests/gpu/verify_fused.py --shape 7.2B --strategies "cuda fp16i4" --out "$OUT/verify_fused_72.md"
step qpeers 150 500 bash -c 'bash bench/quant_peers.sh 1.5B 7.2B | tee "$0"' "$OUT/quant_peers.md"
step prenorm 120 300 python3 bench/ops.py --prenorm --sweep --out "$OUT/prenorm_bench.md"
step qb15ours 50 150 python3 -m rwkv_chat.app.bench --md "$OUT/qwen_bench.md" --family qwen2 --shape 1.5B --strategy "cuda bf16" --batch 1 --prompt-len 0 --tokens 100 --no-peer --gemv triton
step kgemv 60 200 python3 tests/gpu/verify_kernels.py --family gemv_group mm8 --out "$OUT/verify_gemv_group.md"
step kwkv 60 240 bash -c 'python3 tests/gpu/verify_kernels.py --family wkv5 wkv6 gemm --out "$0" && python3 bench/kernels.py --only wkv --out "$1"' "$OUT/verify_wkv56.md" "$OUT/wkv_bench.md"
step kwkv7 60 300 bash -c 'python3 tests/gpu/verify_kernels.py --family wkv7 --out "$0" && python3 bench/kernels.py --only wkv --out "$1"' "$OUT/verify_wkv7.md" "$OUT/wkv_bench.md"
step pre7 150 400 bash -c "for s in 1.5B 7.2B 0.1B; do for k in tensor-cores cuda-cores; do $B --shape \$s --batch 1 --prompt-len 1024 --tokens 20 --wkv7-chunk \$k || exit 1; done; done"
step qwenc 90 240 python3 tests/gpu/verify_qwen2.py --shapes tiny 1.5B --dtypes bf16 --gemv cublas compiled-norm --out "$OUT/verify_qwen2.md"
QB="python3 -m rwkv_chat.app.bench --md $OUT/qwen_bench.md --family qwen2 --strategy cuda\ bf16 --batch 1 --prompt-len 0 --tokens 100 --no-peer"
step qb15g 80 200 bash -c "$QB --shape 1.5B --gemv cublas && $QB --shape 1.5B --gemv compiled && $QB --shape 1.5B --gemv compiled-norm"
step qb7g 120 300 bash -c "$QB --shape 7B --gemv cublas && $QB --shape 7B --gemv compiled && $QB --shape 7B --gemv compiled-norm"
step qb7 80 180 python3 -m rwkv_chat.app.bench --md "$OUT/qwen_bench.md" --family qwen2 --shape 7B --strategy "cuda bf16" --batch 1 64 --prompt-len 1024 --tokens 100
step tree 90 240 python3 bench/tree.py --shape 1.5B --strategy "cuda fp16" --repeats 3 --out "$OUT/tree.md" \
    --kernel-cache "$(python3 -c 'from rwkv_chat.models.kernels import default_cache_dir; print(default_cache_dir())')"
step pcache 40 120 python3 tests/gpu/verify_prompt_cache.py --out "$OUT/verify_prompt_cache.md"
step qprof 90 200 python3 bench/qwen2_profile.py --shape 1.5B --gemv compiled --out "$OUT/qwen2_profile.md"
step fprof 120 240 python3 bench/formats_profile.py --shape 7.2B --out "$OUT/formats_profile.md"
step fprof64 120 300 python3 bench/formats_profile.py --shape 7.2B --formats "" --batch 64 --large fused --out "$OUT/formats_profile.md"
step b01 40 100 $B --shape 0.1B --batch 1 --prompt-len 1024 --tokens 300
step vpers 40 150 python3 tests/gpu/verify_fused.py --only-persistent --out "$OUT/verify_persistent.md"
step pstep 120 400 bash -c "for s in 0.1B 1.5B; do $B --shape \$s --batch 1 --prompt-len 0 --tokens 300 && $B --shape \$s --batch 1 --prompt-len 0 --tokens 300 --persistent-step plain && $B --shape \$s --batch 1 --prompt-len 0 --tokens 300 --persistent-step ring || exit 1; done"
step fold 90 240 bash -c "$B --shape 0.1B --batch 1 --prompt-len 0 --tokens 300 && $B --shape 0.1B --batch 1 --prompt-len 0 --tokens 300 --no-fold-norms && $B --shape 1.5B --batch 1 --prompt-len 0 --tokens 200 && $B --shape 1.5B --batch 1 --prompt-len 0 --tokens 200 --fold-norms"
step b15t 60 200 bash -c "$B --shape 1.5B --batch 64 --prompt-len 0 --tokens 80 && $B --shape 1.5B --batch 64 --prompt-len 0 --tokens 80 --untuned-gemm"
step b72t 100 300 bash -c "$B --shape 7.2B --batch 64 256 --prompt-len 0 --tokens 80 && $B --shape 7.2B --batch 64 --prompt-len 0 --tokens 80 --untuned-gemm"
step daemon 150 300 python3 bench/daemon_overhead.py --shape 0.1B 1.5B --strategy "cuda fp16" --batch 1 4 --out "$OUT/daemon_overhead.md"
step daemons 150 400 python3 bench/daemon_overhead.py --shape 0.1B 1.5B --strategy "cuda fp16" --batch 1 4 --tokens 512 --repeats 2 --sampling default --out "$OUT/daemon_sampled.md"
step daemonsp 150 400 python3 bench/daemon_overhead.py --shape 0.1B 1.5B --strategy "cuda fp16" --batch 1 4 16 --tokens 512 --repeats 2 --sampling default --head-scale 5 --out "$OUT/daemon_sampled_peaked.md"
step vsamp 60 200 python3 tests/gpu/verify_sampling.py --steps 12 --out "$OUT/verify_sampling.md"
step b72 90 200 $B --shape 7.2B --batch 1 64 --prompt-len 1024 --tokens 100
step b72i8 60 150 $B --shape 7.2B --strategy "cuda fp16i8" --batch 1 --prompt-len 0 --tokens 100
step b72sp 60 150 $B --shape 7.2B --batch 1 --prompt-len 0 --tokens 100 --ffn sparse
step b72x256 60 200 $B --shape 7.2B --batch 256 --prompt-len 0 --tokens 40
# the Albatross-class peer (carry .peers, see ../shared/peers/run_peers.sh; PEER_SHAPES, PEER_CASES pick its rows)
step peers 120 500 bash -c 'PEER_CASES=${PEER_CASES:-1x1,64x1,1x1024} bash .peers/run_peers.sh ${PEER_SHAPES:-0.1B 1.5B 7.2B} | tee "$0"' "$OUT/peers.md"
step b15sp 40 100 $B --shape 1.5B --batch 1 --prompt-len 0 --tokens 200 --ffn sparse
step b01sp 30 100 $B --shape 0.1B --batch 1 --prompt-len 0 --tokens 300 --ffn sparse
step b15i8 40 100 $B --shape 1.5B --strategy "cuda fp16i8" --batch 1 --prompt-len 0 --tokens 200
step b72split 60 150 $B --shape 7.2B --batch 64 --prompt-len 0 --tokens 100 --large fused-split
step b72comp 90 200 $B --shape 7.2B --batch 64 --prompt-len 0 --tokens 100 --large compiled
step b15cublas 40 100 $B --shape 1.5B --batch 1 --prompt-len 0 --tokens 200 --gemv cublas
step b01cublas 30 100 $B --shape 0.1B --batch 1 --prompt-len 0 --tokens 300 --gemv cublas
step b72cublas 60 150 $B --shape 7.2B --batch 1 --prompt-len 0 --tokens 100 --gemv cublas
step pip 60 200 python3 tests/gpu/verify_model.py --pip-shapes ${PIP_SHAPES:-0.1B 1.5B} --out "$OUT/pip.md"
step cmp 60 200 $B --shape 1.5B --batch 1 --prompt-len 1024 --tokens 100 --compare-rwkv-pip
for name in $STEPS; do run_step "$name"; done
python3 bench/assemble.py "$OUT" --gpu "$GPU_NAME"
echo "done at ${SECONDS}s"
