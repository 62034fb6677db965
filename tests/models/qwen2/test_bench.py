"""``rwkv-chat bench --family qwen2`` on a CPU: the table with ours and the transformers peer."""

from __future__ import annotations

from rwkv_chat.app import cli


def test_bench_family_qwen2_prints_the_table(capsys):
    assert cli.main(["bench", "--family", "qwen2", "--shape", "tiny", "--strategy", "cpu fp32", "--batch", "1", "2",
                     "--prompt-len", "16", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| Qwen2 tiny")]
    assert [r.split("|")[2].strip() for r in rows] == ["decode b=1", "decode b=2", "prefill 16"]
    assert rows[0].rstrip(" |").endswith("x")            # ours / transformers
    assert "--family qwen2" in out and "ceilings: copy" in out
