"""Run the reference ``rwkv`` pip package (0.8.32) in this process and print golden values as JSON.

Used by the golden tests through a subprocess, since the reference picks its code paths from environment
variables read at import (``RWKV_JIT_ON=0``; ``RWKV_V7_ON=1`` for RWKV-7), so one process can hold only
one kind of model. Input (stdin, JSON): {"model": path, "strategy": s, "v7": bool, "jobs": [...]}, each job
{"prompt": [ids], "full_output": bool, "greedy": n} -> {"logits": [...], "full": [[...]], "greedy": [ids]}.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    req = json.load(sys.stdin)
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the reference prints banners to stdout
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    if req.get("v7"):
        os.environ["RWKV_V7_ON"] = "1"
    if req.get("deep_embed"):
        os.environ["RWKV_DE_VERSION"] = "1"
    import torch

    torch.set_num_threads(1)  # tiny models: threads only add contention
    from rwkv.model import RWKV

    path = req["model"]
    if req.get("v7") and path.endswith(".pth"):
        path = path[:-4]  # the reference's v7 class appends ".pth" itself
    model = RWKV(model=path, strategy=req["strategy"], verbose=False) if not req.get("v7") else \
        RWKV(model=path, strategy=req["strategy"])
    out = []
    with torch.no_grad():
        for job in req["jobs"]:
            res = {}
            prompt = job["prompt"]
            logits, state = model.forward(list(prompt), None, full_output=job.get("full_output", False))
            if job.get("full_output"):
                if logits.dim() == 1:  # the reference returns [vocab] for one token even with full_output
                    logits = logits.unsqueeze(0)
                res["full"] = logits.float().tolist()
                logits = logits[-1]
            res["logits"] = logits.float().tolist()
            greedy = []
            for _ in range(job.get("greedy", 0)):
                tok = int(torch.argmax(logits))
                greedy.append(tok)
                logits, state = model.forward([tok], state)
            res["greedy"] = greedy
            out.append(res)
    json.dump(out, real_stdout)


if __name__ == "__main__":
    main()
