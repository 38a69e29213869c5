"""What every trainer shares (training/common.py), in plain torch: configuration, prompt cache, resumable state,
gradient checkpointing of blocks, the optimiser step, eval mode for samples."""
import csv
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training import common


@dataclasses.dataclass
class Cfg:
    """A config."""
    data: str
    steps: int = 10
    lr: float = 1e-4
    flag: bool = False
    name: str = "x"


def test_parse_config_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "/d"\nsteps = 5\nflag = true\n')
    cfg = common.parse_config(Cfg, ["--config", str(f), "--steps", "7", "--lr", "0.5"])
    assert cfg == Cfg(data="/d", steps=7, lr=0.5, flag=True, name="x")
    assert common.parse_config(Cfg, ["--data", "/e", "--flag", "no"]) == Cfg(data="/e", flag=False)


def test_parse_config_refuses_unknown_and_missing_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "/d"\nstepz = 5\n')
    with pytest.raises(SystemExit, match="unknown option.*stepz"):
        common.parse_config(Cfg, ["--config", str(f)])
    with pytest.raises(SystemExit, match="missing required option.*data"):
        common.parse_config(Cfg, ["--steps", "3"])


@dataclasses.dataclass
class Method(common.TrainOptions):
    """A method's config: its own required option first, the shared ones keyword-only."""
    data: str


def test_shared_options_are_checked_when_the_config_is_made():
    assert Method("/d").save_every == 500 and Method("/d", seed=3).seed == 3
    assert [f.name for f in dataclasses.fields(Method)][-1] == "data"
    with pytest.raises(ValueError, match="log_every and save_every must be >= 1"):
        Method("/d", save_every=0)
    with pytest.raises(ValueError, match="sample_every >= 0"):
        Method("/d", sample_every=-1)
    with pytest.raises(ValueError, match="mixed_precision must be no, fp16 or bf16; got 'fp8'"):
        Method("/d", mixed_precision="fp8")


class FakeClip:
    """Two tokenizers' worth of 77-token chunks (token, weight); encodes to the token ids themselves."""

    def __init__(self):
        self.encoded = []

    def tokenize(self, prompt):
        ids = [49406] + [1000 + len(w) for w in prompt.split()] + [49407]
        chunks = [ids[i:i + 77] for i in range(0, max(len(ids), 1), 77)]
        chunks = [c + [49407] * (77 - len(c)) for c in chunks]
        tok = [[(t, 1.0) for t in c] for c in chunks]
        return {"l": tok, "g": tok}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded.append(tokens)
        ids = torch.tensor([[t for t, _ in c] for c in tokens["l"]], dtype=torch.float64)
        return ids[..., None].expand(-1, -1, 3).reshape(1, -1, 3), ids[:, :2].reshape(1, -1)


def test_prompt_encoder_keeps_the_first_chunk_and_caches_the_latest():
    clip = FakeClip()
    enc = common.PromptEncoder(clip, limit=2)
    long = " ".join(["word"] * 100)                          # two chunks
    p = enc(long)
    assert p.context.shape == (1, 77, 3) and p.context.dtype == torch.float32
    assert p.ids.shape == (1, 77) and int(p.ids[0, 0]) == 49406
    assert len(clip.encoded[0]["l"]) == 1 and len(clip.encoded[0]["g"]) == 1      # one chunk went in
    assert enc(long) is p and len(clip.encoded) == 1          # cached
    enc("a"), enc("bb")                                       # the limit pushes the oldest out
    enc(long)
    assert len(clip.encoded) == 4
    context, pooled = enc.batch(["a", "bb", "a"])
    assert context.shape == (3, 77, 3) and pooled.shape == (3, 2)
    assert torch.equal(context[0], context[2]) and not torch.equal(context[0], context[1])


class Block(nn.Module):
    """A block reading a dict its caller moves on between blocks, as ComfyUI's UNet does with the transformer
    options ("block", "transformer_index"); what it writes there itself is its own (as "block_index")."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, options):
        options["own"] = options["scale"] * 2
        return torch.tanh(self.lin(x) * options["own"])        # tanh saves its output: recomputed in backward


def _run(blocks, x):
    options = {"scale": 1.0}
    for b in blocks:
        x = b(x, options)
        options["scale"] += 1.0
    return x.square().sum()


def test_checkpointed_blocks_recompute_with_the_same_result_and_leave_the_blocks_as_they_were(checkpoint_calls):
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    x = torch.randn(2, 4)
    loss = _run(blocks, x)
    loss.backward()
    plain = [b.lin.weight.grad.clone() for b in blocks]
    for b in blocks:
        b.lin.weight.grad = None
    calls = checkpoint_calls
    with common.checkpointed_blocks(blocks):
        again = _run(blocks, x)
        with pytest.raises(RuntimeError, match="would stack"):
            with common.checkpointed_blocks(blocks[:1]):
                pass
    again.backward()                 # the recomputation sees the options as the first pass did
    assert len(calls) == 3
    torch.testing.assert_close(again, loss)
    for g, b in zip(plain, blocks):
        torch.testing.assert_close(b.lin.weight.grad, g)
    assert all("forward" not in b.__dict__ for b in blocks)
    with torch.no_grad(), common.checkpointed_blocks(blocks):
        _run(blocks, x)
    assert len(calls) == 3           # nothing to recompute without gradients


def test_optimizer_step_and_evaluating():
    net = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = net[0].weight.detach().clone()
    x = torch.ones(1, 3)
    net[0].weight.grad = torch.full_like(before, 100.0)      # stale gradient: must be cleared first
    loss = net[0](x).sum()
    out = common.optimizer_step(opt, scaler, {"loss": loss, "other": 2})
    assert out == {"loss": float(loss.detach()), "other": 2.0}
    torch.testing.assert_close(net[0].weight.detach(), before - 0.1)
    net.train()
    with common.evaluating(net):
        assert not net.training
    assert net.training
    net.eval()
    with pytest.raises(KeyError):
        with common.evaluating(net):
            raise KeyError
    assert not net.training


def test_loss_scaling_is_on_for_fp16_autocast_and_for_a_float16_model():
    dev = torch.device("cpu")

    def model(dtype, cast=None):
        return SimpleNamespace(model=SimpleNamespace(manual_cast_dtype=cast, get_dtype=lambda: dtype))
    assert not common.make_scaler(dev, "no", model(torch.float32)).is_enabled()
    assert not common.make_scaler(dev, "bf16", model(torch.bfloat16, torch.float32)).is_enabled()
    assert common.make_scaler(dev, "fp16", model(torch.float32)).is_enabled()
    assert common.make_scaler(dev, "no", model(torch.float32), model(torch.float16)).is_enabled()
    assert common.make_scaler(dev, "bf16", model(torch.float8_e4m3fn, torch.float16)).is_enabled()


def test_state_round_trip_and_mismatch(tmp_path):
    net, g = nn.Linear(2, 2), torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(net(torch.ones(1, 2)).sum()).backward()
    scaler.step(opt)
    scaler.update(2.0 ** 7)                             # a scale the run has moved to
    common.save_state(tmp_path / "state.pt", 7, net.state_dict(), opt, {"g": g}, scaler)
    want = torch.rand(3, generator=g)
    other, g2 = nn.Linear(2, 2), torch.Generator()
    opt2 = torch.optim.AdamW(other.parameters())
    scaler2 = torch.amp.GradScaler("cpu")
    assert common.load_state(tmp_path / "state.pt", other, opt2, {"g": g2}, scaler2) == 7
    assert torch.equal(other.weight, net.weight) and torch.equal(torch.rand(3, generator=g2), want)
    assert scaler2.get_scale() == 2.0 ** 7
    with pytest.raises(ValueError, match="does not match this run's trainable weights"):
        common.load_state(tmp_path / "state.pt", nn.Linear(3, 2), opt2, {"g": g2})


def test_image_folder_pairs_masks_and_prompts(tmp_path):
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 40), np.uint8)
    m[:, 20:] = 255
    Image.fromarray(m).save(tmp_path / "a.mask.png")
    (tmp_path / "a.txt").write_text(" a cat \n")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "b.jpg")
    data = common.ImageFolder(str(tmp_path), 16)
    assert [p.name for p in data.items] == ["a.png", "b.jpg"]
    pixels, mask, prompt = data[0]
    assert pixels.shape == (3, 16, 16) and prompt == "a cat"
    assert mask.shape == (16, 16) and mask[:, :7].max() == 0 and mask[:, 9:].min() == 1   # centre crop of the halves
    assert data[1][1] is None and data[1][2] == ""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        common.ImageFolder(str(tmp_path / "empty"), 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.ImageFolder(str(tmp_path / "missing"), 16)


def test_cosine_lr():
    assert common.cosine_lr(1.0, 0, 100) == 1.0
    assert common.cosine_lr(1.0, 50, 100) == pytest.approx(0.5)
    assert common.cosine_lr(1.0, 100, 100) == pytest.approx(0.0) == common.cosine_lr(1.0, 300, 100)


def test_a_resumed_loop_logs_every_step_once(tmp_path):
    """A run stopped after logging step 3 but saving only step 2 resumes at 2: loss.csv keeps 1 and 2, drops the
    stale 3, and the resumed run logs 3 and 4; the trained weights equal an uninterrupted run's."""
    def make(crash_at=None):
        torch.manual_seed(0)
        net = nn.Linear(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)

        def step_fn(step):
            if step == crash_at:
                raise KeyboardInterrupt
            x = torch.rand(4, 2, generator=g)
            return common.optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False),
                                         {"loss": (net(x) - 1).square().mean()})
        return net, common.Loop(name="t", output=str(out), steps=4, module=net, optimizer=opt, generators={"g": g},
                                loss_names=["loss"], step_fn=step_fn, save_fn=lambda: out / "w",
                                log_every=1, save_every=2)

    out = tmp_path / "whole"
    whole, loop = make()
    loop.run()
    out = tmp_path / "resumed"
    _, loop = make(crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    with open(out / "loss.csv") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    resumed, loop = make()
    loop.run()
    with open(out / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "whole" / "loss.csv") as fh:
        assert rows == list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert torch.equal(resumed.weight, whole.weight)
