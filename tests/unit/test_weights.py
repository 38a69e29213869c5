"""The safe loader: safetensors, weights_only pickles, the explicit allow-list, and clear refusals."""
import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from models.weights import CheckpointFormatError, load_weights, single_tensor, tensor_dict


def test_safetensors_and_plain_pickle_give_same_tensors(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        got = load_weights(str(tmp_path / name))
        assert set(got) == set(sd)
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_namespace_in_mae_checkpoint_is_allow_listed(tmp_path):
    path = tmp_path / "mae_300.pth"
    torch.save({"model": {"x": torch.ones(2)}, "args": argparse.Namespace(lr=0.1), "epoch": 300}, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses it ...
        torch.load(path, weights_only=True)
    got = load_weights(str(path))                # ... our loader maps it to an inert holder
    assert torch.equal(tensor_dict(got, str(path))["x"], torch.ones(2))
    assert not isinstance(got["args"], argparse.Namespace)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/consistent_inpaint_pwned",))


def test_code_in_pickle_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/consistent_inpaint_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": _Evil()}, path)
    with pytest.raises(CheckpointFormatError, match="cannot be loaded safely.*system"):
        load_weights(str(path))
    assert not os.path.exists(marker)


def test_unknown_class_is_named_in_error(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "cb": _Evil.__new__(_Evil).__class__}, path)
    with pytest.raises(CheckpointFormatError, match="_Evil"):
        load_weights(str(path))


@pytest.mark.parametrize("name,content,match", [
    ("bad.safetensors", b"\x00" * 64, "not a readable safetensors"),
    ("bad.pth", b"this is not a checkpoint", "not a readable torch checkpoint|cannot be loaded safely"),
    ("weights.txt", b"x", "unsupported file type"),
])
def test_corrupt_or_wrong_type_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=match):
        load_weights(str(p))


def test_missing_file():
    with pytest.raises(CheckpointFormatError, match="not found"):
        load_weights("/nonexistent/file.safetensors")


def test_truncated_zip_pickle(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        load_weights(str(p))


def test_single_tensor_containers(tmp_path):
    t = torch.randn(1, 768)
    torch.save(t, tmp_path / "vec.pt")
    save_file({"vec": t}, tmp_path / "vec.safetensors")
    for n in ("vec.pt", "vec.safetensors"):
        assert torch.equal(single_tensor(load_weights(str(tmp_path / n)), n), t)
    with pytest.raises(CheckpointFormatError, match=r"two.safetensors: expected one tensor .*; got 2 tensors\."):
        single_tensor({"a": t, "b": t}, "two.safetensors")
    # a model's weights in a container (e.g. the MAE's {"model": {...}}) is not counted as "0 tensors"
    with pytest.raises(CheckpointFormatError, match=r"got 0 tensors and 1 containers of more"):
        single_tensor({"model": {"a": t, "b": t}}, "mae_300.pth")


@pytest.mark.parametrize("bad,match", [(float("nan"), "lin.weight holds NaN or infinite"),
                                       (float("inf"), "lin.weight holds NaN or infinite"),
                                       ("int", "lin.weight has dtype int64; expected floating-point")])
def test_weights_with_nan_inf_or_integer_tensors_are_refused_by_name(bad, match):
    from models.weights import build_from_state_dict

    def factory(device):
        m = torch.nn.Module()
        m.lin = torch.nn.Linear(3, 2, device=device)
        return m

    sd = {"lin.weight": torch.randn(2, 3), "lin.bias": torch.zeros(2)}
    assert torch.equal(build_from_state_dict(factory, sd, "ok.pt", "a test net").lin.weight, sd["lin.weight"])
    if bad == "int":
        sd["lin.weight"] = torch.ones(2, 3, dtype=torch.int64)
    else:
        sd["lin.weight"] = sd["lin.weight"].clone()
        sd["lin.weight"][1, 2] = bad
    with pytest.raises(CheckpointFormatError, match=match):
        build_from_state_dict(factory, sd, "bad.pt", "a test net")


@pytest.mark.parametrize("bad,match", [(torch.tensor([1.0, float("nan")]), "NaN or infinite"),
                                       (torch.tensor([1, 2]), "dtype int64")])
def test_single_tensor_files_are_checked_too(tmp_path, bad, match):
    torch.save(bad, tmp_path / "vec.pt")
    with pytest.raises(CheckpointFormatError, match=match):
        single_tensor(load_weights(str(tmp_path / "vec.pt")), str(tmp_path / "vec.pt"))
