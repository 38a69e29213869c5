"""Patch-Adapter training in real ComfyUI on a shallow random SD1.5-inpainting checkpoint (full CLIP-L and VAE) and a
folder of three synthetic images, both stages: the untrained adapter is a no-op, the loss goes down on a fixed
batch, gradients reach the adapter only (the RPA gate opens first, then its projections learn), gradient
checkpointing changes nothing but memory, the command line trains, samples, saves and resumes, and the files it
writes load in Load Patch-Adapter and change what Apply Dual Context + KSampler and High-Res Patch Refine produce."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from test_patch_adapter_graph import _stage1, _stage2
from training_support import fit, fixed_loss as _fixed_loss, loss_rows as _rows, mixed_precision_losses, run_train_py
from training_support import pack as _pack, write_data

DCA = dict(stage="dca", resolution=64)
RPA = dict(stage="rpa", resolution=64, full_resolution=128, patch_size=64)


@pytest.fixture(scope="module")
def ckpt(comfy_models):
    return comfy_models.sd15_inpaint_checkpoint(levels=2, skip_top_attention=True)


@pytest.fixture(scope="module")
def loaded(comfy, ckpt, comfy_models):
    """(model, clip, vae) loaded once; every trainer attaches its own patch to a clone. In process the VAE is a
    TAESD-architecture one (fast on the CPU); the command line uses the checkpoint's own."""
    from comfy.sd import VAE, load_checkpoint_guess_config
    from comfy.utils import load_torch_file
    model, clip = load_checkpoint_guess_config(comfy.folder_paths.get_full_path("checkpoints", ckpt), output_vae=False,
                                               output_clip=True)[:2]
    return model, clip, VAE(sd=load_torch_file(comfy.folder_paths.get_full_path("vae", comfy_models.taesd_vae())))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("patch_adapter_data"),
                      ["a red apple on a table", "a small wooden boat on a lake", None], size=(160, 128),
                      box=lambda i: (30, 90, 40 + 10 * i, 110), grid=(6, 5))


def _trainer(comfy, loaded, data_dir, out, **kw):
    mod = _pack(comfy, "training.patch_adapter")
    cfg = mod.PatchAdapterConfig(base="(preloaded)", data=str(data_dir), output=str(out), **kw)
    trainer = mod.PatchAdapterTrainer(cfg, *loaded)
    return trainer, trainer.dataset


def _unet_params(trainer):
    return list(trainer.model.model.diffusion_model.parameters())


@pytest.mark.parametrize("stage", [DCA, RPA], ids=["dca", "rpa"])
def test_untrained_adapter_leaves_the_model_unchanged(comfy, loaded, data_dir, tmp_path, monkeypatch, stage):
    """W_v = 0 (DCA) and g = 0 (RPA): the patched UNet computes exactly what the plain one does, although every
    adapted site computes its term."""
    node = _pack(comfy, "nodes.patch_adapter")
    fired = []
    cls, name = (node.DualContextPatch, "term") if stage["stage"] == "dca" else (node.ReferencePatch, "term")
    original = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, *a: fired.append(a[-2]) or original(self, *a))
    trainer, data = _trainer(comfy, loaded, data_dir, tmp_path, **stage)
    b = trainer.batch(data, [0])
    plain = _fixed_loss(trainer, b, trainer.model)
    assert not fired
    patched = _fixed_loss(trainer, b)
    assert sorted(set(fired)) == sorted(trainer.module.dca_sites or trainer.module.rpa_sites) and len(fired) >= 3
    assert patched == plain
    with torch.no_grad():                   # and a non-zero adapter does change it (the comparison can fail)
        for p in trainer.module.parameters():
            p.add_(0.05)
    assert abs(_fixed_loss(trainer, b) - plain) > 1e-6


@pytest.mark.parametrize("stage, lr", [(DCA, 2e-3), (RPA, 1e-2)], ids=["dca", "rpa"])
def test_loss_goes_down_on_a_fixed_batch(comfy, loaded, data_dir, tmp_path, stage, lr):
    """(The RPA's term passes through its gate, which opens by about lr per step from 0, hence its larger lr.)"""
    trainer, data = _trainer(comfy, loaded, data_dir, tmp_path, lr=lr, **stage)
    before, after = fit(trainer, trainer.batch(data, [0, 1]), 6)
    print(f"{stage['stage']}: fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("stage", [DCA, RPA], ids=["dca", "rpa"])
def test_gradients_reach_the_adapter_only(comfy, loaded, data_dir, tmp_path, stage):
    """At initialisation the zero part (DCA: W_v; RPA: the gate g) is the only one with a gradient, since the others
    act through it; after one optimiser step every adapter weight has one. The UNet never gets any."""
    trainer, data = _trainer(comfy, loaded, data_dir, tmp_path, lr=1e-3, **stage)
    b = trainer.batch(data, [1])
    first = "to_v" if stage["stage"] == "dca" else "gate"

    def grads():
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        trainer.losses(b)["loss"].backward()
        return {n: p.grad for n, p in trainer.module.named_parameters()}

    g0 = grads()
    assert len(g0) >= 6
    for n, g in g0.items():
        if n.endswith(first) or n.endswith(first + ".weight") or n.startswith(first + "."):
            assert g is not None and g.abs().max() > 0, n
        else:
            assert g is None or g.abs().max() == 0, n
    assert all(not p.requires_grad and p.grad is None for p in _unet_params(trainer))
    torch.manual_seed(5)
    trainer.train_step(b)
    g1 = grads()
    assert all(g is not None and g.abs().max() > 0 for g in g1.values()), [n for n, g in g1.items()
                                                                           if g is None or g.abs().max() == 0]
    assert all(p.grad is None for p in _unet_params(trainer))


@pytest.mark.parametrize("stage", [DCA, RPA], ids=["dca", "rpa"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(comfy, loaded, data_dir, tmp_path, checkpoint_calls,
                                                                  stage):
    calls = checkpoint_calls
    results = []
    for checkpointing in (False, True):
        calls.clear()
        trainer, data = _trainer(comfy, loaded, data_dir, tmp_path, gradient_checkpointing=checkpointing, **stage)
        with torch.no_grad():
            for p in trainer.module.parameters():      # every part active, so every gradient is non-trivial
                p.add_(0.02)
        b = trainer.batch(data, [2], torch.Generator().manual_seed(3))
        torch.manual_seed(7)
        loss = trainer.losses(b)["loss"]
        loss.backward()
        unet = trainer.model.model.diffusion_model
        blocks = [m for m in unet.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
        passes = 1 if stage["stage"] == "dca" else 2                   # rpa: the reference pass, then the patch's
        assert len(blocks) >= 6 and len(calls) == (passes * len(blocks) if checkpointing else 0)
        assert not any("forward" in m.__dict__ for m in blocks)       # the UNet is left as it was
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.module.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(g, results[1][1][n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stage", [DCA, RPA], ids=["dca", "rpa"])
def test_mixed_precision_steps(comfy, loaded, data_dir, tmp_path, stage):
    """Under bf16 / fp16 autocast (fp16 with loss scaling) the loss is the float32 one to half precision, and a step
    gives finite float32 updates."""
    losses = mixed_precision_losses(
        lambda mp: _trainer(comfy, loaded, data_dir, tmp_path / mp, mixed_precision=mp, **stage)[0],
        lambda trainer: trainer.batch(trainer.dataset, [0], torch.Generator().manual_seed(3)),
        lambda trainer: trainer.module.named_parameters())
    for mp in set(losses) - {"no"}:
        torch.testing.assert_close(losses[mp], losses["no"], rtol=5e-2, atol=0)
        assert losses[mp] != losses["no"], mp              # autocast did act


def test_patches_are_cut_around_the_hole_on_the_latent_grid(comfy):
    mod = _pack(comfy, "training.patch_adapter")
    g = torch.Generator().manual_seed(0)
    hole = torch.zeros(200, 136)
    hole[150:160, 3:9] = 1
    seen = set()
    for _ in range(200):
        box = mod.place_patch(hole, 64, g)
        assert box.y0 % 8 == 0 and box.x0 % 8 == 0 and box.h == box.w == 64
        assert 0 <= box.y0 <= 200 - 64 and 0 <= box.x0 <= 136 - 64
        ys, xs = box.slices()
        assert hole[ys, xs].sum() > 0
        seen.add((box.y0, box.x0))
    assert len(seen) >= 8                   # placed at random, not always the same way
    empty = {(b.y0, b.x0) for b in (mod.place_patch(torch.zeros(128, 128), 64, g) for _ in range(50))}
    assert len(empty) >= 5


def _write_config(path, ckpt_path, data_dir, out, **kw):
    lines = [f'base = "{ckpt_path}"', f'data = "{data_dir}"', f'output = "{out}"', "batch_size = 1", "log_every = 1",
             "save_every = 1", "sample_every = 2", "sample_steps = 2", "lr = 1e-3"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in kw.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_cli(comfy, config, *flags):
    return run_train_py(comfy, "patch_adapter", "--config", str(config), *flags)


def test_command_line_trains_both_stages_resumes_and_the_file_loads(comfy, run_prompt, ckpt, comfy_models, data_dir,
                                                                    tmp_path, loaded):
    node = _pack(comfy, "nodes.patch_adapter")
    ckpt_path = comfy.folder_paths.get_full_path("checkpoints", ckpt)
    dca_out, rpa_out = tmp_path / "dca", tmp_path / "rpa"
    dca_cfg = _write_config(tmp_path / "dca.toml", ckpt_path, data_dir, dca_out, resolution=64)
    _train_cli(comfy, dca_cfg, "--stage", "dca", "--steps", "2")
    assert Image.open(dca_out / "samples" / "step_0000002.png").size == (3 * 64, 64)
    assert torch.load(dca_out / "state.pt", weights_only=True)["step"] == 2
    _train_cli(comfy, dca_cfg, "--stage", "dca", "--steps", "3", "--sample_every", "0")      # resumes at step 2
    rows = _rows(dca_out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert torch.load(dca_out / "state.pt", weights_only=True)["step"] == 3

    # stage 2 from the stage-1 file, in process (the command line is the same code after parsing the options)
    mod = _pack(comfy, "training.patch_adapter")
    cfg = mod.PatchAdapterConfig(base="(preloaded)", data=str(data_dir), output=str(rpa_out), steps=2, log_every=1,
                                 sample_every=2, sample_steps=2, lr=1e-2, init=str(dca_out / "patch_adapter.safetensors"),
                                 **RPA)
    assert mod.PatchAdapterTrainer(cfg, *loaded).run() == rpa_out / "patch_adapter.safetensors"
    assert [int(r["step"]) for r in _rows(rpa_out)] == [1, 2]
    assert Image.open(rpa_out / "samples" / "step_0000002.png").size == (4 * 64, 64)

    # the stage-2 file holds both stages; its DCA is the stage-1 file's, unchanged
    stage1 = node.load_patch_adapter(str(dca_out / "patch_adapter.safetensors"), "float32")
    both = node.load_patch_adapter(str(rpa_out / "patch_adapter.safetensors"), "float32")
    assert not stage1.rpa and stage1.dca and both.dca == stage1.dca and both.rpa
    assert both.base == "sd15"
    s1, s2 = stage1.patcher.model.state_dict(), both.patcher.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(0 < abs(g) < 0.1 for g in both.gates.values())       # the gates opened a little in 2 steps

    # the untrained files (what the trainers start from) for comparison
    folder = comfy.models_dir / "patch_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    for stage in (DCA, RPA):
        t, _ = _trainer(comfy, loaded, data_dir, tmp_path / "init", **stage)
        t.save(folder / f"pa_train_init_{stage['stage']}.safetensors")
    (folder / "pa_trained_dca.safetensors").write_bytes((dca_out / "patch_adapter.safetensors").read_bytes())
    (folder / "pa_trained_both.safetensors").write_bytes((rpa_out / "patch_adapter.safetensors").read_bytes())
    comfy.folder_paths.filename_list_cache.clear()
    files = dict(ckpt=ckpt, vae=comfy_models.taesd_vae())
    ex = comfy.execution.PromptExecutor(comfy.server, cache_type=comfy.execution.CacheType.CLASSIC)   # loads once

    def stage1_sample(**kw):
        g = comfy.graph()
        s = _stage1(g, files, steps=2, size=64, rect=(16, 16, 24, 24), **kw)
        return run_prompt(g, executor=ex).output(s.id)["samples"]

    plain = stage1_sample(dual=False)
    assert torch.equal(stage1_sample(adapter="pa_train_init_dca.safetensors"), plain)        # W_v = 0
    assert (stage1_sample(adapter="pa_trained_dca.safetensors") - plain).abs().max() > 1e-5
    assert (stage1_sample(adapter="pa_trained_both.safetensors") - plain).abs().max() > 1e-5

    def stage2_refine(adapter):
        g = comfy.graph()
        n, _, _ = _stage2(g, files, (40, 48, 30, 20), size=128, ref=(64, 64), patch=64, overlap=16, steps=2,
                          adapter=adapter)
        return run_prompt(g, executor=ex).output(n.id, 0)

    untrained = stage2_refine("pa_train_init_rpa.safetensors")
    assert (stage2_refine("pa_trained_both.safetensors") - untrained).abs().max() > 1e-5


@pytest.mark.parametrize("kw, pattern", [
    (dict(stage="dca", resolution=60), r"resolution must be a positive multiple of 8 \(the VAE's latent factor\); got 60"),
    (dict(stage="rpa", resolution=64, full_resolution=128, patch_size=256),
     r"patch_size \(256\) must not exceed full_resolution \(128\)"),
    (dict(stage="rpa", resolution=256, full_resolution=128, patch_size=64),
     r"resolution \(256\) is the reference's .* must not exceed full_resolution \(128\)"),
    (dict(stage="rpa", resolution=64, full_resolution=132, patch_size=64), r"full_resolution must be .* got 132"),
    (dict(stage="stage3"), r"stage must be one of dca, rpa; got 'stage3'"),
    (dict(stage="dca", resolution=64, sites="middle,outptu"), r"sites: 'outptu' is neither a block kind"),
    (dict(stage="dca", resolution=64, mixed_precision="fp8"), r"mixed_precision must be no, fp16 or bf16"),
])
def test_bad_settings_are_refused(comfy, loaded, data_dir, tmp_path, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _trainer(comfy, loaded, data_dir, tmp_path, **kw)


def test_a_wrong_base_model_init_file_or_output_folder_is_refused(
        comfy, comfy_models, loaded, data_dir, tmp_path):
    from comfy.sd import load_checkpoint_guess_config
    plain = load_checkpoint_guess_config(comfy.folder_paths.get_full_path("checkpoints", comfy_models.sd15_checkpoint(2)),
                                         output_vae=False, output_clip=False)[0]
    mod = _pack(comfy, "training.patch_adapter")
    cfg = mod.PatchAdapterConfig(base="plain", data=str(data_dir), output=str(tmp_path), **DCA)
    with pytest.raises(ValueError, match=r"SD1.5- or SDXL-inpainting UNet .* in_channels=4"):
        mod.PatchAdapterTrainer(cfg, plain, *loaded[1:])

    pa = _pack(comfy, "models.patch_adapter")
    sd, meta = pa.adapter_state_dict(pa.AdapterWeights(
        dca={("output", 2, 0): {"to_q": torch.zeros(1280, 1280), "to_k": torch.zeros(1280, 1280),
                                "to_v": torch.zeros(1280, 1280)}}, base="sdxl"))
    save_file(sd, str(tmp_path / "sdxl.safetensors"), metadata=meta)
    tb = _pack(comfy, "nodes.branch_unet").transformer_sites(loaded[0].model.diffusion_model)[("output", 2, 0)]
    c, d = tb.attn2.to_q.in_features, tb.attn2.to_q.out_features
    with pytest.raises(ValueError, match=rf"does not fit the base model: dca.output.2.0 is 1280 channels / 1280 wide "
                                         rf"in the file, {c} channels / {d} wide in the UNet"):
        _trainer(comfy, loaded, data_dir, tmp_path, init=str(tmp_path / "sdxl.safetensors"), **RPA)

    out = tmp_path / "stage1_run"                         # a stage-1 output folder reused for stage 2
    out.mkdir()
    torch.save({"step": 1}, out / "state.pt")
    save_file(sd, str(out / "patch_adapter.safetensors"), metadata=meta)
    trainer, _ = _trainer(comfy, loaded, data_dir, out, **RPA)
    with pytest.raises(ValueError, match=r"holds a run of the other stage; give each stage its own output folder"):
        trainer.run()
