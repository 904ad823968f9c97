"""The released weights: Astromer 1 reconstructs real MACHO curves; the v2 layout maps completely."""

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from astromer_fast import Astromer, AstromerConfig, load_official_checkpoint
from astromer_fast.data import Curves, basic_clean, make_windows, probe_masks
from astromer_fast.training import probed_metrics
from astromer_fast.weights.official import infer_architecture, official_name_map
from astromer_fast.weights.tf_checkpoint import CheckpointError, read_index


@pytest.fixture(scope="module")
def v1_zip():
    from conftest import shared_data_dir

    path = shared_data_dir() / "official_weights" / "astromer1_macho_a0.zip"
    if not path.is_file():
        pytest.skip(f"released Astromer 1 weights not available: {path} is absent")
    return path


@pytest.fixture(scope="module")
def macho_windows():
    """Random 200-observation windows of the real MACHO R-band curves, 50% probed, as v1 was
    trained: probed values stay visible in the input, probed and padding are 'hidden' for v1's
    (+1) mask rule."""
    from conftest import shared_data_dir

    path = shared_data_dir() / "macho.parquet"
    if not path.is_file():
        pytest.skip(f"real MACHO curves not available: {path} is absent")
    table = pq.read_table(path)
    table = table.filter(pc.equal(table["band"], "R"))
    curves, _ = basic_clean(Curves.from_arrow(table["lightcurve"]))
    rng = np.random.default_rng(0)
    w = make_windows(curves, window=200, mode="random", rng=rng)
    masks = probe_masks(w.valid, rng, probed_frac=0.5, same_frac=0.2, random_frac=0.2)
    hidden = masks.probed | ~w.valid
    return (torch.from_numpy(w.t), torch.from_numpy(w.m), torch.from_numpy(hidden),
            torch.from_numpy(masks.probed))


def r2_of(model, batch):
    t, m, hidden, probed = batch
    with torch.no_grad():
        pred = model(t, m, hidden)
    return probed_metrics(pred, m, probed)


def test_v1_released_weights_reconstruct_real_macho(v1_zip, macho_windows):
    model = load_official_checkpoint(v1_zip)
    assert model.config.name == "astromer1" and model.num_parameters() == 661_505
    met = r2_of(model, macho_windows)
    print(f"Astromer 1 released weights, MACHO R: probed R2 {met['r2']:.4f}, "
          f"RMSE {met['rmse']:.4f} over {met['n']} probed observations")
    assert met["n"] > 5000
    assert met["r2"] >= 0.99


@pytest.mark.parametrize("break_it", ["pe_base_1000", "key_only_mask", "no_transpose"])
def test_v1_check_discriminates(v1_zip, macho_windows, break_it):
    """The R² test is only worth something if plausible mistakes fail it."""
    if break_it == "pe_base_1000":
        model = load_official_checkpoint(v1_zip, config=AstromerConfig.astromer1(pe_base=1000.0))
    elif break_it == "key_only_mask":
        model = load_official_checkpoint(v1_zip, config=AstromerConfig.astromer1(mask_rule="key"))
    else:
        model = load_official_checkpoint(v1_zip)
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.wq.weight.copy_(blk.attn.wq.weight.T.clone())
                blk.attn.wk.weight.copy_(blk.attn.wk.weight.T.clone())
    r2 = r2_of(model, macho_windows)["r2"]
    print(f"broken ({break_it}): probed R2 {r2:.4f}")
    assert r2 < 0.9


def test_v2_index_maps_onto_astromer2_modules():
    from conftest import shared_data_dir

    path = shared_data_dir() / "official_weights" / "astromer2_skipclf_alcock.weights.index"
    if not path.is_file():
        pytest.skip(f"Astromer 2 index not available: {path} is absent")
    index = read_index(path)
    arch = infer_architecture({k: v.shape for k, v in index.items()})
    # A classifier checkpoint: the authors' classifier never masks, so it saves no MASK token.
    assert (arch["n_blocks"], arch["dff"], arch["use_leak"], arch["use_token"]) == (6, 512, True,
                                                                                   False)
    cfg = AstromerConfig.astromer2()
    names = official_name_map(index, n_blocks=6, dff=512, use_leak=True, use_token=True,
                              require_head=False, require_token=False)
    expected = Astromer(cfg).state_dict()
    encoder = {k for k in expected if not k.startswith("head.") and k != "embedding.mask_token"}
    assert encoder <= set(names), f"unmapped: {sorted(encoder - set(names))}"
    for ours, (official, transpose) in names.items():
        shape = tuple(index[official].shape)
        if transpose:
            shape = shape[::-1]
        if ours == "embedding.mag_proj.weight":
            assert int(np.prod(shape)) == 256
            continue
        assert int(np.prod(shape)) == expected[ours].numel(), ours
        if len(shape) == expected[ours].dim():
            assert shape == tuple(expected[ours].shape), ours


def test_load_official_refuses_bad_files(tmp_path, v1_zip):
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError):
        load_official_checkpoint(text)
    with pytest.raises(CheckpointError, match="(?i)missing|not match|shape"):
        load_official_checkpoint(v1_zip, config=AstromerConfig.astromer2())
