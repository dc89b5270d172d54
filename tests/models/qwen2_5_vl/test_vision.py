"""Vision tower parity with transformers: window index, pre-merger states, merged image embeddings (1e-5)."""

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from cpt_jax.models.qwen2_5_vl import vision_inputs
from cpt_jax.models.qwen2_5_vl.vision import patch_positions, window_index
from tests.models.qwen2_5_vl import reference as ref

TOL = 1e-5
GRIDS = [[(1, 12, 20), (1, 8, 8)], [(2, 8, 12)], [(1, 4, 4), (1, 16, 4), (1, 6, 10)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_window_index_matches_transformers(grids):
    vc = ref.tiny_config().vision
    ours, cu = window_index(np.array(grids), vc)
    theirs, cu_theirs = get_vision_window_index(torch.tensor(grids), vc.spatial_merge_size, vc.window_size,
                                                vc.patch_size)
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(cu, cu_theirs.numpy())


def test_window_boundaries_of_the_reference_example():
    _, cu = window_index(np.array([(1, 12, 20), (1, 8, 8)]), ref.tiny_config().vision)
    np.testing.assert_array_equal(cu, [0, 64, 128, 160, 192, 224, 240, 304])


def test_patch_positions_are_block_major():
    pos = patch_positions(np.array([(1, 4, 6)]), 2)
    np.testing.assert_array_equal(pos[:6], [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3]])


def _hf_visual(hf_model, pv, grids):
    with torch.no_grad():
        out = hf_model.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(np.array(grids)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("grids", GRIDS)
def test_tower_matches_transformers(model, hf_model, grids):
    rng = np.random.default_rng(0)
    pv = ref.pixels(rng, grids)
    n = pv.shape[0]
    inputs = vision_inputs(pv, np.array(grids), model.config.vision, pad_to=n + 20)  # a padded patch bucket
    hidden = np.asarray(model.visual.encode(inputs))[:n]
    merged = np.asarray(model.visual(inputs))[:n // 4]
    hf_hidden, hf_merged = _hf_visual(hf_model, pv, grids)
    assert np.abs(hf_merged).max() > 1.0
    assert np.abs(hidden - hf_hidden).max() <= TOL
    assert np.abs(merged - hf_merged).max() <= TOL


def test_padding_does_not_change_real_outputs(model):
    rng = np.random.default_rng(1)
    grids = [(1, 8, 8)]
    pv = ref.pixels(rng, grids)
    exact = np.asarray(model.visual(vision_inputs(pv, np.array(grids), model.config.vision)))
    padded = np.asarray(model.visual(vision_inputs(pv, np.array(grids), model.config.vision, pad_to=128)))
    np.testing.assert_allclose(padded[:16], exact, atol=TOL, rtol=0)  # other shapes, other summation order


@pytest.mark.parametrize("pad_to, match", [(60, "pad_to=60"), (66, "multiple of 4")])
def test_bad_patch_bucket_is_an_error(model, pad_to, match):
    pv = np.zeros((64, 1176), np.float32)
    with pytest.raises(ValueError, match=match):
        vision_inputs(pv, np.array([(1, 8, 8)]), model.config.vision, pad_to=pad_to)


def test_pixel_rows_must_match_the_grid(model):
    with pytest.raises(ValueError, match="pixel_values has shape"):
        vision_inputs(np.zeros((60, 1176), np.float32), np.array([(1, 8, 8)]), model.config.vision)
