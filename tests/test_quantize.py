"""``w4a8-quantize`` against ModelOpt 0.47's own exports of the same tiny models, plus error cases.

ModelOpt runs on the CPU here: ``mtq.quantize(model, W4A8_MXFP4_FP8_CFG (+ algorithm="max"),
forward_loop)`` then ``export_hf_checkpoint`` (see ``tests/tiny_models.export_with_modelopt``).
Both tools calibrate on the same paragraphs of the same text, so every tensor, the input and
KV-cache scales included, must be byte-identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny_models
from w4a8_backend.formats import dequantize_mxfp4
from w4a8_backend.tools import quantize as wq

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(ours: Path, reference: Path) -> dict[str, torch.Tensor]:
    a, b = load_tensors(ours), load_tensors(reference)
    assert sorted(a) == sorted(b), (
        f"tensor names differ: only ours {sorted(set(a) - set(b))[:6]}, "
        f"only ModelOpt {sorted(set(b) - set(a))[:6]}"
    )
    differ = [n for n in sorted(a)
              if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or raw(a[n]) != raw(b[n])]
    assert not differ, f"{len(differ)} tensors differ from ModelOpt, e.g. {differ[:6]}"
    return a


def assert_same_configs(ours: Path, reference: Path, quant_algo: str = "W4A8_MXFP4_FP8") -> None:
    ours_hq = json.loads((ours / "hf_quant_config.json").read_text())
    ref_hq = json.loads((reference / "hf_quant_config.json").read_text())
    assert ours_hq["producer"]["name"] == "w4a8-quantize"
    assert ref_hq["producer"]["name"] == "modelopt"
    ref_hq["quantization"]["quant_algo"] = quant_algo
    assert ours_hq["quantization"] == ref_hq["quantization"]
    ours_cfg = json.loads((ours / "config.json").read_text())
    ref_cfg = json.loads((reference / "config.json").read_text())
    ours_q, ref_q = ours_cfg.pop("quantization_config"), ref_cfg.pop("quantization_config")
    assert ours_q.pop("producer")["name"] == "w4a8-quantize"
    ref_q.pop("producer")
    ref_q["quant_algo"] = quant_algo
    assert ours_q == ref_q
    assert list(ours_q) == [k for k in ["ignore", "quant_algo", "kv_cache_scheme", "quant_method"]
                            if k in ref_q]
    assert ours_cfg == ref_cfg


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever fixtures printed
    code = wq.main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


# ---------------------------------------------------------------------------------------------
# fixtures: tiny models and their ModelOpt exports (built once per module)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def calib_texts() -> list[str]:
    texts = wq.load_calibration_texts()
    assert len(texts) >= 10 and sum(map(len, texts)) > 3000
    return texts


@pytest.fixture(scope="module")
def llama(work) -> Path:
    return tiny_models.make_tiny_llama(work / "llama", seed=1)


@pytest.fixture(scope="module")
def qwen3_moe(work) -> Path:
    return tiny_models.make_tiny_qwen3_moe(work / "qwen3_moe", seed=2)


@pytest.fixture(scope="module")
def mixtral(work) -> Path:
    return tiny_models.make_tiny_mixtral(work / "mixtral", seed=3)


@pytest.fixture(scope="module")
def qwen3_moe_fused(work) -> Path:
    return tiny_models.make_tiny_qwen3_moe_fused(work / "qwen3_moe_fused", seed=4)


# ---------------------------------------------------------------------------------------------
# byte identity with ModelOpt
# ---------------------------------------------------------------------------------------------


def _export_both(src: Path, work: Path, tag: str, texts, *, static: bool, kv: bool,
                 exclude=(), disable=()) -> tuple[Path, Path, dict]:
    ref = tiny_models.export_with_modelopt(src, work / f"{tag}_modelopt", static=static,
                                           calib_texts=texts, kv_cache_fp8=kv, disable=disable)
    summary = wq.quantize_checkpoint(src, work / f"{tag}_ours", activations="fp8",
                                     calibration="static" if static else "dynamic",
                                     kv_cache_fp8=kv, exclude=exclude, progress=False)
    return work / f"{tag}_ours", ref, summary


@pytest.mark.slow
def test_llama_static_fp8_kv_matches_modelopt(llama, work, calib_texts):
    ours, ref, summary = _export_both(llama, work, "llama_static", calib_texts, static=True, kv=True)
    tensors = assert_same_tensors(ours, ref)
    assert_same_configs(ours, ref)
    q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert q["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    assert q["kv_cache_quant_algo"] == "FP8"
    # 2 layers x 7 linears, each with weight / weight_scale / input_scale; k/v scales per layer
    assert summary["layers_quantized"] == 14 and summary["input_scales"] == 14
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        assert tensors[f"{p}.k_proj.k_scale"].shape == () and tensors[f"{p}.k_proj.k_scale"] > 0
        assert tensors[f"{p}.v_proj.v_scale"].dtype == torch.float32
        assert tensors[f"{p}.q_proj.weight"].dtype == torch.uint8
        assert tensors[f"{p}.q_proj.weight"].shape == (128, 64)
        assert tensors[f"{p}.q_proj.weight_scale"].shape == (128, 4)
        assert tensors[f"{p}.q_proj.input_scale"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    # the files a server needs came along
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ours / name).read_bytes() == (llama / name).read_bytes()
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == summary["bytes_after"]
    # and the decoded weights are the source weights up to MXFP4 rounding
    src = load_tensors(llama)
    w = src["model.layers.0.mlp.down_proj.weight"].float()
    deq = dequantize_mxfp4(tensors["model.layers.0.mlp.down_proj.weight"],
                           tensors["model.layers.0.mlp.down_proj.weight_scale"])
    assert ((deq - w).norm() / w.norm()).item() < 0.2


@pytest.mark.slow
def test_llama_dynamic_with_exclude_matches_modelopt(llama, work, calib_texts):
    ours, ref, summary = _export_both(llama, work, "llama_dyn", calib_texts, static=False,
                                      kv=False, exclude=["model.layers.1.*"],
                                      disable=["*layers.1.*"])
    tensors = assert_same_tensors(ours, ref)
    assert_same_configs(ours, ref)
    assert not [n for n in tensors if n.endswith(("input_scale", "k_scale", "v_scale"))]
    excludes = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert excludes["exclude_modules"] == ["lm_head", "model.embed_tokens", "model.layers.1*"]
    assert summary["layers_quantized"] == 7 and summary["layers_excluded"] == 9
    src = load_tensors(llama)
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"],
                       src["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.slow
def test_qwen3_moe_static_fp8_kv_matches_modelopt(qwen3_moe, work, calib_texts):
    ours, ref, summary = _export_both(qwen3_moe, work, "qwen3_static", calib_texts, static=True,
                                      kv=True)
    tensors = assert_same_tensors(ours, ref)
    assert_same_configs(ours, ref)
    q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert q["exclude_modules"] == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate",
                                    "model.layers.1.mlp.gate"]
    assert summary["layers_quantized"] == 2 * (4 + 4 * 3)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        assert tensors[f"{p}.gate.weight"].dtype == torch.bfloat16  # router stays high precision
        gate = {tensors[f"{p}.experts.{e}.gate_proj.input_scale"].item() for e in range(4)}
        up = {tensors[f"{p}.experts.{e}.up_proj.input_scale"].item() for e in range(4)}
        down = {tensors[f"{p}.experts.{e}.down_proj.input_scale"].item() for e in range(4)}
        assert len(gate) == 1 and gate == up and len(down) == 1  # shared over the experts
        assert tensors[f"{p}.experts.3.down_proj.weight"].shape == (128, 32)


@pytest.mark.slow
def test_mixtral_static_fp8_kv_matches_modelopt(mixtral, work, calib_texts):
    ours, ref, _ = _export_both(mixtral, work, "mixtral_static", calib_texts, static=True, kv=True)
    tensors = assert_same_tensors(ours, ref)
    assert_same_configs(ours, ref)
    q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert q["exclude_modules"] == ["lm_head", "model.embed_tokens",
                                    "model.layers.0.block_sparse_moe.gate",
                                    "model.layers.1.block_sparse_moe.gate"]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in tensors
    w1 = {tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.input_scale"].item()
          for e in range(4)}
    assert len(w1) == 1


@pytest.mark.slow
def test_fused_experts_on_disk_match_modelopt(qwen3_moe_fused, work, calib_texts):
    with safe_open(str(qwen3_moe_fused / "model.safetensors"), framework="pt") as f:
        shape = f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape()
    assert shape == [4, 128, 128]  # [E, 2I, H] on disk
    ours, ref, summary = _export_both(qwen3_moe_fused, work, "fused_static", calib_texts,
                                      static=True, kv=False)
    tensors = assert_same_tensors(ours, ref)
    assert_same_configs(ours, ref)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in tensors
    assert tensors["model.layers.0.mlp.experts.2.up_proj.weight"].shape == (64, 64)
    assert summary["layers_quantized"] == 2 * (4 + 4 * 3)


# ---------------------------------------------------------------------------------------------
# INT8, sharding, the CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_export(llama, work, calib_texts):
    fp8_dir = work / "int8_ref_fp8"
    wq.quantize_checkpoint(llama, fp8_dir, activations="fp8", calibration="static",
                           progress=False)
    summary = wq.quantize_checkpoint(llama, work / "int8_static", activations="int8",
                                     calibration="static", progress=False)
    assert summary["quant_algo"] == "W4A8_MXFP4_INT8"
    out = work / "int8_static"
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "W4A8_MXFP4_INT8"
    assert hq["quantization"]["group_size"] == 32
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_algo"] == "W4A8_MXFP4_INT8" and cfg["quant_method"] == "modelopt"
    int8, fp8 = load_tensors(out), load_tensors(fp8_dir)
    assert sorted(int8) == sorted(fp8)
    scales = [n for n in int8 if n.endswith("input_scale")]
    assert len(scales) == 14
    for name in int8:
        if name.endswith("input_scale"):
            # same amax, divided by 127 instead of 448
            amax = fp8[name].double() * 448
            assert int8[name].item() == pytest.approx(amax.item() / 127, rel=1e-6)
        else:
            assert raw(int8[name]) == raw(fp8[name]), name
    # dynamic INT8: no input_scale at all
    wq.quantize_checkpoint(llama, work / "int8_dynamic", activations="int8", progress=False)
    dyn = load_tensors(work / "int8_dynamic")
    assert not [n for n in dyn if n.endswith("input_scale")]
    assert raw(dyn["model.layers.0.self_attn.o_proj.weight"]) == raw(
        int8["model.layers.0.self_attn.o_proj.weight"])


@pytest.mark.slow
def test_static_calib_file_scales_are_amax_over_448(llama, work):
    """input_scale / k_scale from a user's file equal an independent hook-based measurement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["A short note about the tides and the moon.",
             "Numbers: 3.14159, 2.71828 and 1.41421 are famous constants.",
             "The quick brown fox jumps over the lazy dog, again and again."]
    calib = work / "my_calibration.txt"
    calib.write_text("\n\n".join(texts) + "\n")
    out = work / "calib_file_out"
    wq.quantize_checkpoint(llama, out, activations="fp8", calibration="static",
                           calib_file=calib, kv_cache_fp8=True, progress=False)
    got = load_tensors(out)

    tok = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).eval()
    amax: dict[str, float] = {}

    def hook(name):
        def pre(module, args):
            amax[name] = max(amax.get(name, 0.0), args[0].abs().max().float().item())
        return pre

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for text in texts:
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    assert len(amax) == 14
    for name, value in amax.items():
        expected = torch.tensor(value, dtype=torch.float32) / 448.0
        assert got[f"{name}.input_scale"].item() == expected.item(), name
    # v_scale: v_proj's output has no RoPE, so amax(v_proj(x)) / 448
    vmax = {}
    for i in range(2):
        v = model.model.layers[i].self_attn.v_proj
        v.register_forward_hook(lambda m, a, o, i=i: vmax.__setitem__(
            i, max(vmax.get(i, 0.0), o.abs().max().float().item())))
    with torch.no_grad():
        for text in texts:
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    for i in range(2):
        expected = torch.tensor(vmax[i], dtype=torch.float32) / 448.0
        assert got[f"model.layers.{i}.self_attn.v_proj.v_scale"].item() == expected.item()
    # and a different text gives different scales than the built-in one
    builtin = work / "calib_builtin_out"
    wq.quantize_checkpoint(llama, builtin, activations="fp8", calibration="static",
                           progress=False)
    other = load_tensors(builtin)
    assert any(other[n].item() != got[n].item() for n in got if n.endswith("input_scale"))


def test_sharding_and_index(llama, work):
    one = work / "shards_one"
    many = work / "shards_many"
    s1 = wq.quantize_checkpoint(llama, one, activations="fp8", progress=False)
    s2 = wq.quantize_checkpoint(llama, many, activations="fp8", shard_size="100KB",
                                progress=False)
    assert s1["shards"] == 1 and s2["shards"] > 3
    files = sorted(p.name for p in many.glob("*.safetensors"))
    n = s2["shards"]
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    a, b = load_tensors(one), load_tensors(many)
    assert sorted(a) == sorted(b) == sorted(index["weight_map"])
    assert all(raw(a[k]) == raw(b[k]) for k in a)
    for name, fname in index["weight_map"].items():
        with safe_open(str(many / fname), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    for f in many.glob("*.safetensors"):  # a shard holds more than one tensor only below 100 KB
        with safe_open(str(f), framework="pt") as sf:
            if len(list(sf.keys())) > 1:
                assert f.stat().st_size < 100_000 + 4096
    assert s1["bytes_before"] == sum(t.numel() * t.element_size() for t in load_tensors(llama).values())
    assert s1["bytes_after"] < s1["bytes_before"] * 0.6


@pytest.mark.slow
def test_row_chunking_gives_the_same_bytes(qwen3_moe, qwen3_moe_fused, work, monkeypatch):
    whole = {}
    for name, src in (("split", qwen3_moe), ("fused", qwen3_moe_fused)):
        wq.quantize_checkpoint(src, work / f"chunk_whole_{name}", activations="fp8",
                               progress=False)
        whole[name] = load_tensors(work / f"chunk_whole_{name}")
    monkeypatch.setattr(wq, "CHUNK_ELEMENTS", 300)  # 2 rows of 128, or 4 rows of 64, per chunk
    for name, src in (("split", qwen3_moe), ("fused", qwen3_moe_fused)):
        wq.quantize_checkpoint(src, work / f"chunk_small_{name}", activations="fp8",
                               progress=False)
        small = load_tensors(work / f"chunk_small_{name}")
        assert sorted(small) == sorted(whole[name])
        assert all(raw(small[k]) == raw(whole[name][k]) for k in small)


def test_cli_success_prints_summary(llama, work, capsys):
    code, out, err = run_cli(llama, work / "cli_ok", "--activations", "int8", capsys=capsys)
    assert code == 0, err
    assert "layers quantized: 14" in out and "W4A8_MXFP4_INT8" in out
    assert "bytes:" in out and "exclude_modules ['lm_head', 'model.embed_tokens']" in out


@pytest.mark.slow
def test_console_script_entry_point(llama, work):
    exe = Path(sys.executable).with_name("w4a8-quantize")
    if not exe.exists():
        pytest.skip("package not installed with its console scripts")
    out = work / "entry_point"
    proc = subprocess.run([str(exe), str(llama), str(out), "--activations", "fp8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "hf_quant_config.json").is_file()
    assert "w4a8-quantize" in proc.stderr  # the tqdm progress bar
    proc = subprocess.run([str(exe), str(llama), str(out), "--activations", "fp8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"w4a8-quantize: error: output directory {out} already exists and is not empty")


# ---------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, nothing left behind
# ---------------------------------------------------------------------------------------------


def _expect_error(capsys, out_dir: Path, args, message: str) -> None:
    code, stdout, err = run_cli(*args, capsys=capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == f"w4a8-quantize: error: {message}"
    assert not leftovers(out_dir.parent)


def test_error_missing_source(work, capsys):
    src = work / "does_not_exist"
    out = work / "err_missing_out"
    _expect_error(capsys, out, [src, out, "--activations", "fp8"],
                  f"source directory {src} does not exist")
    assert not out.exists()


def test_error_not_safetensors(llama, work, capsys):
    src = work / "bin_model"
    src.mkdir()
    (src / "config.json").write_bytes((llama / "config.json").read_bytes())
    torch.save({"x": torch.ones(2)}, src / "pytorch_model.bin")
    out = work / "err_bin_out"
    _expect_error(capsys, out, [src, out, "--activations", "fp8"],
                  f"no safetensors weights in {src} (found pytorch_model.bin; convert it to "
                  "safetensors first)")
    assert not out.exists()


def test_error_corrupt_safetensors(llama, work, capsys):
    src = work / "corrupt_model"
    src.mkdir()
    (src / "config.json").write_bytes((llama / "config.json").read_bytes())
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out = work / "err_corrupt_out"
    code, _, err = run_cli(src, out, "--activations", "fp8", capsys=capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"w4a8-quantize: error: cannot read {src / 'model.safetensors'} as "
                          "safetensors")
    assert not out.exists() and not leftovers(work)


def test_error_no_config(work, capsys):
    src = work / "no_config"
    src.mkdir()
    out = work / "err_nocfg_out"
    _expect_error(capsys, out, [src, out, "--activations", "fp8"],
                  f"{src} has no config.json (not a Hugging Face model directory)")


def test_error_unsupported_architecture(llama, work, capsys):
    src = work / "gpt2_model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                 "model_type": "gpt2"}))
    (src / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    out = work / "err_arch_out"
    _expect_error(capsys, out, [src, out, "--activations", "fp8"],
                  "unsupported architecture GPT2LMHeadModel (model_type 'gpt2'); supported model "
                  "types: bert, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe")
    assert not out.exists()


def test_error_in_features_not_multiple_of_32(work, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = work / "odd_llama"
    tok = tiny_models.build_tokenizer(src)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok))
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    out = work / "err_odd_out"
    _expect_error(capsys, out, [src, out, "--activations", "fp8"],
                  "model.layers.0.mlp.down_proj.weight: in_features 80 is not a multiple of 32 "
                  "(MXFP4 block size); keep it in high precision with --exclude")
    assert not out.exists()
    # the suggested way out works
    code, _, err = run_cli(src, out, "--activations", "fp8", "--exclude", "*.down_proj",
                           capsys=capsys)
    assert code == 0, err
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in hq["quantization"]["exclude_modules"]


def test_error_non_finite_weight(llama, work, capsys):
    from safetensors.torch import load_file, save_file

    src = work / "nan_llama"
    src.mkdir()
    for f in llama.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(llama / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    row = int(torch.randint(0, tensors[name].shape[0], ()).item())
    tensors[name][row, 7] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = work / "err_nan_out"
    code, _, err = run_cli(src, out, "--activations", "fp8", capsys=capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"w4a8-quantize: error: {name}, rows 0..")
    assert err.strip().endswith("cannot encode non-finite values to MXFP4: 1 block(s) of 32 hold "
                                "NaN or Inf")
    assert not out.exists() and not leftovers(work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_calib_device_unavailable(llama, work, capsys):
    out = work / "err_calib_dev_out"
    code, _, err = run_cli(llama, out, "--activations", "fp8", "--calibration", "static",
                           "--calib-device", "cuda", capsys=capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("w4a8-quantize: error: --calib-device 'cuda' is not usable here: ")
    assert not out.exists() and not leftovers(work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_encode_device_unavailable(llama, work, capsys):
    out = work / "err_encode_dev_out"
    code, _, err = run_cli(llama, out, "--activations", "int8", "--encode-device", "cuda",
                           capsys=capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("w4a8-quantize: error: --encode-device 'cuda' is not usable here: ")
    assert not out.exists() and not leftovers(work)


def test_error_encode_device_unknown(llama, work, capsys):
    out = work / "err_encode_dev_bad"
    code, _, err = run_cli(llama, out, "--activations", "fp8", "--encode-device", "gpu0",
                           capsys=capsys)
    assert code == 1 and err.startswith("w4a8-quantize: error: --encode-device 'gpu0' is not "
                                        "usable here: "), err
    assert not out.exists() and not leftovers(work)


def test_error_existing_nonempty_output(llama, work, capsys):
    out = work / "err_exists_out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _expect_error(capsys, out, [llama, out, "--activations", "fp8"],
                  f"output directory {out} already exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_empty_existing_output_is_fine(llama, work):
    out = work / "empty_out"
    out.mkdir()
    wq.quantize_checkpoint(llama, out, activations="fp8", progress=False)
    assert (out / "hf_quant_config.json").is_file()


def test_error_already_quantized(llama, work, capsys):
    first = work / "already_q"
    wq.quantize_checkpoint(llama, first, activations="fp8", progress=False)
    out = work / "err_requant_out"
    _expect_error(capsys, out, [first, out, "--activations", "fp8"],
                  f"{first} is already quantized (quant_method 'modelopt')")


def test_error_calib_file_without_static(llama, work, capsys):
    calib = work / "calib.txt"
    calib.write_text("Some text.\n\nMore text.\n")
    out = work / "err_calib_out"
    _expect_error(capsys, out, [llama, out, "--activations", "fp8", "--calib-file", calib],
                  "--calib-file needs --calibration static (or --kv-cache-fp8)")
    missing = work / "missing_calib.txt"
    code, _, err = run_cli(llama, out, "--activations", "fp8", "--calibration", "static",
                           "--calib-file", missing, capsys=capsys)
    assert code == 1 and err.startswith(f"w4a8-quantize: error: cannot read calibration file {missing}")
    assert not out.exists() and not leftovers(work)


def test_error_bad_shard_size(llama, work, capsys):
    out = work / "err_shard_out"
    _expect_error(capsys, out, [llama, out, "--activations", "fp8", "--shard-size", "lots"],
                  "invalid --shard-size 'lots' (examples: 5GB, 500MB, 2GiB)")


def test_missing_activations_flag_is_an_argparse_error(llama, work, capsys):
    with pytest.raises(SystemExit) as exc:
        wq.main([str(llama), str(work / "x")])
    assert exc.value.code == 2
    assert "--activations" in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(llama, work, monkeypatch):
    out = work / "crash_out"
    calls = {"n": 0}
    real = wq.quantize_mxfp4

    def flaky(w):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(w)

    monkeypatch.setattr(wq, "quantize_mxfp4", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        wq.quantize_checkpoint(llama, out, activations="fp8", progress=False)
    assert calls["n"] == 5
    assert not out.exists() and not leftovers(work)


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
                                           ("2GiB", 2 * 2**30), ("1024", 1024), ("1.5kb", 1500)])
def test_parse_size(text, expected):
    assert wq.parse_size(text) == expected


def test_summarize_excludes_prefix_wildcards():
    quantized = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    excluded = ["lm_head", "model.embed_tokens", "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.k_proj", "vision.tower.a", "vision.tower.b"]
    got = wq.summarize_excludes(excluded, quantized)
    # "model.layers.1*" would be fine too, but "model.layers.1.self_attn*" is the first dot-cut
    # that no quantized name can match once "model.layers.1*" is blocked by ...1.mlp.down_proj
    assert got == ["lm_head", "model.embed_tokens", "model.layers.1.self_attn*", "vision*"]
