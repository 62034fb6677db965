#!/bin/bash
# The weight formats' peer: the FP8 / INT8 RWKV-7 engine of rwkv-quant-nv 1.2.1 (MIT; its Albatross-class engine
# with W8A8 fp8 / int8 products) on random RWKV-7 weights of an official shape, for the side-by-side with
# bench/formats.py in the same device call.
#
#   bash bench/quant_peers.sh [SHAPE ...]      # 0.1B 1.5B 2.9B 7.2B (default: 1.5B 7.2B)
#
# Needs the peers folder beside the checkout copied in as .peers (as for .peers/run_peers.sh: its wheel and
# make_v7.py). Per shape: the bf16 model (the peer's own baseline), then `rwkv-quant q -s fp8` and
# `-s int8_symmetric` of it, each timed by the engine's own benchmark (CUDA graphs, dense channel-mix: a
# quantized model turns its sparse mode off). Prints one Markdown table:
# engine | shape | scheme | case (BxT) | ms p50 | tok/s | × bf16.
set -u
P=${PEERS:-.peers}
[ -f "$P/make_v7.py" ] && ls "$P"/rwkv_quant_nv-*.whl >/dev/null 2>&1 || { echo "quant_peers.sh: no $P (copy ../shared/peers there)" >&2; exit 2; }
SHAPES=${*:-"1.5B 7.2B"}
S=${PEER_SCRATCH:-/tmp/peer-scratch}; mkdir -p "$S"
SITE=/tmp/peer-site; mkdir -p $SITE
[ -d $SITE/rq/rwkv_quant ] || python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE/rq "$P"/rwkv_quant_nv-*.whl || exit 1
export TORCH_EXTENSIONS_DIR=/tmp/peer-ext MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
dims() { case $1 in 0.1B) echo "12 768";; 0.4B) echo "24 1024";; 1.5B) echo "24 2048";; 2.9B) echo "32 2560";; 7.2B) echo "32 4096";; *) echo "";; esac; }
echo "## rwkv-quant-nv (the weight formats' peer)"; echo
echo "command: \`bash bench/quant_peers.sh $SHAPES\`"; echo
echo "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1); $(date -u '+%Y-%m-%d %H:%M UTC')"; echo
echo "| engine | shape | scheme | case (BxT) | ms p50 | tok/s | × bf16 |"
echo "|---|---|---|---|---|---|---|"
for shape in $SHAPES; do
  d=$(dims $shape); [ -n "$d" ] || { echo "unknown shape $shape" >&2; continue; }
  f=$S/m_$shape.pth; fb=$S/m_${shape}_bf16.pth
  [ -f $f ] || python3 "$P/make_v7.py" $f $d >/dev/null
  [ -f $fb ] || python3 -c "import torch,sys; z=torch.load(sys.argv[1]); torch.save({k:v.bfloat16() for k,v in z.items()}, sys.argv[2])" $f $fb
  declare -A base=()
  for scheme in bf16 fp8 int8_symmetric; do
    m=$fb
    if [ $scheme != bf16 ]; then
      m=$S/m_${shape}_$scheme.pth
      [ -f $m ] || ( cd $SITE/rq && timeout ${PEER_TIMEOUT:-400} python3 -m rwkv_quant q -m $fb -o $m -s $scheme >/dev/null 2>&1 ) \
        || { echo "| rwkv-quant-nv | $shape | $scheme | quantize failed | | | |"; continue; }
    fi
    ( cd $SITE/rq && timeout ${PEER_TIMEOUT:-400} python3 rwkv7_fast_v3a.py --model $m --cases ${PEER_CASES:-1x1,64x1} \
        --warmup 3 --iters 20 --cmix-sparse off 2>&1 ) | grep -E "^RESULT" | \
      sed -E "s/RESULT B=([0-9]+) T=([0-9]+) .*p50_ms=([0-9.]+) .*tok_s_p50=([0-9.]+).*/\1x\2 \3 \4/" > $S/r.txt
    while read -r case ms toks; do
      [ $scheme = bf16 ] && base[$case]=$toks
      ratio=$(python3 -c "import sys; b=sys.argv[2]; print(f'{float(sys.argv[1]) / float(b):.2f}×' if b else '')" "$toks" "${base[$case]:-}")
      echo "| rwkv-quant-nv 1.2.1 | $shape | $scheme | $case | $ms | $toks | $ratio |"
    done < $S/r.txt
  done
  unset base
done
