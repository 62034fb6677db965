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


def test_bench_family_qwen2_gemv_choices_on_a_cpu(capsys):
    """--gemv compiled (not the default: the model re-chooses its products) on a CPU strategy: the CUDA-only products
    do not serve, the torch ops do, the table prints; an unknown choice is one usage line (exit 2)."""
    assert cli.main(["bench", "--family", "qwen2", "--shape", "tiny", "--strategy", "cpu fp32", "--batch", "1",
                     "--prompt-len", "0", "--tokens", "2", "--no-peer", "--gemv", "compiled"]) == 0
    assert "| Qwen2 tiny (random) | decode b=1 |" in capsys.readouterr().out
    try:
        cli.main(["bench", "--family", "qwen2", "--shape", "tiny", "--gemv", "fast"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown --gemv was accepted")
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_use_kernels_refuses_an_unknown_gemv(qwen_folders):
    import pytest

    from rwkv_chat.models.qwen2.model import Qwen2

    model = Qwen2(qwen_folders["untied"][0], "cpu fp32")
    with pytest.raises(ValueError, match="gemv must be one of"):
        model.use_kernels(gemv="fast")
