import ast
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minillama
from minillama import MinillamaError, ModelConfig, Transformer
from minillama import checkpoint as ckpt
from minillama.checkpoint import load, save
from minillama.interop.hf import config_from_hf, config_to_hf
from minillama.model import rope_inverse_frequencies

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SEQ_LEN = 96
COMMON = dict(dim=64, n_layers=2, vocab_size=128, ffn_hidden_dim=160, max_seq_len=128, norm_eps=1e-5)
CASES = {
    "mha": dict(COMMON, n_heads=4),
    "gqa": dict(COMMON, n_heads=8, n_kv_heads=2, rope_theta=500000.0),
    "tied": dict(COMMON, n_heads=4, n_kv_heads=2, tie_embeddings=True),
    # original_max_position_embeddings=32 < SEQ_LEN, so the scaled low frequencies change the logits in the test.
    "llama3.1": dict(COMMON, n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                     rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)),
}


def make_cfg(case: str) -> ModelConfig:
    return ModelConfig(**CASES[case])


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every weight is distinct, norms included: all-ones norms would hide a swapped name."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_config_by_hand(cfg: ModelConfig):
    """A transformers LlamaConfig written independently of config_to_hf, so (b) checks the mapping."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = dict(rope_type="llama3", **vars(cfg.rope_scaling))
    return transformers.LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=cfg.tie_embeddings)


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours: Transformer, hf, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def saved(tmp_path):
    """A small GQA checkpoint on disk: (directory, model)."""
    model = random_model(make_cfg("gqa"))
    directory = tmp_path / "ck"
    save(model, None, directory)
    return directory, model


# ---------------------------------------------------------------------------------------------------------------
# Interoperability with transformers, both directions
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_our_checkpoint(case, tmp_path):
    cfg = make_cfg(case)
    model = random_model(cfg)
    save(model, None, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert max_logit_diff(model, hf, tokens(cfg)) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_we_load_a_transformers_checkpoint(case, tmp_path):
    cfg = make_cfg(case)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config_by_hand(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer = load(tmp_path / "hf")
    assert tokenizer is None
    assert model.cfg.to_dict() == {**cfg.to_dict(), "multiple_of": model.cfg.multiple_of, "bos_id": 1, "eos_id": 2}
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert max_logit_diff(model, hf, tokens(cfg)) <= 1e-4


def test_llama31_scaling_matters_within_the_test_length():
    cfg = make_cfg("llama3.1")
    plain = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
    assert not torch.allclose(plain, rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    # Some scaled wavelength is shorter than the sequence, so scaling changes the logits we compare.
    scaled = plain != rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert (2 * torch.pi / plain[scaled]).min() < SEQ_LEN


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    cfg = make_cfg(case)
    back = config_from_hf(config_to_hf(cfg))
    assert back.to_dict() == {**cfg.to_dict(), "multiple_of": back.multiple_of}


def test_config_reads_both_rope_styles():
    hf = config_to_hf(make_cfg("llama3.1"))
    v5_only = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    v4_only = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v4_old = dict(v4_only, rope_scaling={("type" if k == "rope_type" else k): v
                                         for k, v in hf["rope_scaling"].items()})  # before transformers 4.42
    expected = make_cfg("llama3.1").to_dict()
    for hf_dict in (v5_only, v4_only, v4_old):
        got = config_from_hf(hf_dict).to_dict()
        assert (got["rope_theta"], got["rope_scaling"]) == (expected["rope_theta"], expected["rope_scaling"])
    plain = config_to_hf(make_cfg("mha"))
    assert plain["rope_scaling"] is None and plain["rope_parameters"]["rope_type"] == "default"
    assert config_from_hf(plain).rope_scaling is None


def test_llama3_eos_list_takes_the_first_id():
    hf = dict(config_to_hf(make_cfg("mha")), bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    cfg = config_from_hf(hf)
    assert (cfg.bos_id, cfg.eos_id) == (128000, 128001)


# ---------------------------------------------------------------------------------------------------------------
# Format details
# ---------------------------------------------------------------------------------------------------------------
def test_tied_checkpoint_stores_the_embedding_once(tmp_path):
    model = random_model(make_cfg("tied"))
    save(model, None, tmp_path / "ck")
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["tie_word_embeddings"] is True
    loaded, _ = load(tmp_path / "ck")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert loaded.num_params() == model.num_params()
    assert_same_weights(model, loaded)


def test_sharded_checkpoint(tmp_path):
    cfg = make_cfg("gqa")
    model = random_model(cfg)
    directory = save(model, None, tmp_path / "ck", max_shard_bytes=40_000)
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (directory / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    for shard in shards:  # no shard over the limit unless a single tensor is
        with safe_open(directory / shard, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    loaded, _ = load(directory)
    assert_same_weights(model, loaded)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert max_logit_diff(model, hf, tokens(cfg)) <= 1e-4


def test_dtype_is_applied_on_save_and_on_load(tmp_path):
    model = random_model(make_cfg("mha"))
    save(model, None, tmp_path / "ck", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"
    stored, _ = load(tmp_path / "ck")
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())
    assert stored.rope_inv_freq.dtype == torch.float32  # derived in fp32, whatever the weights
    fp32, _ = load(tmp_path / "ck", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert torch.equal(fp32.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight.bfloat16().float())


def test_save_sees_through_torch_compile_wrapper(tmp_path):
    model = random_model(make_cfg("tied"))
    save(torch.compile(model), None, tmp_path / "ck")  # compiling is lazy: nothing runs here
    assert_same_weights(model, load(tmp_path / "ck")[0])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer hand-off (the real Tokenizer is tested in test_tokenizer.py; here a stand-in with its interface)
# ---------------------------------------------------------------------------------------------------------------
class FakeTokenizer:
    def __init__(self, vocab_size: int, bos_id: int = 1, eos_id: int = 2):
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def save(self, directory):
        Path(directory, "tokenizer.json").write_text(json.dumps(vars(self)))


def fake_load_tokenizer(directory):
    return FakeTokenizer(**json.loads(Path(directory, "tokenizer.json").read_text()))


def test_tokenizer_is_saved_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "minillama.tokenizer",
                        types.SimpleNamespace(load_tokenizer=fake_load_tokenizer))
    model = random_model(make_cfg("mha"))
    save(model, FakeTokenizer(vocab_size=100, bos_id=5, eos_id=6), tmp_path / "ck")
    hf_config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (5, 6)  # the tokenizer's ids win
    loaded, tokenizer = load(tmp_path / "ck")
    assert isinstance(tokenizer, FakeTokenizer) and tokenizer.vocab_size == 100
    assert_same_weights(model, loaded)


def test_tokenizer_larger_than_embedding_table_is_refused(tmp_path):
    model = random_model(make_cfg("mha"))
    with pytest.raises(MinillamaError, match=r"vocab_size=129 .*vocab_size=128"):
        save(model, FakeTokenizer(vocab_size=129), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


# ---------------------------------------------------------------------------------------------------------------
# Atomic replacement
# ---------------------------------------------------------------------------------------------------------------
def test_save_replaces_an_existing_checkpoint(saved):
    directory, _ = saved
    save(random_model(make_cfg("gqa"), seed=7), None, directory, max_shard_bytes=40_000)  # sharded this time
    new = random_model(make_cfg("mha"), seed=8)
    save(new, None, directory)
    assert_same_weights(new, load(directory)[0])
    assert not list(directory.glob("model-*"))  # nothing of the sharded checkpoint survives
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ck"]


def test_failure_while_writing_leaves_the_previous_checkpoint(saved, monkeypatch):
    directory, old = saved
    calls = []

    def failing_write(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        ckpt.save_file(tensors, str(path), metadata={"format": "pt"})

    monkeypatch.setattr(ckpt, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save(random_model(make_cfg("gqa"), seed=9), None, directory, max_shard_bytes=40_000)
    assert len(calls) == 2
    assert_same_weights(old, load(directory)[0])
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ck"]


def test_failure_during_the_swap_rolls_back(saved, monkeypatch):
    directory, old = saved
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ck.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save(random_model(make_cfg("gqa"), seed=9), None, directory)
    monkeypatch.undo()
    assert_same_weights(old, load(directory)[0])
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ck"]


def test_crash_between_the_two_renames_loses_nothing(saved):
    directory, old = saved
    aside = directory.parent / ".ck.old"
    os.rename(directory, aside)  # the state a crash leaves between "old aside" and "new in"
    (directory.parent / ".ck.tmp-crashed").mkdir()  # and a half-written temporary directory
    with pytest.raises(MinillamaError, match=r"\.ck\.old"):
        load(directory)
    assert_same_weights(old, load(aside)[0])  # complete where it waits
    new = random_model(make_cfg("gqa"), seed=3)
    save(new, None, directory)  # restores, then replaces
    assert_same_weights(new, load(directory)[0])
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ck"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a MinillamaError naming the key or tensor and the file
# ---------------------------------------------------------------------------------------------------------------
def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    path.write_text(json.dumps(hf))


def edit_weights(directory: Path, drop: str | None = None, add: dict | None = None) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "config.json").unlink(), r"config\.json: not found"),
    (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: invalid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    (lambda d: edit_config(d, model_type="mistral"), r"config\.json: model_type='mistral', expected 'llama'"),
    (lambda d: edit_config(d, model_type=None), r"config\.json: model_type=None"),
    (lambda d: edit_config(d, vocab_size=None), r"config\.json: missing required key 'vocab_size'"),
    (lambda d: edit_config(d, hidden_size="64"), r"config\.json: hidden_size must be an integer, got '64'"),
    (lambda d: edit_config(d, hidden_size=64.5), r"config\.json: hidden_size must be an integer, got 64\.5"),
    (lambda d: edit_config(d, tie_word_embeddings=1),
     r"config\.json: tie_word_embeddings must be true or false, got 1"),
    (lambda d: edit_config(d, rms_norm_eps=True), r"config\.json: rms_norm_eps must be a number, got True"),
    (lambda d: edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": "8",
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}),
     r"config\.json: rope_parameters: factor must be a number, got '8'"),
    (lambda d: edit_config(d, hidden_size=65, head_dim=None),
     r"config\.json: hidden_size=65 is not divisible by num_attention_heads=8"),
    (lambda d: edit_config(d, num_key_value_heads=3),
     r"config\.json: num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    (lambda d: edit_config(d, num_hidden_layers=0), r"config\.json: num_hidden_layers=0 must be positive"),
    (lambda d: edit_config(d, head_dim=7, hidden_size=56), r"config\.json: .*head_dim=7 must be even"),
    (lambda d: edit_config(d, attention_bias=True), r"config\.json: attention_bias=true is not supported"),
    (lambda d: edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     r"config\.json: rope_parameters\.rope_type='yarn' is not supported"),
    (lambda d: edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     r"config\.json: rope_parameters: missing required key 'low_freq_factor'"),
    (lambda d: edit_config(d, intermediate_size=200),
     r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\) but config\.json "
     r"implies \(\d+, \d+\)"),
    (lambda d: edit_weights(d, drop="model.layers.1.self_attn.k_proj.weight"),
     r"tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing \(read model\.safetensors\)"),
    (lambda d: edit_weights(d, drop="lm_head.weight"), r"tensor lm_head\.weight is missing"),
    (lambda d: edit_weights(d, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"),
    (lambda d: edit_weights(d, add={"model.layers.2.input_layernorm.weight": torch.ones(64)}),
     r"model\.safetensors: unexpected tensor model\.layers\.2\.input_layernorm\.weight .*2 layers"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
     r"model\.safetensors: not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
     r"model\.safetensors: not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), r"no model\.safetensors and no model\.safetensors\.index\.json"),
], ids=["no-config", "bad-json", "not-object", "model-type", "no-model-type", "missing-key", "wrong-type",
        "fractional-int", "int-for-bool", "bool-for-float", "string-in-rope",
        "indivisible", "kv-heads", "zero-layers", "odd-head-dim", "bias", "rope-type", "rope-key", "shape",
        "missing-tensor", "missing-lm-head", "extra-tensor", "extra-layer", "truncated", "corrupt", "no-weights"])
def test_bad_checkpoint_is_refused(saved, edit, message):
    directory, _ = saved
    edit(directory)
    with pytest.raises(MinillamaError, match=message):
        load(directory)


def test_index_naming_a_missing_shard(tmp_path):
    directory = save(random_model(make_cfg("gqa")), None, tmp_path / "ck", max_shard_bytes=40_000)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MinillamaError, match=rf"index\.json names shard {shard.name}, which is missing"):
        load(directory)


def test_index_with_a_truncated_shard_names_the_shard(tmp_path):
    directory = save(random_model(make_cfg("gqa")), None, tmp_path / "ck", max_shard_bytes=40_000)
    shard = sorted(directory.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MinillamaError, match=rf"{shard.name}: not a readable safetensors"):
        load(directory)


def test_missing_directory_and_bad_arguments(tmp_path):
    with pytest.raises(MinillamaError, match=r"checkpoint directory .*nowhere not found"):
        load(tmp_path / "nowhere")
    model = random_model(make_cfg("mha"))
    with pytest.raises(MinillamaError, match="max_shard_bytes must be a positive integer"):
        save(model, None, tmp_path / "ck", max_shard_bytes=0)
    with torch.device("meta"):
        unmaterialised = Transformer(make_cfg("mha"))
    with pytest.raises(MinillamaError, match="tok_embeddings.weight: it is on the meta device"):
        save(unmaterialised, None, tmp_path / "ck")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinillamaError, match="exists and is not a directory"):
        save(model, None, tmp_path / "file")


def test_checkpoint_module_never_unpickles():
    """torch.load and pickle execute code from the file; safetensors cannot. transformers is a test dependency."""
    tree = ast.parse(Path(ckpt.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            modules = []
        for module in modules:
            assert module.split(".")[0] not in {"pickle", "cloudpickle", "dill", "joblib", "transformers"}, module
            assert module != "torch.load", module
        if isinstance(node, ast.Attribute):
            assert not (node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch")
            assert node.attr not in {"loads", "Unpickler"} or ast.unparse(node.value) == "json"
        if isinstance(node, ast.Name):
            assert node.id not in {"pickle", "transformers"}


def test_package_exports_load_and_save():
    assert minillama.load is load and minillama.save is save
