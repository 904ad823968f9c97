"""The model as SPEC.md defines it: sizes, masks, positional encoding, persistence."""

import json
import math

import numpy as np
import pytest
import torch

from astromer_fast import Astromer, AstromerConfig, from_pretrained
from astromer_fast.kernels import available_backends
from astromer_fast.weights import WeightsError


def random_batch(B=3, L=200, n_valid=(200, 57, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(B, L, generator=g) * 2000 - 1000, dim=1).values
    m = torch.randn(B, L, generator=g)
    valid = torch.arange(L)[None, :] < torch.tensor(n_valid)[:, None]
    return t * valid, m * valid, valid


def test_parameter_counts():
    m2 = Astromer(AstromerConfig.astromer2())
    assert m2.num_parameters() == 3_953_410
    enc = sum(p.numel() for n, p in m2.named_parameters()
              if not n.startswith("head.") and n != "embedding.mask_token")
    assert enc == 3_952_640
    assert sum(p.numel() for p in m2.head.parameters()) == 769
    assert m2.embedding.mask_token.numel() == 1
    assert Astromer(AstromerConfig.astromer1()).num_parameters() == 661_505


def test_default_config_is_astromer2():
    c = AstromerConfig()
    assert (c.n_blocks, c.dff, c.use_leak, c.use_token, c.mask_rule, c.pe_base) == (
        6, 512, True, True, "key", 10000.0)
    c1 = AstromerConfig.astromer1()
    assert (c1.n_blocks, c1.dff, c1.use_leak, c1.use_token, c1.mask_rule) == (
        2, 128, False, False, "query_or_key_plus1")
    with pytest.raises(ValueError, match="mask_rule"):
        AstromerConfig(mask_rule="causal")


@pytest.mark.parametrize("backend", available_backends(torch.device("cpu")))
def test_positional_encoding_matches_float64_formula(backend):
    """PE through the model's input embedding (projection zeroed) vs the SPEC formula evaluated in
    float64 at the same float32 times, |t| up to 3000 days. Tolerance 2e-6 absolute: the float32
    rounding of the output (<= 6e-8) plus the kernels' angle arithmetic; a float32 angle would be
    off by ~1e-4 at these times, a wrong base or channel pairing by O(1)."""
    model = Astromer()
    with torch.no_grad():
        model.embedding.mag_proj.weight.zero_()
        model.embedding.mag_proj.bias.zero_()
    t = torch.linspace(-3000, 3000, 4001, dtype=torch.float32).reshape(1, -1)
    m = torch.zeros_like(t)
    hidden = torch.zeros_like(t, dtype=torch.bool)
    got = model.embedding(t, m, hidden, backend=backend).detach().double().numpy()[0]
    j = np.arange(256)
    omega = 10000.0 ** (-2.0 * j / 256)
    ang = t.double().numpy()[0][:, None] * omega[None, :]
    want = np.where(j % 2 == 0, np.sin(ang), np.cos(ang))
    assert np.abs(got - want).max() < 2e-6


def test_token_replaces_hidden_magnitudes():
    model = Astromer()
    with torch.no_grad():
        model.embedding.mask_token.fill_(0.7)
    t, m, valid = random_batch()
    hidden = ~valid
    x = model.embedding(t, m, hidden, backend="torch")
    m2 = torch.where(hidden, torch.tensor(0.7), m)
    x2 = model.embedding(t, m2, torch.zeros_like(hidden), backend="torch")
    torch.testing.assert_close(x, x2, rtol=0, atol=1e-6)


def test_heads_split_channels_in_order():
    torch.manual_seed(0)
    model = Astromer().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 256)
    from astromer_fast.kernels.masked_attention import AttentionMask

    got, w = attn(x, AttentionMask(torch.zeros(2, 9, dtype=torch.bool), "key"), need_weights=True)
    q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
    outs = []
    for h in range(4):
        sl = slice(64 * h, 64 * h + 64)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 8.0, -1)
        outs.append(p @ v[..., sl])
    torch.testing.assert_close(got, attn.wo(torch.cat(outs, -1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["astromer2", "astromer1"])
def test_padding_cut_changes_nothing_and_no_nan(preset):
    """Hidden keys get exactly zero weight (v2), so cutting padding is exact; this is what the
    length-trimmed batches of embedding and training rely on. v1's +1 rule is not a mask, so the
    cut is checked only for v2. All-hidden rows stay finite in both."""
    torch.manual_seed(1)
    model = Astromer(AstromerConfig.preset(preset)).eval()
    t, m, valid = random_batch(n_valid=(120, 57, 0))
    with torch.no_grad():
        full = model(t, m, ~valid)
        assert torch.isfinite(full).all()
        if preset == "astromer2":
            cut = model(t[:, :120], m[:, :120], ~valid[:, :120])
            torch.testing.assert_close(full[:, :120][valid[:, :120]], cut[valid[:, :120]],
                                       rtol=1e-5, atol=1e-5)


def test_sdpa_path_matches_math_path():
    torch.manual_seed(2)
    model = Astromer().eval()
    t, m, valid = random_batch()
    with torch.no_grad():
        a = model.encode(t, m, ~valid).last
        b = model.encode(t, m, ~valid, backend="sdpa").last
        with pytest.warns(DeprecationWarning, match="backend='sdpa'"):
            c = model.encode(t, m, ~valid, use_sdpa=True).last
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contradicts"):
        model.encode(t, m, ~valid, backend="cpu", use_sdpa=True)


def test_embeddings_shapes_and_pooling_ignores_padding():
    torch.manual_seed(3)
    model = Astromer().eval()
    t, m, valid = random_batch()
    e = model.embed_windows(t, m, valid)
    layers = model.embed_windows(t, m, valid, layers=True)
    assert e.shape == (3, 256) and layers.shape == (3, 7, 256)
    torch.testing.assert_close(layers[:, -1], e)
    out = model.encode(t, m, ~valid).last
    torch.testing.assert_close(e[1], out[1, :57].mean(0), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(e).all()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(4)
    model = Astromer().eval()
    with torch.no_grad():
        model.embedding.mask_token.fill_(-0.3)
    t, m, valid = random_batch()
    model.save_pretrained(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["config"]["n_blocks"] == 6
    again = from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(t, m, ~valid), again(t, m, ~valid))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert len(again.pretrained_info["sha256"]) == 64


def test_from_pretrained_refuses_bad_directories(tmp_path):
    Astromer(AstromerConfig.astromer1()).save_pretrained(tmp_path / "v1")
    d = tmp_path / "v1"
    # A config that names another layout than the tensors: every mismatch is named.
    doc = json.loads((d / "config.json").read_text())
    doc["config"].update(n_blocks=6, dff=512, use_leak=True, use_token=True, name="astromer2")
    bad = tmp_path / "mismatch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(doc))
    (bad / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"missing tensors \[.*blocks\.2\.attn"):
        from_pretrained(bad)
    with pytest.raises(WeightsError, match="mis-shaped tensors.*ffn1.weight"):
        from_pretrained(bad)
    # Truncated weights file.
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((d / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightsError, match="unreadable safetensors"):
        from_pretrained(trunc)
    # Not JSON / not our config / no directory.
    (trunc / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        from_pretrained(trunc)
    (trunc / "config.json").write_text('{"hello": 1}')
    with pytest.raises(WeightsError, match="not an astromer_fast config"):
        from_pretrained(trunc)
    with pytest.raises(WeightsError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere")


def test_model_trains_through_the_fused_embedding():
    """Gradients reach every parameter, the token included, through the custom op."""
    torch.manual_seed(5)
    model = Astromer(AstromerConfig(n_blocks=2))
    t, m, valid = random_batch(n_valid=(200, 100, 30))
    hidden = ~valid
    hidden[:, 3:9] = True
    out = model(t, m, hidden)
    (out[valid] ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.embedding.mask_token.grad.abs().item() > 0
    assert not math.isnan(float(out.detach().sum()))
