"""The CTR head model: one logit per task, the factorised interaction, its ONNX graph."""

import numpy as np
import pytest
import torch

from training.ctr import torch_scorer
from training.errors import ExportError
from training.models.ctr_head import CtrHeadConfig, CtrHeadModel
from training.onnx_export import check_head_parity, export_ctr_head, head_parity_shapes


def _random_head(tasks=("watched", "liked")) -> CtrHeadModel:
    torch.manual_seed(0)
    names = [f"f{i}" for i in range(5)]
    head = CtrHeadModel(
        CtrHeadConfig(dim=8, feature_names=names, tasks=list(tasks), deep=(16,), tower=8)
    )
    head.set_feature_stats(np.linspace(-1, 3, 5), np.linspace(0.5, 4, 5))
    return head.eval()


def test_head_onnx_matches_pytorch_at_shapes_not_used_at_export(tmp_path):
    shapes = head_parity_shapes()
    assert (2, 9) not in shapes  # the export example
    assert {1, 200} <= {count for _, count in shapes} and {1, 3, 5} <= {b for b, _ in shapes}
    head = _random_head()
    path = tmp_path / "ctr_head.onnx"
    export_ctr_head(head, path)
    assert check_head_parity(head, path) <= 1e-4

    changed = _random_head()
    with torch.no_grad():
        changed.towers[0].linear.bias.add_(0.5)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_head_parity(changed, path)


def test_head_gives_one_logit_per_task_and_serves_the_first():
    head = _random_head()
    user, cand, feats = torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 5)
    with torch.no_grad():
        logits = head(user, cand, feats)
    assert logits.shape == (2, 4, 2)
    np.testing.assert_allclose(
        torch_scorer(head)(user.numpy(), cand.numpy(), feats.numpy())[..., 0], logits[..., 0]
    )


def test_factorised_interaction_is_the_projection_of_user_item_and_their_product():
    head = _random_head()
    user, cand = torch.randn(3, 8), torch.randn(3, 5, 8)
    plain = torch.cat([user[:, None].expand_as(cand), cand, user[:, None] * cand], dim=-1)
    with torch.no_grad():
        expected = head.interaction(plain)
        got = head.interact(user, cand)
    assert got.shape == (3, 5, head.config.interaction)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
