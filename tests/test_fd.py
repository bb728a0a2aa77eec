import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from networks import NETWORKS
from torch import nn

import prunekit3d as pk
from prunekit3d.fd import FDLoss, find_fd_features, foreground_percentile
from prunekit3d.models.pspseg import PSPSeg, PSPSegConfig, psp_seg


def _psp_s():
    return psp_seg("S", 1, 3), torch.randn(1, 1, 32, 32, 32)


FACTORIES = {"psp_seg_s": _psp_s, **{k: NETWORKS[k] for k in ("dynunet", "basic_unet", "monai_unet",
                                                                   "plain_conv_unet", "segresnet")}}

#: what a reader of each architecture would name: one module per encoder level, bottleneck last.
EXPECTED = {
    "psp_seg_s": ([*(f"encoder.stages.{i}" for i in range(4)), "encoder.bottleneck"], "decoder.stages.1"),
    "dynunet": (["input_block", "downsamples.0", "downsamples.1", "bottleneck"], "upsamples.1"),
    "basic_unet": (["conv_0", "down_1", "down_2", "down_3", "down_4"], "upcat_2"),
    # No full-resolution stage; the bottom level is the skip connection around the bottom block.
    "monai_unet": (["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.1"], "model.1.submodule.2"),
    "plain_conv_unet": ([f"encoder.stages.{i}" for i in range(4)], "decoder.stages.1"),
    "segresnet": ([f"down_layers.{i}" for i in range(4)], "up_layers.1"),
}

#: module-name prefixes of each network's decoder (everything that runs after the bottleneck).
DECODER = {
    "psp_seg_s": ("decoder.",),
    "dynunet": ("upsamples.", "output_block"),
    "basic_unet": ("upcat_", "final_conv"),
    "monai_unet": ("model.2", "model.1.submodule.2", "model.1.submodule.1.submodule.2"),
    "plain_conv_unet": ("decoder.",),
    "segresnet": ("up_samples.", "up_layers.", "conv_final"),
}


@pytest.fixture(scope="module", params=list(FACTORIES))
def network(request):
    torch.manual_seed(0)
    model, x = FACTORIES[request.param]()
    return request.param, model.train(), x


def _label(x, fraction=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape[0], 1, *x.shape[2:], generator=g) < fraction).long()


def test_detection_finds_one_feature_per_level_and_the_half_resolution_decoder(network):
    name, model, x = network
    found = find_fd_features(model, x)
    assert (found.encoder, found.decoder_half) == EXPECTED[name]
    sizes = found.encoder_sizes
    for higher, lower in zip(sizes, sizes[1:]):
        assert all(a <= b for a, b in zip(lower, higher)) and lower != higher  # strictly coarser each level
    assert math.prod(sizes[-1]) == min(math.prod(s) for s in sizes)  # the bottleneck is the coarsest
    assert found.decoder_half_size == [s // 2 for s in x.shape[2:]]
    # The sizes are those the named modules really return in a training-mode forward.
    seen = {}
    names = [*found.encoder, found.decoder_half]
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: seen.__setitem__(n, list(y.shape[2:])))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert [seen[n] for n in names] == [*sizes, found.decoder_half_size]


def test_detection_matches_pspseg_declared_structure():
    model, x = _psp_s()
    found = find_fd_features(model, x)
    modules = [model.get_submodule(n) for n in found.encoder]
    assert modules == [*model.encoder_stages, model.bottleneck]
    assert model.get_submodule(found.decoder_half) is model.half_res_decoder_stage


def test_detection_survives_wrapping():
    model, _ = NETWORKS["dynunet"]()
    x = torch.randn(1, 1, 16, 16, 16)
    before = find_fd_features(model, x)
    pk.wrap(model, x)
    after = find_fd_features(model, x)
    assert (after.encoder, after.decoder_half, after.encoder_sizes) == (
        before.encoder, before.decoder_half, before.encoder_sizes)


def test_losses_finite_and_decoder_not_run_in_masked_pass(network):
    name, model, x = network
    label = _label(x)
    decoder = [m for n, m in model.named_modules() if n.startswith(DECODER[name])]
    calls = {"decoder": 0}
    hooks = [m.register_forward_pre_hook(lambda *_: calls.update(decoder=calls["decoder"] + 1)) for m in decoder]
    try:
        with FDLoss(model, x, mask_value=-1.0) as fd, torch.no_grad():  # gradients: see the formula test
            model(x)
            assert calls["decoder"] > 0  # the normal forward does run the decoder
            calls["decoder"] = 0
            l_fd, l_aux = fd(x, label)
            assert calls["decoder"] == 0  # the masked pass stopped at the bottleneck
            assert torch.isfinite(l_fd) and torch.isfinite(l_aux)
            assert 0 < l_fd.item() <= 2 * len(fd.features.encoder)  # each term is a mean of 1 - cos in [0, 2]
            assert l_aux.item() > 0
            # A patch without foreground: everything is the mask value, and the losses stay finite.
            model(x)
            l_fd0, l_aux0 = fd(x, torch.zeros_like(label))
            assert torch.isfinite(l_fd0) and torch.isfinite(l_aux0)
    finally:
        for h in hooks:
            h.remove()


def _tiny_psp(seed=0):
    torch.manual_seed(seed)
    model = PSPSeg(PSPSegConfig((8, 16, 32), 0.5, 4), in_channels=1, out_channels=2)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates.uniform_(0.5, 1.5)  # let the light branches contribute
    return model.train()


def test_losses_and_gradients_match_the_formula():
    model = _tiny_psp()
    x = torch.randn(2, 1, 16, 16, 16)
    label = _label(x, 0.4)
    mask_value = -0.7
    with FDLoss(model, x, mask_value=mask_value) as fd:
        model(x)
        l_fd, l_aux = fd(x, label)
        l_fd.backward(retain_graph=True)
        fd_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        l_aux.backward()
        aux_grads = {n for n, p in model.named_parameters() if p.grad is not None}
    # Only encoder parameters learn from L_fd (the masked features are constants).
    assert fd_grads and all(n.startswith("encoder.") for n in fd_grads)
    assert any(n.startswith("encoder.bottleneck") for n in fd_grads)
    # L_aux reaches the 1/2-resolution decoder stage but nothing after it.
    assert any(n.startswith("decoder.stages.1") for n in aux_grads)
    assert not any(n.startswith(("decoder.stages.0", "decoder.heads", "decoder.ups.0")) for n in aux_grads)

    model.zero_grad(set_to_none=True)
    features = {}
    hook = model.half_res_decoder_stage.register_forward_hook(lambda m, a, y: features.__setitem__("d", y))
    real = model.encoder(x)
    model.decoder(real)
    hook.remove()
    with torch.no_grad():
        masked = model.encoder(torch.where(label > 0, x, torch.tensor(mask_value)))
    expected = sum((1 - F.cosine_similarity(r, m, dim=1)).mean() for r, m in zip(real, masked, strict=True))
    target = F.interpolate((label > 0).float(), scale_factor=0.5, mode="nearest-exact")
    expected_aux = F.binary_cross_entropy_with_logits(features["d"].mean(1, keepdim=True), target)
    assert torch.allclose(l_fd, expected, atol=1e-5) and torch.allclose(l_aux, expected_aux, atol=1e-6)
    expected.backward()
    for n, p in model.named_parameters():
        if n in fd_grads:
            assert torch.allclose(fd_grads[n], p.grad, atol=1e-5, rtol=1e-4), n
        else:
            assert p.grad is None or not p.grad.any(), n


def test_masked_pass_keeps_batchnorm_running_stats():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm=("batch", {"affine": True})).train()
    x = torch.randn(2, 1, 16, 16, 16)
    with FDLoss(model, x, mask_value=0.0) as fd:
        model(x)
        before = {n: b.clone() for n, b in model.named_buffers()}
        fd(x, _label(x))
    after = dict(model.named_buffers())
    assert any("running_mean" in n for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)


@torch.no_grad()
def test_override_names_and_early_stop_at_the_last_named_module():
    model, _ = NETWORKS["dynunet"]()
    x = torch.randn(1, 1, 16, 16, 16)
    model.train()
    label = _label(x)
    with FDLoss(model, x, mask_value=0.0) as auto:
        model(x)
        full, aux = auto(x, label)
        names = auto.features
    with FDLoss(model, encoder=names.encoder, decoder_half=names.decoder_half, mask_value=0.0) as named:
        model(x)
        same, same_aux = named(x, label)
    assert torch.equal(full, same) and torch.equal(aux, same_aux)

    bottleneck_calls = []
    hook = model.bottleneck.register_forward_pre_hook(lambda *_: bottleneck_calls.append(1))
    with FDLoss(model, encoder=["downsamples.0", "downsamples.1"], decoder_half="upsamples.1", mask_value=0.0) as part:
        model(x)
        n_forward = len(bottleneck_calls)
        subset, _ = part(x, label)
    hook.remove()
    assert n_forward == 1 and len(bottleneck_calls) == 1  # the masked pass stopped before the bottleneck
    assert 0 < subset.item() < full.item()  # fewer non-negative terms


def test_clear_errors():
    flat = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    with pytest.raises(ValueError, match="no module output is smaller.*encoder=.*decoder_half="):
        FDLoss(flat, torch.randn(1, 1, 8, 8, 8), mask_value=0.0)
    encoder_only = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.Conv3d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="no decoder"):
        find_fd_features(encoder_only, torch.randn(1, 1, 16, 16, 16))
    model, x = NETWORKS["dynunet"]()
    with pytest.raises(ValueError, match="did you mean"):
        FDLoss(model, encoder=["downsample.0", "bottleneck"], decoder_half="upsamples.1", mask_value=0.0)
    with pytest.raises(ValueError, match="example_input"):
        FDLoss(model, mask_value=0.0)
    with pytest.raises(ValueError, match="also an encoder module"):
        FDLoss(model, encoder=["downsamples.0", "bottleneck"], decoder_half="bottleneck", mask_value=0.0)
    with FDLoss(model, x, mask_value=[0.0, 1.0]) as two_values:
        model(x)
        with pytest.raises(ValueError, match="2 values for 1 input channels"):
            two_values(x, _label(x))
    fd = FDLoss(model, x, mask_value=0.0)
    with pytest.raises(RuntimeError, match=r"model\(x\) before fd"):
        fd(x, _label(x))
    model(x)
    with pytest.raises(ValueError, match="label"):
        fd(x, torch.zeros(1, 1, 16, 16, 16))
    fd.close()
    model(x)
    with pytest.raises(RuntimeError, match="no features"):  # hooks gone: nothing was captured
        fd(x, _label(x))


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_works_under_ddp(process_group):
    model = _tiny_psp()
    x = torch.randn(1, 1, 16, 16, 16)
    ddp = nn.parallel.DistributedDataParallel(model)
    with FDLoss(ddp, x, mask_value=0.0) as fd:
        assert fd.features == find_fd_features(model, x)
        y = ddp(x)
        l_fd, l_aux = fd(x, _label(x))
        (sum(t.mean() for t in y) + l_fd + l_aux).backward()
    grad = model.encoder.bottleneck[0].gates.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---- mask value -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct():
    from prunekit3d.sample import sample_dataset

    root = sample_dataset()
    image = np.asarray(nib.load(root / "imagesTr" / "ct_abdomen.nii.gz").dataobj).astype(np.float32)
    label = np.asarray(nib.load(root / "labelsTr" / "ct_abdomen.nii.gz").dataobj)
    return image, label


def test_foreground_percentile_streams_exactly_over_real_ct(ct):
    image, label = ct
    exact = float(np.percentile(image[label > 0], 0.5))
    assert foreground_percentile([(image, label)], samples_per_volume=None) == [pytest.approx(exact)]
    # The same volume cut into slabs along z: streamed volume by volume, same value; dicts work too.
    slabs = [{"image": image[..., z:z + 8], "label": label[..., z:z + 8]} for z in range(0, image.shape[-1], 8)]
    assert foreground_percentile(iter(slabs), samples_per_volume=None) == [pytest.approx(exact)]
    # Two channels, batched (B, C, *S) with (B, 1, *S) labels: one value per channel.
    two = torch.from_numpy(np.stack([image, 2 * image]))[None]
    values = foreground_percentile([(two, torch.from_numpy(label)[None, None])], samples_per_volume=None)
    assert values == [pytest.approx(exact), pytest.approx(2 * exact)]


def test_foreground_percentile_sampling_is_close_and_seeded(ct):
    image, label = ct
    foreground = np.sort(image[label > 0])
    sampled = foreground_percentile([(image, label)], samples_per_volume=5000, seed=3)[0]
    rank = np.searchsorted(foreground, sampled) / foreground.size * 100
    assert 0.0 <= rank <= 1.5  # within about one percentile rank of the 0.5 percentile
    assert foreground_percentile([(image, label)], samples_per_volume=5000, seed=3)[0] == sampled
    with pytest.raises(ValueError, match="no foreground"):
        foreground_percentile([(image, np.zeros_like(label))])
