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


def _tiny_src(tmp_path, name="src", **save):
    src = tmp_path / name
    tiny_llama(tie=False).save_pretrained(str(src), **save)
    return src


RTN = ["--table", "int", "--absmax", "--quiet"]


def _one_line(err: str) -> bool:
    """stderr holds one error line (progress bars of loading aside) and no traceback."""
    return "Traceback" not in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1


def test_quantize_refuses_the_source_directory_as_out_dir(tmp_path, capsys, monkeypatch):
    """OUT_DIR = MODEL_DIR in any spelling (the same path, a trailing slash, relative, a symlink) is refused
    before anything is written, leaving the source model as it was; so is OUT_DIR an existing file. An existing
    directory elsewhere is still written into, its other files kept."""
    src = _tiny_src(tmp_path)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for out in (str(src), str(src) + "/", "src", "./src/", str(tmp_path / "link"), "link"):
        assert cli.main(["quantize", str(src), out] + RTN) == 2, out
        err = capsys.readouterr().err
        assert f"lutmm quantize: error: OUT_DIR: {out} is the source model directory itself" in err, err
        assert _one_line(err), err
    assert cli.main(["quantize", "link", str(src)] + RTN) == 2
    assert "is the source model directory itself" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    (tmp_path / "file").write_text("not a directory")
    assert cli.main(["quantize", str(src), str(tmp_path / "file")] + RTN) == 2
    assert f"OUT_DIR: {tmp_path / 'file'} exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a directory"
    linked = tmp_path / "linked"  # a different directory whose model.safetensors is the source's
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(src / "model.safetensors")
    assert cli.main(["quantize", str(src), str(linked)] + RTN) == 2
    assert "is the source model's model.safetensors (a link to it)" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert cli.main(["quantize", str(src), str(other)] + RTN) == 0
    assert (other / "notes.txt").read_text() == "keep" and (other / "model.safetensors").is_file()


def test_quantize_refuses_a_lutmm_checkpoint(tmp_path, capsys):
    """A lutmm checkpoint as MODEL_DIR (or demo --model) has no linear layers left to quantize: refused, nothing
    written (it used to report 0 layers quantized, exit 0 and write a copy)."""
    src = _tiny_src(tmp_path)
    assert cli.main(["quantize", str(src), str(tmp_path / "q")] + RTN) == 0
    capsys.readouterr()
    assert cli.main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2")] + RTN) == 2
    assert f"MODEL_DIR: {tmp_path / 'q'} is already a lutmm checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()
    assert cli.main(["demo", "--model", str(tmp_path / "q"), "--quiet"]) == 2
    assert "--model: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["quantize", "M", "O", "--calib-tokens", "0"],
    ["quantize", "M", "O", "--calib-tokens", "-5"],
    ["quantize", "M", "O", "--group-size", "0"],
    ["eval", "D", "--text", "T", "--max-tokens", "-3"],
    ["eval", "D", "--text", "T", "--max-tokens", "0"],
    ["eval", "D", "--text", "T", "--window", "1"],
    ["eval", "D", "--text", "T", "--ahead", "3"],
    ["generate", "D", "--prompt", "x", "--max-new-tokens", "0"],
    ["generate", "D", "--prompt", "x", "--max-new-tokens", "-1"],
    ["demo", "--new-tokens", "0"],
    ["demo", "--max-tokens", "-1"],
    ["demo", "--window", "0"],
    ["demo", "--speed-tokens", "0"],
    ["demo", "--group-size", "0"],
])
def test_count_options_reject_values_that_mean_nothing(argv, capsys):
    """Counts <= 0 (a window < 2, an ahead other than 1/2) are refused by the parser, naming the option, instead
    of running on them (eval --max-tokens -3 scored ids[:-3], --calib-tokens 0 calibrated on 0 tokens)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"lutmm {argv[0]}: error: argument {argv[-2]}: expected" in err and repr(argv[-1]) in err, err


def test_count_options_keep_their_documented_values():
    args = cli.build_parser().parse_args(["quantize", "M", "O", "--group-size", "-1", "--calib-tokens", "1",
                                          "--seed", "0"])
    assert args.group_size == -1 and args.calib_tokens == 1 and args.seed == 0
    args = cli.build_parser().parse_args(["eval", "D", "--text", "T", "--window", "2", "--ahead", "2"])
    assert args.window == 2 and args.ahead == 2 and args.max_tokens is None
    assert cli.build_parser().parse_args(["demo", "--group-size", "-1"]).group_size == -1


@pytest.mark.parametrize("argv", [["quantize", "M", "O"], ["eval", "D", "--text", "T"],
                                  ["generate", "D", "--prompt", "x"], ["demo"]])
def test_bad_device_is_a_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--device", "bogus"])
    assert e.value.code == 2
    assert "argument --device: not a torch device: 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(argv + ["--device", "cuda"])
        assert "argument --device: 'cuda': no CUDA device available" in capsys.readouterr().err


def test_missing_paths_are_one_line_errors(tmp_path, capsys):
    """A missing --text, MODEL_DIR or demo --model: one line naming the argument and the path (they were
    FileNotFoundError / transformers OSError tracebacks)."""
    src = _tiny_src(tmp_path)
    missing = str(tmp_path / "nonexistent")
    cases = [(["eval", str(src), "--text", missing], f"lutmm eval: error: --text: {missing} does not exist"),
             (["eval", str(src), "--text", str(tmp_path)], f"--text: {tmp_path} is not a file"),
             (["quantize", missing, str(tmp_path / "o")] + RTN, f"MODEL_DIR: {missing} does not exist"),
             (["quantize", str(src / "config.json"), str(tmp_path / "o")] + RTN, "MODEL_DIR: "),
             (["quantize", str(tmp_path), str(tmp_path / "o")] + RTN, f"MODEL_DIR: {tmp_path} has no config.json"),
             (["demo", "--model", missing, "--quiet"], f"lutmm demo: error: --model: {missing} does not exist"),
             (["demo", "--text", missing, "--quiet"], f"lutmm demo: error: --text: {missing} does not exist")]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and _one_line(err), (argv, err)
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, capsys):
    src = _tiny_src(tmp_path)
    bad = tmp_path / "t.txt"
    bad.write_text("hello world " * 20)
    for argv in (["generate", str(src), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["eval", str(src), "--text", str(bad), "--quiet"]):
        assert cli.main(argv + ["--device", "cpu", "--tokenizer", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"error: --tokenizer: {bad} is not a valid tokenizer JSON file" in err, err
        assert _one_line(err), err


def test_a_truncated_safetensors_shard_is_named(tmp_path, capsys):
    """A plain HF directory with a truncated shard: eval / generate / quantize / demo name the directory and
    the shard (safetensors' own error names neither)."""
    src = _tiny_src(tmp_path, max_shard_size="300KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:len(data) // 2])
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    for argv, arg in ((["eval", str(src), "--text", str(text), "--device", "cpu"], "DIR"),
                      (["generate", str(src), "--prompt", "hi", "--device", "cpu"], "DIR"),
                      (["quantize", str(src), str(tmp_path / "q")] + RTN, "MODEL_DIR"),
                      (["demo", "--model", str(src), "--quiet"], "--model")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {arg}: cannot load the model in {src}: {shards[1]}: not a valid safetensors file" in err, err
        assert _one_line(err), err


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
