#!/bin/bash
# A/B of the working tree against a base commit, on one GPU machine, in one call:
#   bash bench/ab.sh [BASE] [STEP...]          BASE: a commit (default HEAD~1); STEP: checks b01 b15 b72 (default all)
# Builds two git worktrees under $AB_DIR (default /tmp/rwkv-ab): "old" at BASE, "new" at HEAD plus the
# working tree's changes (the tracked diff against HEAD and the untracked files git does not ignore). Each
# gets its own /tmp-side package shim (rwkv_chat -> that tree's models, app, daemon, csrc, as
# bench/device_run.sh maps it). Steps:
#   checks         on the new tree: the kernel checks (tests/gpu/verify_kernels.py) and the fused-path checks
#                  (tests/gpu/verify_fused.py)
#   b01 b15 b72    on both trees, the decode/prefill rows of device_run.sh's steps of the same names
#                  (python3 -m rwkv_chat.app.bench ...), old and new taking turns going first
#   b72i4 b72f8 b15i4   the same for the weight formats' decode (cuda fp16i4 / fp16f8, batch 1 [and 4])
# then prints the rows side by side, new/old per number, and flags every ratio outside +-3%.
# $OUT (default /tmp/ab-out) receives the logs, the tables, <tree>-<row>.jsonl and ab.md (the comparison).
# Wheels in .whl/ (as device_run.sh carries them) are installed to /tmp/site first, if there are any.
# Under a per-call time limit, split the steps over calls (e.g. `checks`, then `b01 b15`, then `b72`): each call
# builds the worktrees again, the kernel builds stay in the cache.
set -uo pipefail
BASE=${1:-HEAD~1}; shift || true
STEPS=" ${*:-checks b01 b15 b72} "
ROOT=$(git rev-parse --show-toplevel 2>/dev/null) || { echo "bench/ab.sh: run it inside the git checkout"; exit 1; }
cd "$ROOT" || exit 1
OLD_REV=$(git rev-parse --verify --quiet "$BASE^{commit}") || { echo "bench/ab.sh: no commit '$BASE'"; exit 1; }
NEW_REV=$(git rev-parse HEAD)
mkdir -p "${OUT:=/tmp/ab-out}" "${AB_DIR:=/tmp/rwkv-ab}" || exit 1
OUT=$(cd "$OUT" && pwd); AB=$(cd "$AB_DIR" && pwd)   # absolute: the steps run inside the worktrees

cleanup() {
    git -C "$ROOT" worktree remove --force "$AB/old" >/dev/null 2>&1
    git -C "$ROOT" worktree remove --force "$AB/new" >/dev/null 2>&1
    git -C "$ROOT" worktree prune
}
cleanup; rm -rf "$AB/old" "$AB/new" "$AB/shim-old" "$AB/shim-new"
trap cleanup EXIT
git worktree add --quiet --detach "$AB/old" "$OLD_REV" || exit 1
git worktree add --quiet --detach "$AB/new" "$NEW_REV" || exit 1
if ! git diff --quiet HEAD; then
    git diff --binary HEAD | git -C "$AB/new" apply --whitespace=nowarn || { echo "bench/ab.sh: the working tree's diff did not apply"; exit 1; }
fi
git ls-files --others --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$AB/new" || exit 1

for t in old new; do
    mkdir -p "$AB/shim-$t/rwkv_chat" && touch "$AB/shim-$t/rwkv_chat/__init__.py"
    for d in models app daemon csrc; do ln -sfn "$AB/$t/$d" "$AB/shim-$t/rwkv_chat/$d"; done
done
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    SITE=":/tmp/site"
fi
export PYTHONUNBUFFERED=1

in_tree() {  # in_tree old|new CMD...: run CMD in that worktree with its package shim first on the path
    local t=$1; shift
    ( cd "$AB/$t" && PYTHONPATH="$AB/shim-$t$SITE" "$@" )
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
in_tree new python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
for t in old new; do   # each tree must import its own package, not an installed one
    echo "$t: $(git -C "$AB/$t" log -1 --format='%h %s' | cut -c1-100)"
    in_tree "$t" python3 -c 'import os, rwkv_chat.models as m; print("   rwkv_chat.models from", os.path.realpath(m.__path__[0]))'
done

CHECKS=""
if [[ "$STEPS" == *" checks "* ]]; then
    in_tree new python3 tests/gpu/verify_kernels.py --out "$OUT/verify_kernels.md" > "$OUT/verify_kernels.log" 2>&1
    rc_k=$?
    in_tree new python3 tests/gpu/verify_fused.py --out "$OUT/verify_fused.md" > "$OUT/verify_fused.log" 2>&1
    rc_f=$?
    CHECKS="kernel checks: $(tail -1 "$OUT/verify_kernels.md" 2>/dev/null || echo 'no table') (rc $rc_k); "
    CHECKS+="fused-path checks: $(tail -1 "$OUT/verify_fused.md" 2>/dev/null || echo 'no table') (rc $rc_f)"
    echo "$CHECKS"
fi

declare -A ROW=(
    [b01]="--shape 0.1B --batch 1 --prompt-len 1024 --tokens 300"
    [b15]="--shape 1.5B --batch 1 --prompt-len 1024 --tokens 200"
    [b72]="--shape 7.2B --batch 1 64 --prompt-len 1024 --tokens 100"
    [b72i4]="--shape 7.2B --strategy 'cuda fp16i4' --batch 1 4 --prompt-len 0 --tokens 100"
    [b72f8]="--shape 7.2B --strategy 'cuda fp16f8' --batch 1 4 --prompt-len 0 --tokens 100"
    [b15i4]="--shape 1.5B --strategy 'cuda fp16i4' --batch 1 --prompt-len 0 --tokens 200"
)
ROWS=""
turn=0
for r in b01 b15 b72 b72i4 b72f8 b15i4; do
    [[ "$STEPS" == *" $r "* ]] || continue
    ROWS+=" $r"
    if (( turn++ % 2 == 0 )); then order="old new"; else order="new old"; fi
    for t in $order; do
        rm -f "$OUT/$t-$r.jsonl"
        echo "=== $t $r: python3 -m rwkv_chat.app.bench ${ROW[$r]}"
        eval "args=(${ROW[$r]})"    # the row's flags as shell words (a quoted strategy stays one)
        in_tree "$t" timeout 900 python3 -m rwkv_chat.app.bench --md "$OUT/$t-bench.md" --json "$OUT/$t-$r.jsonl" "${args[@]}" \
            > "$OUT/$t-$r.log" 2>&1 || echo "    rc=$? (see $OUT/$t-$r.log)"
    done
done

python3 - "$OUT" "$OLD_REV" "$NEW_REV" "$CHECKS" $ROWS <<'EOF'
import json, sys
from pathlib import Path

out, old_rev, new_rev, checks, rows = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]


def load(tree, row):
    f = out / f"{tree}-{row}.jsonl"
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1]) if lines else None


def numbers(res):
    """(label, value) of every rate a bench result holds: decode per batch (host loop, device greedy), prefill."""
    if not res:
        return {}
    got = {}
    for d in res.get("decode") or []:
        got[f"decode batch {d['batch']}, tok/s"] = d.get("tok_s")
        if d.get("greedy_tok_s"):
            got[f"decode batch {d['batch']}, greedy on device, tok/s"] = d["greedy_tok_s"]
    pre = res.get("prefill")
    if pre:
        got[f"prefill {pre['prompt_len']} tokens, tok/s"] = pre.get("tok_s")
    return got


lines = [f"old = {old_rev[:10]}, new = {new_rev[:10]} + the working tree's changes", ""]
if checks:
    lines += [checks, ""]
lines += ["| row | number | old | new | new/old | |", "|---|---|---|---|---|---|"]
outside = 0
for row in rows:
    o, n = load("old", row), load("new", row)
    name = (n or o or {}).get("model", row)
    a, b = numbers(o), numbers(n)
    if not a and not b:
        lines.append(f"| {row} | - | missing | missing | - | **no result (see the logs)** |")
        outside += 1
    for label in list(dict.fromkeys([*a, *b])):
        x, y = a.get(label), b.get(label)
        if x and y:
            ratio = y / x
            flag = "" if abs(ratio - 1) <= 0.03 else ("**faster, outside +-3%**" if ratio > 1 else "**slower, outside +-3%**")
            outside += bool(flag)
            cells = f"{x:.1f} | {y:.1f} | {ratio:.3f} | {flag}"
        else:
            cells = f"{x and f'{x:.1f}' or 'missing'} | {y and f'{y:.1f}' or 'missing'} | - | **not compared**"
            outside += 1
        lines.append(f"| {row}: {name} | {label} | {cells} |")
lines += ["", f"{outside} number(s) outside +-3% or missing"]
text = "\n".join(lines)
print(text)
(out / "ab.md").write_text(text + "\n")
EOF
