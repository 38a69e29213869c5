"""PowerPaint-v2 task-embedding file: reading the authors' layout, refusing others, the task table and the
fitting-degree mix."""
import pytest
import torch

import branch_layouts as W
from models.powerpaint_tasks import blend, clip_l_shapes, read_task_file
from models.weights import CheckpointFormatError, load_weights, tensor_dict


def test_authors_layout_gives_the_vectors_and_the_encoder_in_comfy_naming(tmp_path):
    sd = W.powerpaint_text_encoder()
    vectors, encoder = read_task_file(sd, "pytorch_model.bin")
    assert set(vectors) == {"P_ctxt", "P_shape", "P_obj"}
    assert torch.equal(vectors["P_obj"], sd["text_model.embeddings.token_embedding.trainable_embeddings.P_obj"])
    assert set(encoder) == set(clip_l_shapes())          # renamed 'wrapped', position_ids dropped
    assert "text_model.embeddings.token_embedding.weight" in encoder


def test_pickled_file_round_trip_and_prefixed_keys(tmp_path):
    vec = {"P_obj": torch.randn(10, 768)}
    sd = W.powerpaint_text_encoder(vectors=vec, encoder=False, prefix="module.")
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    vectors, encoder = read_task_file(tensor_dict(load_weights(str(path)), str(path)), str(path))
    assert encoder is None
    assert torch.equal(vectors["P_obj"], vec["P_obj"])


@pytest.mark.parametrize("case,match", [
    ("missing_word", "P_shape"),
    ("wrong_width", r"\[n, 768\]"),
    ("encoder_shape", "fc1.weight has shape"),
    ("encoder_partial", "missing"),
    ("brushnet", "got no task embeddings"),
])
def test_other_files_are_refused_with_what_was_expected(case, match):
    if case == "missing_word":
        sd = W.powerpaint_text_encoder(words=("P_ctxt", "P_obj"))
    elif case == "wrong_width":
        sd = W.powerpaint_text_encoder(encoder=False, width=1024)
    elif case == "encoder_shape":
        sd = W.powerpaint_text_encoder()
        sd["text_model.encoder.layers.3.mlp.fc1.weight"] = torch.zeros(()).expand(3000, 768)
    elif case == "encoder_partial":
        sd = W.powerpaint_text_encoder()
        del sd["text_model.encoder.layers.11.mlp.fc2.bias"]
    else:
        sd = W.brushnet_sd15(device="meta")
    with pytest.raises(CheckpointFormatError, match=match):
        read_task_file(sd, "pytorch_model.bin")


def test_fitting_degree_mix():
    a, b = torch.randn(1, 77, 768, dtype=torch.float64), torch.randn(1, 77, 768, dtype=torch.float64)
    assert torch.equal(blend(a, b, 1.0), a)
    torch.testing.assert_close(blend(a, b, 0.3), 0.3 * a + 0.7 * b)
    torch.testing.assert_close(blend(a, b, 0.0), b)


def test_the_branch_loader_points_to_the_task_prompt_node():
    from models.branch_layouts import detect
    with pytest.raises(CheckpointFormatError, match="PowerPaint Task Prompt"):
        detect(W.powerpaint_text_encoder(), None, "pytorch_model.bin")
