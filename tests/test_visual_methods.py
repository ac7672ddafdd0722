"""Visual methods (RandomPrune, UniformGrid, HoloV, VisionZip, FlowCut) against independent
references written here from the papers / public code descriptions, on small random cases."""

import math

import pytest
import torch

import tokenprune as tp
from tokenprune import ImageTokens


def _image(n=36, d=16, grid=(6, 6), seed=0, layers=5):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    attn = torch.rand(n, generator=g)
    extras = {
        "keys": torch.randn(n, 8, generator=g),
        "flow_layers": [
            {"attention": torch.rand(n, generator=g).softmax(0), "value_similarity": torch.rand(n, generator=g),
             "value_norm": torch.rand(n, generator=g) + 0.5}
            for _ in range(layers)
        ],
    }
    return ImageTokens(features=feats, grid=grid, cls_attention=attn / attn.sum(), extras=extras)


ALL = [tp.RandomPrune, tp.UniformGrid, tp.HoloV, tp.VisionZip, tp.FlowCut]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("keep", [1, 5, 12, 0.25, 36, 100, 1.0])
def test_exact_count_ascending_unique(cls, keep):
    image = _image()
    method = cls(keep=keep)
    kept = method.select(image)
    expected = min(keep, 36) if isinstance(keep, int) else max(1, int(math.floor(keep * 36 + 0.5)))
    assert kept.numel() == expected
    assert torch.equal(kept, torch.sort(kept).values) and kept.unique().numel() == expected
    assert method.merge(image, kept).shape == (expected, 16)
    if expected == 36:  # keep-all: every token, unchanged embeddings
        assert torch.equal(kept, torch.arange(36)) and torch.equal(method.merge(image, kept), image.features)


@pytest.mark.parametrize("cls", ALL)
def test_registered_and_validated(cls):
    assert tp.build(cls.name, keep=8) == cls(keep=8)
    for bad in (0, -1, 1.5, 0.0):
        with pytest.raises(ValueError, match="keep"):
            cls(keep=bad)
    with pytest.raises(TypeError, match="keep"):
        cls(keep="8")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="crops"):
        tp.HoloV(crops=0)
    with pytest.raises(ValueError, match="layout"):
        tp.HoloV(layout="diagonal")
    with pytest.raises(ValueError, match="alpha"):
        tp.HoloV(alpha=-1)
    with pytest.raises(ValueError, match="contextual_ratio"):
        tp.VisionZip(contextual_ratio=1.0)
    with pytest.raises(ValueError, match="decay"):
        tp.FlowCut(decay=1.0)
    with pytest.raises(TypeError, match="seed"):
        tp.RandomPrune(seed=1.5)
    with pytest.raises(ValueError, match="query"):
        tp.FastV(query="mean")
    image = ImageTokens(features=torch.randn(9, 4))
    with pytest.raises(ValueError, match="cls_attention"):
        tp.HoloV(keep=3).select(image)
    with pytest.raises(ValueError, match="flow_layers"):
        tp.FlowCut(keep=3).select(image)


# ----------------------------------------------------------------------------- RandomPrune


def test_random_depends_on_seed_and_size_only():
    a, b = _image(seed=1), _image(seed=2)
    m = tp.RandomPrune(keep=8, seed=3)
    assert torch.equal(m.select(a), m.select(b))  # same size: same draw, whatever the content
    assert torch.equal(m.select_batch([a, b])[1], m.select(b))
    assert not torch.equal(m.select(a), tp.RandomPrune(keep=8, seed=4).select(a))
    ref = torch.sort(torch.randperm(36, generator=torch.Generator().manual_seed(3))[:8]).values
    assert torch.equal(m.select(a), ref)


# ----------------------------------------------------------------------------- UniformGrid


def test_grid_is_a_lattice():
    image = ImageTokens(features=torch.randn(576, 4), grid=(24, 24))
    kept = tp.UniformGrid(keep=64).select(image)
    rows, cols = kept // 24, kept % 24
    assert sorted(set(rows.tolist())) == [1, 4, 7, 10, 13, 16, 19, 22]  # 8x8 cell centres, stride 3
    assert sorted(set(cols.tolist())) == [1, 4, 7, 10, 13, 16, 19, 22]


def test_grid_splits_budget_over_blocks():
    # NeXT-like: a 4x4 base grid then an 8x6 grid; budget 16 -> 4 + 12 by size (16:48).
    image = ImageTokens(features=torch.randn(64, 4), blocks=[(0, 4, 4), (16, 8, 6)])
    kept = tp.UniformGrid(keep=16).select(image)
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 12
    assert set(kept[kept < 16].tolist()) == {5, 7, 13, 15}  # centres of the 2x2 cells of the 4x4 grid


# ----------------------------------------------------------------------------- HoloV


def _holov_reference(features, attention, crops, keep, alpha=0.09):
    """Public-code HoloV (raster chunks), without its zero padding (no overflow in these cases)."""
    n = features.shape[0]
    size, rem = divmod(n, crops)
    chunks, start = [], 0
    for p in range(crops):
        length = size + (1 if p < rem else 0)
        chunks.append(list(range(start, start + length)))
        start += length
    weights = []
    for chunk in chunks:
        x = features[chunk]
        a = attention[chunk] * 1e3
        m = len(chunk)
        xn = x / (x.norm(dim=1, keepdim=True) + 1e-6)
        s = (xn @ xn.T) * (1 - torch.eye(m))
        mean = s.sum(1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (m - 1)
        scale = a.abs().mean() / (var.abs().mean() + 1e-6)
        weights.append(float((a + alpha * var * scale).mean()))
    w = torch.tensor(weights)
    w = w / w.sum()
    alloc = (w * keep).floor().long()
    remaining = keep - int(alloc.sum())
    for idx in torch.topk(w, remaining).indices.tolist():
        alloc[idx] += 1
    kept = []
    for chunk, q in zip(chunks, alloc.tolist()):
        if q:
            top = torch.topk(attention[chunk], q).indices
            kept += [chunk[i] for i in top.tolist()]
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holov_matches_public_rule(seed):
    image = _image(n=64, grid=(8, 8), seed=seed)
    kept = tp.HoloV(keep=16, crops=4, layout="raster").select(image)
    assert kept.tolist() == _holov_reference(image.features, image.cls_attention, 4, 16)


def test_holov_grid_crops_and_overflow():
    image = _image(n=64, grid=(8, 8), seed=5)
    m = tp.HoloV(keep=16, crops=4)
    crops = m.crop_indices(image)
    assert [c.tolist() for c in crops][0] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    # A crop with overwhelming attention gets a quota above its size: the excess flows on, no padding.
    attention = torch.full((64,), 1e-4)
    attention[crops[0]] = 1.0
    image.cls_attention = attention
    kept = tp.HoloV(keep=40, crops=4).select(image)
    assert kept.numel() == 40 and set(crops[0].tolist()) <= set(kept.tolist())


# ----------------------------------------------------------------------------- VisionZip


def test_visionzip_dominant_and_contextual():
    image = _image(n=64, grid=(8, 8), seed=3)
    m = tp.VisionZip(keep=16)
    assert m.counts(64) == (14, 2) and tp.VisionZip(keep=64).counts(576) == (54, 10)
    kept = m.select(image)
    attention, keys, feats = image.cls_attention, image.extras["keys"], image.features
    dominant = set(torch.topk(attention, 14).indices.tolist())
    rest = [i for i in range(64) if i not in dominant]
    step = len(rest) // 2
    targets = [rest[0], rest[step]]
    assert set(kept.tolist()) == dominant | set(targets)
    kn = keys / keys.norm(dim=1, keepdim=True)
    members = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            members[targets[int(torch.argmax(kn[i] @ kn[targets].T))]].append(i)
    merged = m.merge(image, kept)
    for t in targets:
        expect = feats[t] + (feats[members[t]].mean(0) if members[t] else 0)
        torch.testing.assert_close(merged[kept.tolist().index(t)], expect)
    for d in dominant:
        assert torch.equal(merged[kept.tolist().index(d)], feats[d])


# ----------------------------------------------------------------------------- FlowCut


def _flowcut_reference(layers, keep):
    """FlowCut's CLIP loop (select_layer = depth - 2) replayed on per-layer records, one image."""
    n = layers[0]["attention"].numel()
    alive = list(range(n))
    cum = None
    # select_layer = depth - 2 with L = depth - 1 layers feeding the feature layer: the last cut is
    # after layer L - 2 (after layer 0 for a one-layer encoder).
    last_cut = max(len(layers) - 2, 0)
    for idx, rec in enumerate(layers):
        rpl = last_cut - idx
        if len(alive) <= keep or rpl < 0:
            break
        a = rec["attention"][alive]
        s = rec["value_similarity"][alive]
        score = (a / a.sum() + s / s.sum()) * rec["value_norm"][alive]
        cum = score if cum is None else 0.5 * cum + 0.5 * score
        if rpl % 2 == 0:
            if rpl:
                p = a / a.sum()
                h = float(-(p * p.log()).sum()) / math.log(len(alive))
                drop = round((len(alive) - keep) / rpl**0.5 * (1 - h**2))
            else:
                drop = len(alive)
            target = max(len(alive) - drop, keep)
            top = sorted(torch.topk(cum, target).indices.tolist())
            alive = [alive[i] for i in top]
            cum = cum[top]
    return alive


@pytest.mark.parametrize("layers", [1, 2, 5, 8])
@pytest.mark.parametrize("keep", [4, 12])
def test_flowcut_matches_reference(layers, keep):
    image = _image(n=48, grid=(6, 8), seed=layers, layers=layers)
    kept = tp.FlowCut(keep=keep).select(image)
    assert kept.tolist() == _flowcut_reference(image.extras["flow_layers"], keep)


def test_flowcut_without_value_similarity():
    image = _image(n=20, grid=(4, 5), layers=3)
    for rec in image.extras["flow_layers"]:
        del rec["value_similarity"]
    last = image.extras["flow_layers"][1]  # final cut after layer L - 2 = 1
    kept = tp.FlowCut(keep=5).select(image)
    first = image.extras["flow_layers"][0]
    s0 = first["attention"] / first["attention"].sum() * first["value_norm"]
    s1 = last["attention"] / last["attention"].sum() * last["value_norm"]
    assert kept.tolist() == sorted(torch.topk(0.5 * s0 + 0.5 * s1, 5).indices.tolist())


def test_flowcut_final_layer_from_adapter():
    image = _image(n=48, grid=(6, 8), seed=7, layers=4)
    image.extras["flow_final_layer"] = 3  # the Qwen schedule: last cut after the final block
    layers = image.extras["flow_final_layer"]
    kept = tp.FlowCut(keep=6).select(image)
    # Equivalent to the CLIP-rule reference with one more (unused) layer appended.
    padded = image.extras["flow_layers"] + [image.extras["flow_layers"][-1]]
    assert layers == 3 and kept.tolist() == _flowcut_reference(padded, 6)


def test_incomplete_blocks_mean_no_layout():
    image = ImageTokens(features=torch.randn(20, 4), blocks=[(0, 4, 4)])  # 4 tokens outside any grid
    assert image.spatial_blocks() is None
    assert tp.UniformGrid(keep=5).select(image).tolist() == [2, 6, 10, 14, 18]  # evenly along the sequence
    image.cls_attention = torch.rand(20)
    assert tp.HoloV(keep=5, crops=4).select(image).numel() == 5  # raster crops over all 20 tokens
