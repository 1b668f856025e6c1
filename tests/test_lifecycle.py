"""The lifecycle on any model: quantize_ -> train -> convert_ -> save_quantized -> load_quantized. On nn.Sequential, a
custom module with nested linears, the project's Llama and a transformers Llama, the converted and the reloaded model
give the QAT model's eval outputs to the last bit (CPU, fp32), for every grid the packed format has a layout for. Bad
input (nothing to convert, another model's directory, a changed file, a non-empty directory) is refused with one
exception before anything is written or changed."""

import copy
import json
import struct

import pytest
import torch
from torch import nn

import quest_pl
from quest_pl.config import ConfigError
from quest_pl.convert import PackedLinear, convert_
from quest_pl.model import Llama, LlamaConfig
from quest_pl.quant import QuantConfig, quant_layers, quantize_, quantize_model
from quest_pl.saving import MODEL_FILE, load_quantized, read_packed, save_quantized

D = 64  # hidden width: Hadamard blocks of 32 (16 for NVFP4)


class Nested(nn.Module):
    """Linears at several depths, one with and one without a bias, a non-linear in between, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(D, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(D, 2 * D, bias=False), "down": nn.Linear(2 * D, D)}) for _ in range(2)
        )
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


def sequential():
    return nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D, bias=False), nn.GELU(), nn.Linear(D, 10))


def project_llama():
    return Llama(LlamaConfig(vocab_size=200, n_layer=2, d_model=D, n_head=2, seq_len=16))


def hf_config():
    import transformers  # the [hf] extra: scripts/setup.sh installs it, so this never skips

    return transformers.LlamaConfig(
        vocab_size=200, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip


def hf_llama():
    import transformers

    return transformers.LlamaForCausalLM(hf_config())


def tokens():
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def features():
    return torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))


KINDS = {
    "sequential": (sequential, features, lambda m, x: m(x)),
    "nested": (Nested, features, lambda m, x: m(x)),
    "llama": (project_llama, tokens, lambda m, x: m(x)),
    "hf_llama": (hf_llama, tokens, lambda m, x: m(x).logits),
}


def qat(build, batch, config, seed=0):
    """A model quantized with ``config`` and trained a few steps (latent weights and learned scales move)."""
    torch.manual_seed(seed)
    model = build()
    if isinstance(model, Llama):
        quantize_model(model, config)
    else:
        quantize_(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(batch)
        out = getattr(out, "logits", out)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def mk(**kw):
    return QuantConfig.make(**{"estimator": "trust", "hadamard_block": 32, **kw})


GRIDS = {
    "quest_w4a4_half": mk(grid="gaussian_mse", bits=4, hadamard=True),
    "quest_w2a2_full": mk(grid="gaussian_mse", bits=2, hadamard=True, hadamard_mode="full"),
    "quest_w1a1_clip": mk(grid="gaussian_mse", bits=1, estimator="clip", clip_scale=1.3, hadamard=True),
    "int8_weight_only": mk(grid="gaussian_mse", bits=8, a_bits=None),
    "act_only": mk(grid="gaussian_mse", bits=4, w_bits=None, hadamard=True),
    "lloyd_max_w4a4": mk(grid="lloyd_max", bits=4, hadamard=True),
    "fp4_w4a4_full": mk(grid="fp4", bits=4, hadamard=True, hadamard_mode="full"),
    "ternary": mk(grid="ternary", bits=1.585, hadamard=True),
    "uniform_w3a3": mk(grid="uniform", bits=3),
    "int_sparse24_w4a4": mk(grid="int_sparse24", bits=4, a_grid="gaussian_mse", hadamard=True),
    "lsq_w4a4": mk(grid="gaussian_mse", bits=4, estimator="lsq", hadamard=True),
    "lsq_per_row_w4": mk(grid="gaussian_mse", bits=4, a_bits=None, estimator="lsq", lsq_per_row=True),
    "pact_w4a4": mk(grid="gaussian_mse", bits=4, estimator="pact"),
    "int4_group32": mk(grid="gaussian_mse", bits=4, group_size=32, hadamard=True),
    "mxfp4": mk(grid="mxfp4", bits=4, scale_rule="absmax", hadamard=True),
    "nvfp4_four_over_six": mk(grid="nvfp4", bits=4, scale_rule="four_over_six", hadamard=True, hadamard_block=16),
}


def round_trip(kind, config, tmp_path):
    build, make_batch, run = KINDS[kind]
    batch = make_batch()
    model = qat(build, batch, config)
    with torch.no_grad():
        want = run(model, batch)
    n_quantized = len(quant_layers(model))
    assert convert_(model) is model
    assert not quant_layers(model) and len([m for m in model.modules() if isinstance(m, PackedLinear)]) == n_quantized
    with torch.no_grad():
        assert torch.equal(run(model, batch), want)  # converted: to the last bit
    save_quantized(model, tmp_path / "saved")
    skeleton = hf_config() if kind == "hf_llama" else build()
    loaded = load_quantized(tmp_path / "saved", skeleton)
    with torch.no_grad():
        got = run(loaded, batch)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)  # reloaded: to the last bit


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("grid", ["quest_w4a4_half", "mxfp4"])
def test_lifecycle_on_four_model_kinds_is_bit_exact(kind, grid, tmp_path):
    round_trip(kind, GRIDS[grid], tmp_path)


@pytest.mark.parametrize("grid", [g for g in GRIDS if g not in ("quest_w4a4_half", "mxfp4")])
def test_lifecycle_every_grid_is_bit_exact(grid, tmp_path):
    round_trip("nested", GRIDS[grid], tmp_path)


def test_top_level_names():
    assert quest_pl.convert_ is convert_
    assert quest_pl.save_quantized is save_quantized and quest_pl.load_quantized is load_quantized


def converted(kind="nested", config="quest_w4a4_half"):
    build, make_batch, _ = KINDS[kind]
    return convert_(qat(build, make_batch(), GRIDS[config]))


def test_convert_refuses_a_model_with_nothing_to_convert():
    plain = Nested()
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="no QuantLinear layer; quantize it"):
        convert_(plain)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    model = converted()
    with pytest.raises(ValueError, match="already converted"):
        convert_(model)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        convert_("model")


def test_convert_refuses_an_uninitialised_learned_scale_and_changes_nothing():
    model = quantize_(Nested(), GRIDS["lsq_w4a4"])  # no forward: the LSQ steps were never set from data
    with pytest.raises(ValueError, match="never initialised"):
        convert_(model)
    assert len(quant_layers(model)) == 5  # nothing was replaced


def test_save_refuses_a_non_empty_directory_and_an_unconverted_model(tmp_path):
    model = converted()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        save_quantized(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_quantized(model, tmp_path / "file")
    with pytest.raises(ValueError, match=r"call quest_pl.convert_\(model\) first"):
        save_quantized(quantize_(Nested(), GRIDS["quest_w4a4_half"]), tmp_path / "unconverted")
    with pytest.raises(ValueError, match="no packed layer"):
        save_quantized(Nested(), tmp_path / "plain")
    assert not (tmp_path / "unconverted").exists() and not (tmp_path / "plain").exists()
    save_quantized(model, target, overwrite=True)  # replaces the whole directory
    assert sorted(p.name for p in target.iterdir()) == ["config.json", MODEL_FILE]


def test_killed_save_keeps_the_previous_directory_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    import os

    from quest_pl import saving

    model = converted()
    save_quantized(model, tmp_path / "out")
    before = (tmp_path / "out" / MODEL_FILE).read_bytes()
    real_fsync = os.fsync

    def killed(fd):  # dies while the new directory is being written
        raise KeyboardInterrupt

    monkeypatch.setattr(saving.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(converted(config="mxfp4"), tmp_path / "out", overwrite=True)
    monkeypatch.setattr(saving.os, "fsync", real_fsync)
    assert (tmp_path / "out" / MODEL_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the failed save removed its temporary directory
    stale = tmp_path / ".tmp-out.killed"  # what a SIGKILL leaves: removed by the next save
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"\0" * 1000)
    save_quantized(model, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_refuses_another_models_directory_and_leaves_the_skeleton_alone(tmp_path):
    save_quantized(converted(), tmp_path / "nested")
    other = sequential()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ConfigError, match="layer stem of the file is not in the Sequential"):
        load_quantized(tmp_path / "nested", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    wider = Nested()
    wider.head = nn.Linear(D, 7)  # same quantized layers, another head
    with pytest.raises(ConfigError, match=r"tensor head\.(weight|bias) is .*: another model"):
        load_quantized(tmp_path / "nested", wider)
    assert isinstance(wider.stem, nn.Linear) and not isinstance(wider.stem, PackedLinear)
    extra = Nested()
    extra.register_buffer("calibration", torch.zeros(3))
    with pytest.raises(ConfigError, match="missing calibration"):
        load_quantized(tmp_path / "nested", extra)
    with pytest.raises(ConfigError, match="no packed model"):
        load_quantized(tmp_path / "nowhere", Nested())


def _data_offset(path):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n, json.loads(path.read_bytes()[8 : 8 + n])


def test_load_refuses_a_changed_or_damaged_file(tmp_path):
    save_quantized(converted(), tmp_path / "out")
    path = tmp_path / "out" / MODEL_FILE
    good = path.read_bytes()
    start, header = _data_offset(path)
    begin, _ = header["stem.scale"]["data_offsets"]

    # one scale overwritten with NaN, the file otherwise intact: the digest no longer matches
    blob = bytearray(good)
    blob[start + begin : start + begin + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="does not match its digest"):
        load_quantized(tmp_path / "out", Nested())

    # the same NaN with a digest recomputed over it (a tool that rewrote the file): the finiteness check
    from quest_pl.saving import serialize

    tensors, config = read_packed_unchecked(good)
    tensors["stem.scale"][0] = float("nan")
    path.write_bytes(serialize(tensors, config))
    with pytest.raises(ConfigError, match=r"stem\.scale holds NaN"):
        load_quantized(tmp_path / "out", Nested())

    # cut short (a copy interrupted): a damaged file, not a traceback from safetensors
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        read_packed(tmp_path / "out")

    # a file without the digest, claiming the current version
    from safetensors.torch import save

    tensors, config = read_packed_unchecked(good)
    path.write_bytes(save(tensors, metadata={"quest_pl": json.dumps(config)}))
    with pytest.raises(ConfigError, match="has no digest"):
        read_packed(tmp_path / "out")


def read_packed_unchecked(blob):
    from safetensors.torch import load

    tensors = load(blob)
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    config = json.loads(json.loads(blob[8:start])["__metadata__"]["quest_pl"])
    return tensors, config
