"""Every `lutmm` subcommand, in-process through cli.main (and `python3 -m lutmm` once)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import lutmm  # noqa: E402
from lutmm import cli  # noqa: E402
from test_nn import tiny_llama  # noqa: E402

SUBCOMMANDS = ["quantize", "eval", "generate", "upgrade", "bench", "info", "demo"]


def _ppl(out: str) -> float:
    m = re.search(r"perplexity: ([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


@pytest.mark.parametrize("sub", [None] + SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(([sub] if sub else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lutmm" in out
    if sub is None:
        assert all(s in out for s in SUBCOMMANDS)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: lutmm" in capsys.readouterr().out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"lutmm {lutmm.__version__}" in out and f"torch {torch.__version__}" in out
    assert "build:" in out and "kernels:" in out and ("GPU" in out)


def test_python_m_lutmm_info():
    r = subprocess.run([sys.executable, "-m", "lutmm", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"lutmm {lutmm.__version__}" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_gpu(capsys):
    assert cli.main(["bench", "--quick"]) == 0
    assert capsys.readouterr().out.strip() == cli.NO_GPU_BENCH


def test_quantize_tiny_model(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_llama(tie=False).save_pretrained(str(src))
    out = tmp_path / "q"
    assert cli.main(["quantize", str(src), str(out), "--bits", "3", "--group-size", "32", "--table", "int",
                     "--absmax", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "quantized 14 linear layers to 3-bit g32 int (absmax); skipped: lm_head" in text
    assert re.search(r"quantized weights: [0-9.]+ MB \(bfloat16\) -> [0-9.]+ MB \(lutmm\), [0-9.]+x smaller", text)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lutmm" and qc["bits"] == 3 and qc["group_size"] == 32 and qc["table"] == "int"
    assert (out / "model.safetensors").is_file()


def test_quantize_fold_norms(tmp_path, capsys):
    """--fold-norms: the norms' weights move into q/k/v and gate/up before quantizing; the checkpoint's norms
    are 1 and it computes the source model up to quantization error, as the unfolded checkpoint does."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from test_layerfold import _with_norm_weights

    torch.manual_seed(0)
    model = _with_norm_weights(tiny_llama(tie=False))
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits.float()
    errs = {}
    for fold in (False, True):
        out = tmp_path / f"q{int(fold)}"
        assert cli.main(["quantize", str(src), str(out), "--bits", "4", "--group-size", "32", "--table", "nf",
                         "--quiet"] + (["--fold-norms"] if fold else [])) == 0
        text = capsys.readouterr().out
        assert ("folded into the projections of 2 layers" in text) == fold
        norms = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k.endswith("layernorm.weight")}
        assert len(norms) == 4 and all(bool(torch.all(v == 1)) == fold for v in norms.values())
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits.float()
        errs[fold] = float((got - ref).norm() / ref.norm())
    assert errs[False] < 0.3 and errs[True] < 1.25 * errs[False], errs  # random tiny model: ~0.17 both
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=256)).save_pretrained(str(tmp_path / "g"))
    assert cli.main(["quantize", str(tmp_path / "g"), str(tmp_path / "gq"), "--table", "nf", "--quiet",
                     "--fold-norms"]) == 2
    assert "--fold-norms: the model has no Llama decoder layers" in capsys.readouterr().err


def test_eval_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "lutmm", "bits": 5, "group_size": 64, "format_version": 1}}))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    assert cli.main(["eval", str(tmp_path), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "lutmm eval: error:" in err and "quantization_config.bits: got 5" in err


# ---- with mini-llama ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    from conftest import SHARED

    src = os.path.join(SHARED, "models", "mini-llama")
    if not os.path.isdir(src):
        pytest.skip(f"shared assets not found at {SHARED}")
    out = tmp_path_factory.mktemp("cli") / "mini-q4"
    assert cli.main(["quantize", src, str(out), "--bits", "4", "--group-size", "64", "--table", "nf", "--quiet"]) == 0
    return SHARED, src, out


def test_quantize_mini_llama(mini_ckpt):
    _, _, out = mini_ckpt
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lutmm" and len(qc["modules"]) == 42 and qc["skip"] == ["lm_head"]


def test_eval_bf16_and_lutmm(mini_ckpt, capsys):
    shared, src, out = mini_ckpt
    text = os.path.join(shared, "data", "heldout.txt")
    assert cli.main(["eval", src, "--text", text, "--max-tokens", "1024", "--quiet"]) == 0
    p_bf16 = _ppl(capsys.readouterr().out)
    assert cli.main(["eval", str(out), "--text", text, "--max-tokens", "1024", "--quiet"]) == 0
    p_lut = _ppl(capsys.readouterr().out)
    assert 10 < p_bf16 < 150 and 10 < p_lut < 150
    assert abs(p_lut / p_bf16 - 1) < 0.05


def test_generate(mini_ckpt, capsys):
    _, _, out = mini_ckpt
    assert cli.main(["generate", str(out), "--prompt", "The Python", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The Python") and len(text.strip()) > len("The Python")


def test_generate_static_gives_the_same_text(mini_ckpt, capsys):
    """--static (lutmm.generation.greedy_static: static cache, CUDA graph on a GPU) continues a prompt as
    Hugging Face greedy generate does."""
    _, _, out = mini_ckpt
    args = ["generate", str(out), "--prompt", "The river", "--max-new-tokens", "12", "--device", "cpu", "--dtype",
            "float32"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--static"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "generated in" in captured.err
    assert cli.main(args + ["--compile"]) == 2  # without --static: a one-line error
    assert "--compile needs --static" in capsys.readouterr().err


def test_generate_on_cuda_defaults_to_the_graph_path(mini_ckpt, capsys):
    """On CUDA `generate` decodes through greedy_static's CUDA graph with lutmm's attention kernel by
    default; its text matches Hugging Face generate's (--no-static) on this prompt."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    _, _, out = mini_ckpt
    args = ["generate", str(out), "--prompt", "The river", "--max-new-tokens", "12", "--device", "cuda"]
    assert cli.main(args) == 0
    fast = capsys.readouterr()
    assert "graph capture" in fast.err and "modules fused" in fast.err
    assert cli.main(args + ["--no-static"]) == 0
    plain = capsys.readouterr()
    assert "graph capture" not in plain.err
    assert fast.out == plain.out and len(fast.out) > len("The river") + 8


def test_generate_on_cuda_runs_a_folded_checkpoint_folded(mini_ckpt, tmp_path, capsys):
    """A `quantize --fold-norms` checkpoint decodes with its layers folded (lutmm.layerfold) on the graph path,
    giving the text Hugging Face generate gives for it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    _, src, _ = mini_ckpt
    out = tmp_path / "mini-q4-fold"
    assert cli.main(["quantize", src, str(out), "--bits", "4", "--group-size", "64", "--table", "nf", "--quiet",
                     "--fold-norms"]) == 0
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "The river", "--max-new-tokens", "12", "--device", "cuda"]
    assert cli.main(args) == 0
    fast = capsys.readouterr()
    assert "layers folded" in fast.err
    assert cli.main(args + ["--no-static"]) == 0
    assert fast.out == capsys.readouterr().out


def test_generate_on_cuda_keeps_a_models_own_attention_when_it_cannot_switch(mini_ckpt, capsys, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    import lutmm.attention

    def refuse(model, decode_kernel=True):
        raise RuntimeError("no AttentionInterface here")
    monkeypatch.setattr(lutmm.attention, "use_gqa_attention", refuse)
    _, _, out = mini_ckpt
    assert cli.main(["generate", str(out), "--prompt", "The river", "--max-new-tokens", "6", "--device", "cuda"]) == 0
    captured = capsys.readouterr()
    assert "keeping the model's own attention (no AttentionInterface here)" in captured.err
    assert "graph capture" in captured.err and captured.out.startswith("The river")


def test_demo_mini_llama(mini_ckpt, capsys):
    assert cli.main(["demo", "--max-tokens", "1024", "--new-tokens", "4", "--speed-tokens", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mini-llama" in out and "== summary" in out
    if not torch.cuda.is_available():
        assert cli.CPU_FALLBACK in out
    rows = re.findall(r"^\s+(bf16|lutmm)\s+([0-9.]+) MB\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["bf16", "lutmm"], out
    (_, mb16, p16, s16), (_, mblut, plut, slut) = rows
    assert float(mblut) < float(mb16) / 3 and float(plut) < 1.05 * float(p16)
    assert float(s16) > 0 and float(slut) > 0


def test_demo_builtin_random_model(monkeypatch, capsys):
    monkeypatch.setattr(cli, "find_shared", lambda: None)
    assert cli.main(["demo", "--max-tokens", "600", "--new-tokens", "4", "--speed-tokens", "4", "--quiet",
                     "--bits", "3", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "built-in tiny random Llama" in out and "== summary" in out


def test_upgrade_a_version_1_checkpoint(tmp_path, capsys):
    """`lutmm upgrade` rewrites a format-version-1 3-bit checkpoint as version 2: the packed codes of the
    checkpoint saved from the same model, the same logits, the tokenizer files kept; OUT_DIR = DIR is refused."""
    from safetensors.torch import load_file, save_file
    from test_checkpoint import _pack_v1_3bit

    from lutmm.checkpoint import load_quantized, save_quantized
    from lutmm.nn import lut_modules, quantize_model

    model = tiny_llama(tie=True)
    quantize_model(model, bits=3, group_size=64, table="nf", progress=False)
    v2 = save_quantized(model, tmp_path / "v2")
    (v2 / "tokenizer_config.json").write_text("{}")
    sd = load_file(str(v2 / "model.safetensors"))
    v1_sd = dict(sd)
    for name, m in lut_modules(model):
        v1_sd[f"{name}.packed"] = _pack_v1_3bit(m.quantized_weight().codes())
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file(v1_sd, str(v1 / "model.safetensors"))
    cfg = json.loads((v2 / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    (v1 / "config.json").write_text(json.dumps(cfg))
    (v1 / "tokenizer_config.json").write_text("{}")
    assert cli.main(["upgrade", str(v1), str(tmp_path / "up")]) == 0
    out = capsys.readouterr().out
    assert "format version 1 -> 2: 14 layers repacked" in out
    up = tmp_path / "up"
    assert json.loads((up / "config.json").read_text())["quantization_config"]["format_version"] == 2
    assert (up / "tokenizer_config.json").is_file()
    got = load_file(str(up / "model.safetensors"))
    for name, _ in lut_modules(model):
        assert torch.equal(got[f"{name}.packed"], sd[f"{name}.packed"]), name
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_quantized(up)(ids).logits, model(ids).logits)
    assert cli.main(["upgrade", str(v1), str(v1)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
