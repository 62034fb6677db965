"""Out of memory: a daemon under an address-space limit (RLIMIT_AS, set by this harness) is asked to load
a checkpoint too big for it; the client gets the typed "OOM" failure and the daemon serves on."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch

from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon.client import Client, GenerationFailed

from .conftest import env_for, make_home, wait_for

#: address space granted beyond what a process with the daemon's imports and a tiny model needs
HEADROOM = 640 * 2**20

_PROBE = """
import json, torch, zmq, msgspec
import rwkv_chat.daemon.server, rwkv_chat.daemon.scheduler, rwkv_chat.daemon.generation, rwkv_chat.daemon.host
from rwkv_chat.models import RWKV
from rwkv_chat.models.rwkv.decode import BatchDecoder
m = RWKV(model={path!r}, strategy="cpu fp32", verbose=False)
d = BatchDecoder(m, max_batch=16)
d.step({{d.add(): 1}})
peak = [l for l in open("/proc/self/status") if l.startswith("VmPeak:")][0].split()[1]
print(json.dumps(int(peak) * 1024))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc")
def test_oom_on_load_is_typed_and_the_daemon_serves_on(tmp_path, model_path):
    from rwkv_chat.models.rwkv.shapes import random_checkpoint, save_pth

    tiny = model_path("5.2")
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(path=str(tiny))], capture_output=True, text=True,
                           timeout=120, check=True)
    limit = json.loads(probe.stdout.strip().splitlines()[-1]) + HEADROOM
    # RWKV-7 0.1B in fp16 (~380 MB on disk): mapping it and widening to fp32 needs ~1.1 GB more
    big = save_pth(random_checkpoint("0.1B", dtype=torch.float16), tmp_path / "big.pth")
    assert big.stat().st_size > HEADROOM / 2

    home = make_home(tmp_path / "h")
    paths = home_paths(home)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen([sys.executable, "-m", "rwkv_chat.daemon"], env=env_for(home), preexec_fn=limit_memory,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: paths.connection_file.exists(), timeout=60)
        with Client(paths, autostart=False, timeout=30) as c:
            with pytest.raises(GenerationFailed) as ei:
                list(c.load(str(big), "cpu fp32"))
            assert ei.value.kind == "OOM", ei.value
            assert c.ping() and proc.poll() is None
            events = list(c.load(str(tiny), "cpu fp32"))
            assert isinstance(events[-1], m.Done) and events[-1].reason == "loaded"
            done = list(c.complete("After the failure", max_tokens=8))[-1]
            assert isinstance(done, m.Done) and done.tokens == 8
            assert c.status()["model"]["path"] == str(tiny)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
