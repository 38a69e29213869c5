"""PainterNet training in real ComfyUI on a shallow random SD1.5 checkpoint (full CLIP-L and VAE) and a folder of
three synthetic images: the loss goes down on a fixed batch, ATAL reaches the branch's cross-attention, the command
line trains, samples, saves and resumes, and the file it writes loads in Load Inpaint Branch and changes the
sampled result (the untrained, zero-connected branch does not)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_branch_graph import _graph
from training_support import fit, loss_rows, mixed_precision_losses, run_train_py, write_data
from training_support import install_output, pack as _pack


@pytest.fixture(scope="module")
def base_ckpt(comfy_models):
    return comfy_models.sd15_checkpoint(levels=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("painter_data"), ["a red apple", "a small wooden boat on a lake", None])


def _trainer(comfy, base_ckpt, data_dir, out, **kw):
    mod = _pack(comfy, "training.painternet")
    cfg = mod.PainterNetConfig(base=comfy.folder_paths.get_full_path("checkpoints", base_ckpt), data=str(data_dir),
                               output=str(out), resolution=64, **kw)
    return mod.PainterNetTrainer(cfg), _pack(comfy, "training.common").ImageFolder(str(data_dir), 64)


def test_loss_goes_down_on_a_fixed_batch(comfy, base_ckpt, data_dir, tmp_path):
    trainer, data = _trainer(comfy, base_ckpt, data_dir, tmp_path, lr=1e-5, beta=1e-5)
    before, after = fit(trainer, trainer.batch(data, [0, 1]), 6)
    assert after < 0.9 * before, (before, after)


def test_mixed_precision_steps(comfy, base_ckpt, data_dir, tmp_path):
    """fp16 (with loss scaling) and bf16 autocast: the loss is float32's to half precision, the branch stays float32,
    finite, and learns."""
    data = _pack(comfy, "training.common").ImageFolder(str(data_dir), 64)
    losses = mixed_precision_losses(
        lambda mp: _trainer(comfy, base_ckpt, data_dir, tmp_path / mp, lr=1e-4, mixed_precision=mp)[0],
        lambda trainer: trainer.batch(data, [0, 1], torch.Generator().manual_seed(3)),
        lambda trainer: trainer.net.named_parameters())
    for mp in set(losses) - {"no"}:
        assert losses[mp] == pytest.approx(losses["no"], rel=0.05) and losses[mp] != losses["no"], (mp, losses)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_atal_reaches_the_branch_cross_attention(comfy, base_ckpt, data_dir, tmp_path, beta):
    """At initialisation every zero connection is zero, so the diffusion loss cannot reach the branch's
    cross-attention keys; only ATAL can."""
    trainer, data = _trainer(comfy, base_ckpt, data_dir, tmp_path, beta=beta)
    b = trainer.batch(data, [0, 1])
    trainer.optimizer.zero_grad()
    parts = trainer.losses(b)
    assert float(parts["atal"].detach()) > 0
    parts["loss"].backward()
    sites = _pack(comfy, "nodes.branch_unet").transformer_sites(trainer.net)
    assert len(sites) >= 3
    grads = [tb.attn2.to_k.weight.grad for tb in sites.values()]
    if beta == 0:
        assert all(g is None or g.abs().max() == 0 for g in grads)
    else:
        assert all(g is not None and g.abs().max() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(comfy, base_ckpt, data_dir, tmp_path,
                                                                  checkpoint_calls):
    calls = checkpoint_calls
    grads = []
    for checkpointing in (False, True):
        calls.clear()
        trainer, data = _trainer(comfy, base_ckpt, data_dir, tmp_path, beta=1.0,
                                 gradient_checkpointing=checkpointing)
        b = trainer.batch(data, [0, 1], torch.Generator().manual_seed(3))
        torch.manual_seed(7)
        parts = trainer.losses(b)
        parts["loss"].backward()
        assert bool(calls) == checkpointing          # every branch block recomputed, or none
        grads.append((parts["loss"].detach(), {n: p.grad.clone() for n, p in trainer.net.named_parameters()
                                               if p.grad is not None and "attn2.to_k" in n}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-4, atol=1e-7)


def test_branch_probe_keeps_the_branch_output(comfy, base_ckpt, data_dir, tmp_path):
    """Recording attention maps for ATAL computes the same branch outputs as ComfyUI's attention."""
    trainer, data = _trainer(comfy, base_ckpt, data_dir, tmp_path)
    bu = _pack(comfy, "nodes.branch_unet")
    torch.manual_seed(0)
    net = trainer.net
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)      # zero connections non-zero, so the outputs mean something
        x, t, ctx = torch.randn(2, 9, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
        plain = net(x, t, ctx)
        probe = {}
        probed = net(x, t, ctx, transformer_options={bu.ATTENTION_PROBE: probe})
    for k in ("down", "up"):
        for a, b in zip(plain[k], probed[k]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sorted(probe) == sorted(bu.transformer_sites(net))
    for a in probe.values():
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=1e-5, atol=1e-5)


def _train_cli(comfy, base_ckpt, data_dir, out, steps):
    cfg = out.parent / "painternet.toml"
    cfg.write_text(f'base = "{comfy.folder_paths.get_full_path("checkpoints", base_ckpt)}"\n'
                   f'data = "{data_dir}"\noutput = "{out}"\nresolution = 64\nbatch_size = 2\n'
                   "log_every = 1\nsave_every = 1\nsample_every = 2\nsample_steps = 2\nlr = 1e-4\n")
    return run_train_py(comfy, "painternet", "--config", str(cfg), "--steps", str(steps))


def test_command_line_trains_samples_saves_and_resumes_and_the_file_loads(
        comfy, run_prompt, base_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    _train_cli(comfy, base_ckpt, data_dir, out, 2)
    assert (out / "samples" / "step_0000002.png").exists()
    assert Image.open(out / "samples" / "step_0000002.png").size == (128, 64)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    _train_cli(comfy, base_ckpt, data_dir, out, 3)                  # resumes at step 2
    rows = loss_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) and float(r["atal"]) > 0 for r in rows)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3

    folder = Path(comfy.folder_paths.get_folder_paths("inpaint_branch")[0])
    folder.mkdir(parents=True, exist_ok=True)
    install_output(out / "painternet.safetensors", folder, "painternet_trained_test.safetensors")
    trainer, _ = _trainer(comfy, base_ckpt, data_dir, tmp_path / "init")
    trainer.save(folder / "painternet_initial_test.safetensors")
    comfy.folder_paths.filename_list_cache.clear()

    def sample(branch, scale):
        g = comfy.graph()
        n = _graph(g, base_ckpt, branch, scale=scale, counter=False)
        return run_prompt(g).output(n["sampler"].id, 0)["samples"]

    plain = sample("painternet_initial_test.safetensors", 0.0)
    assert torch.equal(sample("painternet_initial_test.safetensors", 1.0), plain)     # zero connections
    assert not torch.allclose(sample("painternet_trained_test.safetensors", 1.0), plain)


def test_training_mask_node(comfy, run_prompt):
    g = comfy.graph()
    rect = g.node("CITestRectMask", width=64, height=48, x=10, y=8, w=20, h=16)
    box = g.node("ConsistentInpaintTrainingMask", kind="box", seed=3, width=512, height=512, batch_size=1,
                 region=rect.out(0))
    mix = g.node("ConsistentInpaintTrainingMask", kind="mix (PainterNet 25/50/25)", seed=3, width=64, height=48,
                 batch_size=3)
    again = g.node("ConsistentInpaintTrainingMask", kind="mix (PainterNet 25/50/25)", seed=3, width=64, height=48,
                   batch_size=3)
    for n in (box, mix, again):
        g.node("CITestCapture", value=n.out(0))
    r = run_prompt(g)
    m = r.output(box.id, 0)
    assert m.shape == (1, 48, 64) and r.output(box.id, 1) == "box"
    assert m[0, 8:24, 10:30].all() and m.sum() >= 16 * 20
    ys, xs = m[0].nonzero(as_tuple=True)
    assert m[0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()            # one rectangle
    masks3 = r.output(mix.id, 0)
    assert masks3.shape == (3, 48, 64) and len(r.output(mix.id, 1).split(", ")) == 3
    assert torch.equal(masks3, r.output(again.id, 0))                         # the seed decides


def test_training_mask_node_asuka_kinds(comfy, run_prompt):
    g = comfy.graph()
    mix = g.node("ConsistentInpaintTrainingMask", kind="mix (ASUKA 50/40/10)", seed=1, width=64, height=48,
                 batch_size=12)
    rect = g.node("CITestRectMask", width=64, height=48, x=10, y=8, w=20, h=16)
    obj = g.node("ConsistentInpaintTrainingMask", kind="ASUKA object", seed=2, width=512, height=512, batch_size=1,
                 region=rect.out(0))
    reg = g.node("ConsistentInpaintTrainingMask", kind="ASUKA regular", seed=3, width=64, height=48, batch_size=4)
    for n in (mix, obj, reg):
        g.node("CITestCapture", value=n.out(0))
    r = run_prompt(g)
    m = r.output(mix.id, 0)
    assert m.shape == (12, 48, 64)
    ratios = m.mean(dim=(1, 2))
    assert (ratios >= 0.1).all() and (ratios <= 0.75).all()
    kinds = r.output(mix.id, 1).split(", ")
    assert len(kinds) == 12 and set(kinds) <= {"ASUKA object", "ASUKA irregular", "ASUKA regular"}
    o = r.output(obj.id, 0)[0]
    assert o.shape == (48, 64)
    hits = torch.nn.functional.conv2d(o[None, None], torch.ones(1, 1, 16, 20))[0, 0]
    assert (hits >= 16 * 20).any()                                            # the region's shape, moved
    for one in r.output(reg.id, 0):
        ys, xs = one.nonzero(as_tuple=True)
        inv_ys, inv_xs = (1 - one).nonzero(as_tuple=True)
        rect_ok = one[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        comp_ok = (1 - one)[inv_ys.min():inv_ys.max() + 1, inv_xs.min():inv_xs.max() + 1].all()
        assert rect_ok or comp_ok


def test_sample_image_decodes_the_sampler_latent_as_is(comfy, base_ckpt, data_dir, tmp_path, monkeypatch):
    """comfy.sample.sample returns the VAE's latent (already un-scaled): the sample shows exactly its decode."""
    trainer, data = _trainer(comfy, base_ckpt, data_dir, tmp_path)
    mod = _pack(comfy, "training.painternet")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(mod.comfy.sample, "sample", lambda *a, **k: z.clone())
    trainer.sample(trainer.batch(data, [0]), tmp_path / "s.png", 1)
    shown = np.asarray(Image.open(tmp_path / "s.png"), dtype=np.float32)[:, 64:] / 255
    with torch.no_grad():
        want = trainer.vae.decode(z)[0].clamp(0, 1).numpy()
    assert np.abs(shown - want).max() <= 1 / 255 + 1e-6


def test_trainers_refuse_bases_that_do_not_predict_epsilon(comfy):
    """x0 models subclass ComfyUI's EPS but denoise differently: the check is on what the model computes."""
    from comfy.model_base import ModelType, model_sampling
    common = _pack(comfy, "training.common")

    def model(kind):
        sampling = model_sampling(None, kind)
        return type("M", (), {"get_model_object": lambda self, name: sampling})()
    common.require_epsilon(model(ModelType.EPS), "training")
    for kind, name in ((ModelType.V_PREDICTION, "V_PREDICTION"), (ModelType.IMG_TO_IMG, "X0"),
                       (ModelType.EDM, "EDM"), (ModelType.FLOW, "CONST")):
        with pytest.raises(ValueError, match=f"epsilon-prediction base models only; this one is {name}"):
            common.require_epsilon(model(kind), "training")
