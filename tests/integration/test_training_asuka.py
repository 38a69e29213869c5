"""ASUKA training in real ComfyUI: the MAE fine-tune, the alignment module on a shallow random SD1.5-inpainting
checkpoint (full CLIP-L and VAE) and the harmonizing decoder from that checkpoint's VAE, on a folder of synthetic
images. Each loss goes down on a fixed batch, only what should train gets gradients, the prior substitution and the
augmentations do what the paper says, the command line trains, samples, saves and resumes, and every written file
loads in the pack's loader nodes and gives exactly what the trainer computed."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layouts
from training_support import loss_rows as _rows, mixed_precision_losses, pack as _pack, run_train_py, install_output



def input_files(comfy, comfy_models, d: Path) -> dict:
    """Written to ``d``: three images (two with object masks), a small MAE checkpoint and the name and path of a
    shallow SD1.5-inpainting checkpoint."""
    data = d / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
        Image.fromarray(small).resize((80, 64), Image.BICUBIC).save(data / f"img{i}.png")
        if i < 2:
            m = np.zeros((64, 80), np.uint8)
            m[16:44, 20 + 10 * i:56] = 255
            Image.fromarray(m).save(data / f"img{i}.mask.png")
    mae = d / "mae_start.pth"
    torch.save(layouts.mae_checkpoint(dim=192, depth=2, dec_dim=128, dec_depth=8), mae)
    ckpt = comfy_models.sd15_inpaint_checkpoint(levels=1)
    return dict(data=data, mae=mae, ckpt=comfy.folder_paths.get_full_path("checkpoints", ckpt), ckpt_name=ckpt)


@pytest.fixture(scope="module")
def files(comfy, comfy_models, tmp_path_factory):
    return input_files(comfy, comfy_models, tmp_path_factory.mktemp("asuka_train"))


@pytest.fixture(scope="module")
def checkpoint(comfy, files):
    from comfy.sd import load_checkpoint_guess_config
    return load_checkpoint_guess_config(files["ckpt"], output_vae=True, output_clip=True)[:3]


def _mae_trainer(comfy, files, out, **kw):
    mod = _pack(comfy, "training.asuka")
    return mod.MAETrainer(mod.MAETrainConfig(mae=str(files["mae"]), data=str(files["data"]), output=str(out), **kw))


def _alignment_trainer(comfy, files, checkpoint, out, **kw):
    mod = _pack(comfy, "training.asuka")
    cfg = mod.AlignmentTrainConfig(base=files["ckpt"], mae=str(files["mae"]), data=str(files["data"]),
                                   output=str(out), resolution=64, **kw)
    model, clip, vae = checkpoint
    return mod.AlignmentTrainer(cfg, model, clip, vae)


def _decoder_trainer(comfy, files, checkpoint, out, **kw):
    mod = _pack(comfy, "training.asuka")
    cfg = mod.DecoderTrainConfig(base=files["ckpt"], data=str(files["data"]), output=str(out), resolution=64, **kw)
    model, clip, vae = checkpoint
    return mod.DecoderTrainer(cfg, model, clip, vae)


def _fixed_loss_goes_down(trainer, batch, steps, seed=5):
    def loss():
        torch.manual_seed(seed)
        trainer.mask_rng.manual_seed(seed)
        trainer.aug_rng.manual_seed(seed)
        with torch.no_grad():
            return float(trainer.losses_for(batch, 0)["loss"])

    before = loss()
    for _ in range(steps):
        torch.manual_seed(seed)
        trainer.mask_rng.manual_seed(seed)
        trainer.aug_rng.manual_seed(seed)
        trainer.train_step(batch, 0)
    after = loss()
    assert after < 0.9 * before, (before, after)
    return before, after


def test_mae_loss_goes_down_and_only_the_fixed_embeddings_stay(comfy, files, tmp_path):
    trainer = _mae_trainer(comfy, files, tmp_path, lr=1e-3)
    start = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    batch = trainer.data.batch([0, 1, 2], torch.Generator().manual_seed(1))
    _fixed_loss_goes_down(trainer, batch, 5)
    now = trainer.module.state_dict()
    assert torch.equal(now["pos_embed"], start["pos_embed"])
    assert torch.equal(now["decoder_pos_embed"], start["decoder_pos_embed"])
    for k in ("blocks.0.attn.qkv.weight", "decoder_blocks.7.mlp.fc2.weight", "mask_token", "decoder_pred.weight"):
        assert not torch.equal(now[k], start[k]), k


def test_mae_loss_counts_only_masked_tokens(comfy, files, tmp_path):
    """A reconstruction that is right on every masked token has zero loss, whatever it does elsewhere."""
    trainer = _mae_trainer(comfy, files, tmp_path, token_ratio=0.75)
    pixels, holes = trainer.data.batch([0], torch.Generator().manual_seed(2))
    mae = trainer.module
    target = mae.normalise(pixels)
    seen = {}

    def fake_predict(image, mask):
        cov = _pack(comfy, "models.imaging").token_coverage(mask.float(), mae.config.grid)
        seen["coverage"] = cov
        w = torch.nn.functional.interpolate((cov > 0).float().view(-1, 1, mae.config.grid, mae.config.grid),
                                            scale_factor=mae.config.patch_size)
        return target * w + (1 - w) * 7.0, cov

    mae.predict = fake_predict
    assert float(trainer.losses_for((pixels, holes), 0)["loss"]) == 0.0
    assert float((seen["coverage"] > 0).float().mean()) >= 0.75          # enlarged to 75 % of the tokens


def test_alignment_loss_goes_down_and_only_the_alignment_learns(comfy, files, checkpoint, tmp_path):
    trainer = _alignment_trainer(comfy, files, checkpoint, tmp_path, lr=1e-3)
    batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(3))
    trainer.optimizer.zero_grad()
    trainer.losses_for(batch, 0)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainer.module.parameters())
    assert all(p.grad is None for p in trainer.mae.parameters())
    assert all(p.grad is None for p in checkpoint[0].model.diffusion_model.parameters())
    _fixed_loss_goes_down(trainer, batch, 6)


def test_prior_substitution_schedule_and_effect(comfy, files, checkpoint, tmp_path):
    trainer = _alignment_trainer(comfy, files, checkpoint, tmp_path)
    p = [trainer.substitution(s) for s in (0, 1000, 1999, 2000, 10000)]
    np.testing.assert_allclose(p, [1.0, 0.55, 1.0 - 0.9 * 1999 / 2000, 0.1, 0.1])
    pixels, hole = trainer.data.batch([0, 1], torch.Generator().manual_seed(4))
    masked = trainer.mae(pixels, hole, reconstruct=False)[0]
    whole = trainer.mae(pixels, torch.zeros_like(hole), reconstruct=False)[0]
    assert not torch.allclose(masked, whole)
    torch.testing.assert_close(trainer.prior(pixels, hole, 1.0), whole)
    torch.testing.assert_close(trainer.prior(pixels, hole, 0.0), masked)
    trainer.aug_rng.manual_seed(0)
    swaps = [bool(torch.allclose(trainer.prior(pixels[:1], hole[:1], 0.5), whole[:1])) for _ in range(40)]
    assert 8 <= sum(swaps) <= 32


def test_decoder_starts_from_the_vae_and_its_loss_goes_down(comfy, files, checkpoint, tmp_path):
    trainer = _decoder_trainer(comfy, files, checkpoint, tmp_path, lr=1e-4, latent_augmentation=0.5)
    vae_sd = checkpoint[2].first_stage_model.decoder.state_dict()
    for k, v in trainer.module.state_dict().items():
        if not k.startswith("encoder."):
            assert torch.equal(v, vae_sd[k].float()), k
    batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(5))
    _fixed_loss_goes_down(trainer, batch, 5)
    assert all(p.grad is None for p in checkpoint[0].model.diffusion_model.parameters())
    assert all(p.grad is None for p in checkpoint[2].first_stage_model.parameters())


def test_decoder_corruptions(comfy, files, checkpoint, tmp_path):
    """No jitter and no latent augmentation: the latent is the VAE's; jitter alone: the VAE latent of the
    jittered image; latent augmentation: the inpainting UNet's one-step estimate, a different latent."""
    pixels, _ = _decoder_trainer(comfy, files, checkpoint, tmp_path / "a", latent_augmentation=0).data.batch(
        [0, 1], torch.Generator().manual_seed(6))
    vae = checkpoint[2]
    plain = vae.encode(pixels.movedim(1, -1)).float()
    none = _decoder_trainer(comfy, files, checkpoint, tmp_path / "b", latent_augmentation=0, brightness=0,
                            contrast=0, saturation=0, hue=0)
    z, aug = none.corrupted_latent(pixels)
    torch.testing.assert_close(z, plain)
    assert not aug.any()
    jit = _decoder_trainer(comfy, files, checkpoint, tmp_path / "c", latent_augmentation=0)
    state = jit.aug_rng.get_state()
    z, _ = jit.corrupted_latent(pixels)
    jit.aug_rng.set_state(state)
    jittered = _pack(comfy, "models.imaging").color_jitter(pixels, jit.aug_rng, 0.15, 0.2, 0.1, 0.03)
    torch.testing.assert_close(z, vae.encode(jittered.movedim(1, -1)).float())
    assert not torch.allclose(z, plain)
    lat = _decoder_trainer(comfy, files, checkpoint, tmp_path / "d", latent_augmentation=1.0, brightness=0,
                           contrast=0, saturation=0, hue=0)
    z, aug = lat.corrupted_latent(pixels)
    assert aug.all() and z.shape == plain.shape and torch.isfinite(z).all() and not torch.allclose(z, plain)


def test_latent_augmentation_needs_an_inpainting_unet(comfy, files, checkpoint, tmp_path):
    mod = _pack(comfy, "training.asuka")
    cfg = mod.DecoderTrainConfig(base=files["ckpt"], data=str(files["data"]), output=str(tmp_path), resolution=64)
    with pytest.raises(ValueError, match="latent_augmentation = 0"):
        mod.DecoderTrainer(cfg, None, None, checkpoint[2])
    with pytest.raises(ValueError, match="multiple of 8"):
        mod.DecoderTrainer(mod.DecoderTrainConfig(base="x", data="y", output="z", resolution=60), *checkpoint)


def _cli(comfy, method, config: dict, out: Path, steps: int):
    cfg = out.parent / f"{method}.toml"
    cfg.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in config.items()))
    run_train_py(comfy, method, "--config", str(cfg), "--output", str(out), "--steps", str(steps))


def _install(comfy, src: Path, name: str) -> str:
    folder = Path(comfy.folder_paths.get_folder_paths("asuka")[0])
    install_output(src, folder, name)
    comfy.folder_paths.filename_list_cache.clear()
    return name


def test_mae_command_line_resumes_and_the_file_loads_in_the_prior_loader(comfy, run_prompt, files, tmp_path):
    out = tmp_path / "mae_run"
    common = dict(mae=str(files["mae"]), data=str(files["data"]), batch_size=2, log_every=1, save_every=1,
                  sample_every=2, lr=1e-3)
    _cli(comfy, "asuka_mae", common, out, 2)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert Image.open(out / "samples" / "step_0000002.png").size == (3 * 256, 256)
    _cli(comfy, "asuka_mae", common, out, 3)
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3]

    asuka = _pack(comfy, "models.asuka")
    trained, start = asuka.load_mae(str(out / "mae.safetensors")), asuka.load_mae(str(files["mae"]))
    assert trained.state_dict().keys() == start.state_dict().keys()
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)

    _install(comfy, out / "mae.safetensors", "mae_trained_test.safetensors")
    _install(comfy, files["mae"], "mae_start_test.pth")
    d = Path(comfy.folder_paths.get_folder_paths("asuka")[0])
    torch.save(layouts.alignment_state_dict(seed=3, in_dim=128, dim=768, head_dim=64), d / "align_for_mae.pt")
    comfy.folder_paths.filename_list_cache.clear()

    def preview(mae):
        g = comfy.graph()
        image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1)
        mask = g.node("CITestRectMask", width=64, height=64, x=16, y=8, w=24, h=40)
        prior = g.node("ConsistentInpaintASUKALoader", mae=mae, alignment="align_for_mae.pt", alignment_pooled="none",
                       null_tokens="none", null_pooled="none", dtype="float32")
        cond = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0),
                      mask=mask.out(0), condition_weight=0.5)
        g.node("CITestCapture", value=cond.out(1))
        g.node("CITestCapture", value=image.out(0))
        g.node("CITestCapture", value=mask.out(0))
        r = run_prompt(g)
        return r.output(cond.id, 1), r.output(image.id, 0), r.output(mask.id, 0)

    got, image, mask = preview("mae_trained_test.safetensors")
    start_preview, _, _ = preview("mae_start_test.pth")
    assert not torch.allclose(got, start_preview)
    with torch.no_grad():
        _, rec = trained(image.movedim(-1, 1), mask[:, None])
    want = torch.nn.functional.interpolate(rec, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(got, want.movedim(1, -1), rtol=1e-4, atol=1e-4)


def test_alignment_run_writes_a_file_the_prior_loader_reads_exactly(comfy, run_prompt, files, checkpoint, tmp_path):
    trainer = _alignment_trainer(comfy, files, checkpoint, tmp_path, steps=2, batch_size=2, log_every=1,
                                 save_every=2, sample_every=2, sample_steps=2, lr=1e-3)
    path = trainer.run()
    assert [int(r["step"]) for r in _rows(tmp_path)] == [1, 2]
    assert [float(r["substitution"]) for r in _rows(tmp_path)] == pytest.approx([1.0, 1.0 - 0.9 / 2000])
    assert Image.open(tmp_path / "samples" / "step_0000002.png").size == (128, 64)
    _install(comfy, files["mae"], "mae_start_test.pth")
    name = _install(comfy, path, "alignment_trained_test.safetensors")
    g = comfy.graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=files["ckpt_name"])
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1)
    mask = g.node("CITestRectMask", width=64, height=64, x=16, y=8, w=24, h=40)
    prior = g.node("ConsistentInpaintASUKALoader", mae="mae_start_test.pth", alignment=name, alignment_pooled="none",
                   null_tokens="none", null_pooled="none", dtype="float32")
    cond = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0),
                  mask=mask.out(0), condition_weight=0.5)
    zero = g.node("ConditioningZeroOut", conditioning=cond.out(0))
    inp = g.node("InpaintModelConditioning", positive=cond.out(0), negative=zero.out(0), vae=ckpt.out(2),
                 pixels=image.out(0), mask=mask.out(0), noise_mask=True)
    sampler = g.node("KSampler", model=ckpt.out(0), seed=0, steps=2, cfg=1.0, sampler_name="euler",
                     scheduler="normal", positive=inp.out(0), negative=inp.out(1), latent_image=inp.out(2), denoise=1.0)
    for n in (cond, image, mask, sampler):
        g.node("CITestCapture", value=n.out(0))
    r = run_prompt(g)
    tokens = r.output(cond.id, 0)[0][0]
    img, m = r.output(image.id, 0).movedim(-1, 1), r.output(mask.id, 0)[:, None]
    with torch.no_grad():
        want = trainer.module.eval()(trainer.mae(img, m, reconstruct=False)[0])
    torch.testing.assert_close(tokens, want, rtol=1e-4, atol=1e-4)
    assert tokens.shape == (1, 256, 768) and torch.isfinite(r.output(sampler.id, 0)["samples"]).all()


def test_decoder_run_writes_a_file_harmonizing_decode_reads_exactly(comfy, run_prompt, files, checkpoint, tmp_path):
    trainer = _decoder_trainer(comfy, files, checkpoint, tmp_path, steps=2, batch_size=1, log_every=1, save_every=1,
                               sample_every=1, latent_augmentation=0.5)
    path = trainer.run()
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert Image.open(tmp_path / "samples" / "step_0000001.png").size == (4 * 64, 64)
    name = _install(comfy, path, "decoder_trained_test.safetensors")
    g = comfy.graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=files["ckpt_name"])
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=2)
    mask = g.node("CITestRectMask", width=64, height=64, x=8, y=8, w=32, h=24)
    enc = g.node("VAEEncode", pixels=image.out(0), vae=ckpt.out(2))
    loader = g.node("ConsistentInpaintHarmonizingDecoderLoader", decoder=name, dtype="float32")
    dec = g.node("ConsistentInpaintHarmonizingDecode", samples=enc.out(0), decoder=loader.out(0), image=image.out(0),
                 mask=mask.out(0), tile_size=0, overlap=64)
    plain = g.node("VAEDecode", samples=enc.out(0), vae=ckpt.out(2))
    for n in (enc, image, mask, dec, plain):
        g.node("CITestCapture", value=n.out(0))
    r = run_prompt(g)
    z, img, m = r.output(enc.id, 0)["samples"], r.output(image.id, 0).movedim(-1, 1), r.output(mask.id, 0)[:, None]
    with torch.no_grad():
        want = ((trainer.module.eval()(z, img * 2 - 1, m).float() + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(r.output(dec.id, 0), want.movedim(1, -1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(r.output(dec.id, 0), r.output(plain.id, 0), atol=1e-3)


def test_mixed_precision_and_checkpointing_steps_run(comfy, files, tmp_path, checkpoint_calls):
    """bf16 and fp16 (loss-scaled) autocast give a finite loss close to float32's and keep the trained weights in
    float32; gradient checkpointing recomputes the MAE's blocks."""
    calls = checkpoint_calls
    losses = {}
    for mp, ckpt in (("no", False), ("bf16", True), ("fp16", False)):
        trainer = _mae_trainer(comfy, files, tmp_path / mp, mixed_precision=mp, gradient_checkpointing=ckpt)
        batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(1))
        trainer.mask_rng.manual_seed(0)
        losses[mp] = trainer.train_step(batch, 0)["loss"]
        assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
    assert calls
    for mp in ("bf16", "fp16"):          # fp16 on the CPU: the engine trains in float32 (no autocast there)
        assert np.isfinite(losses[mp]) and losses[mp] == pytest.approx(losses["no"], rel=0.05), (mp, losses)


@pytest.mark.parametrize("which", ["alignment", "decoder"])
def test_alignment_and_decoder_checkpointing_and_half_precision(comfy, files, checkpoint, tmp_path, checkpoint_calls,
                                                                which):
    """Gradient checkpointing (alignment: the frozen UNet recomputed; decoder: its res blocks) gives the same loss and
    gradients; bf16 / fp16 (loss-scaled) steps give float32's loss to half precision and finite float32 weights."""
    make = _alignment_trainer if which == "alignment" else _decoder_trainer
    extra = dict(latent_augmentation=0.5) if which == "decoder" else {}
    calls = checkpoint_calls
    results = []
    for ckpt in (False, True):
        calls.clear()
        trainer = make(comfy, files, checkpoint, tmp_path / f"c{ckpt}", gradient_checkpointing=ckpt, **extra)
        batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(3))
        torch.manual_seed(5)
        trainer.aug_rng.manual_seed(5)
        loss = trainer.losses_for(batch, 0)["loss"]
        loss.backward()
        assert bool(calls) == ckpt
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.module.named_parameters()
                                        if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] and results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], rtol=1e-4, atol=1e-6)

    # fp16 convolutions have no fast CPU kernel (~200x float32's time): the conv-only decoder is checked in bf16 here;
    # the fp16 path differs only by the loss scaler, which the other trainers' fp16 steps exercise
    modes = ("bf16", "fp16") if which == "alignment" else ("bf16",)
    losses = mixed_precision_losses(
        lambda mp: make(comfy, files, checkpoint, tmp_path / mp, mixed_precision=mp, lr=1e-4, **extra),
        lambda trainer: trainer.data.batch([0, 1], torch.Generator().manual_seed(3)),
        lambda trainer: ((n, p) for n, p in trainer.module.named_parameters() if p.requires_grad), modes)
    for mp in set(losses) - {"no"}:          # fp16 where the engine autocasts it (GPUs)
        assert losses[mp] == pytest.approx(losses["no"], rel=0.05) and losses[mp] != losses["no"], (mp, losses)
