"""Trained models to ONNX graphs that are checked to compute what PyTorch computes.

The project writes every graph one way and checks it one way:

- ``export_onnx``: the dynamo exporter, named dynamic axes, one self-contained file;
- ``check_parity``: onnxruntime against PyTorch on inputs of shapes the export did not
  use, failing with ``ExportError`` past the one ``PARITY_TOLERANCE``.

The service loads three graphs made with them: ``user_encoder.onnx``
(``export_user_encoder``, ``check_encoder_parity``), ``ctr_head.onnx``
(``export_ctr_head``, ``check_head_parity``) and ``metadata_encoder.onnx``
(``export_metadata_encoder``, ``check_metadata_encoder_parity``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service import item_metadata
from service.encoder import OnnxUserEncoder
from service.item_metadata import ItemMetadataEncoder, MetadataVocabulary
from service.ranking import INPUT_NAMES, OUTPUT_NAME, CtrHead
from training.errors import ExportError
from training.models.base import UserEncoder
from training.models.ctr_head import CtrHeadModel, InferenceHead
from training.models.metadata_encoder import MetadataEncoderModel

PARITY_TOLERANCE = 1e-4

# numpy arrays in, one numpy array out: a PyTorch model or an onnxruntime session
ArrayFunction = Callable[..., np.ndarray]
# (the shape in words, e.g. "batch 3, length 7"; the inputs of both functions)
ParityBatch = tuple[str, tuple[np.ndarray, ...]]


def export_onnx(
    module: nn.Module, example: tuple, path: Path, dynamic_shapes: dict, outputs: list[str]
) -> None:
    """The project's one way to write a graph: dynamo exporter, named dynamic axes, one file.

    The legacy exporter silently fixed the sequence length of attention; dynamo keeps the
    axes in ``dynamic_shapes`` (input name -> {axis: Dim}) symbolic.
    """
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=True,
            input_names=list(dynamic_shapes),
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            external_data=False,  # one self-contained file per graph
            verbose=False,
        )


def check_parity(
    reference_fn: ArrayFunction,
    session_fn: ArrayFunction,
    input_batches: Iterable[ParityBatch],
    path: str | Path,
) -> float:
    """Max |session - reference| over ``input_batches``; raises ``ExportError`` past
    ``PARITY_TOLERANCE``, naming the file, the difference, the shape and the tolerance."""
    worst = 0.0
    for shape, inputs in input_batches:
        expected = reference_fn(*inputs)
        got = session_fn(*inputs)
        if got.shape != expected.shape:
            raise ExportError(f"{path}: output shape {got.shape}, PyTorch gives {expected.shape}")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if diff > PARITY_TOLERANCE:
            raise ExportError(
                f"{path}: onnxruntime differs from PyTorch by {diff:.2e} at {shape} "
                f"(tolerance {PARITY_TOLERANCE:.0e})"
            )
    return worst


def torch_function(module: Callable[..., torch.Tensor]) -> ArrayFunction:
    """A PyTorch callable as a function of numpy arrays, run without gradients."""

    def run(*inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(*(torch.from_numpy(x) for x in inputs)).numpy()

    return run


# --------------------------------------------------------------------------- user encoder


class InferenceEncoder(nn.Module):
    """The serving graph: histories in, normalised user embeddings out; nothing else."""

    def __init__(self, model: UserEncoder):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        return self.model.encode_user(item_ids, time_deltas)  # (b, d)


def export_user_encoder(model: UserEncoder, path: Path) -> None:
    """Write the ONNX graph with dynamic batch and length (up to the model's max_len)."""
    wrapper = InferenceEncoder(model)
    length = min(model.max_len, 8)
    example = (
        torch.randint(1, model.item_embedding.num_embeddings, (2, length)),
        torch.rand(2, length) * 1e5,
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("length", min=1, max=model.max_len)
    export_onnx(
        wrapper,
        example,
        path,
        {"item_ids": {0: batch, 1: seq}, "time_deltas": {0: batch, 1: seq}},
        ["user_embedding"],
    )


def parity_shapes(max_len: int) -> list[tuple[int, int]]:
    """(batch, length) pairs that include lengths unlike the export example's."""
    return [(1, 1), (2, min(7, max_len)), (3, min(50, max_len)), (4, max_len)]


def encoder_parity_batches(model: UserEncoder, seed: int = 0) -> Iterator[ParityBatch]:
    """Random ragged left-padded histories (item ids, whole-second time deltas) at
    ``parity_shapes``."""
    generator = torch.Generator().manual_seed(seed)
    n_items = model.item_embedding.num_embeddings - 1
    for batch, length in parity_shapes(model.max_len):
        ids = torch.randint(1, n_items + 1, (batch, length), generator=generator)
        pad = torch.randint(0, length, (batch,), generator=generator)
        ids[torch.arange(length)[None, :] < pad[:, None]] = 0  # ragged left padding
        # Whole seconds, as the service sends them, half of them one short of a power of
        # two: where a float log2 in a graph can floor a gap into the bucket below.
        whole = torch.floor(torch.rand(batch, length, generator=generator) * 1e6)
        powers = 2.0 ** torch.randint(0, 25, (batch, length), generator=generator) - 1.0
        half = torch.rand(batch, length, generator=generator) < 0.5
        deltas = torch.where(half, whole, powers) * (ids > 0)
        yield f"batch {batch}, length {length}", (ids.numpy(), deltas.numpy())


def check_encoder_parity(model: UserEncoder, path: Path, seed: int = 0) -> float:
    """Max |onnxruntime - torch| of the user encoder; raises past ``PARITY_TOLERANCE``."""
    session = OnnxUserEncoder(path, device="cpu")
    reference = torch_function(model.encode_user)
    return check_parity(reference, session.encode, encoder_parity_batches(model, seed), path)


# --------------------------------------------------------------------------- CTR head


def export_ctr_head(head: CtrHeadModel, path: str | Path) -> None:
    """Write ``ctr_head.onnx``: dynamic batch and candidate count, the served task's logits."""
    wrapper = InferenceHead(head)
    d, f = head.config.dim, head.config.n_features
    generator = torch.Generator().manual_seed(0)
    example = (
        F.normalize(torch.randn(2, d, generator=generator), dim=-1),
        torch.randn(2, 9, d, generator=generator),
        torch.randn(2, 9, f, generator=generator),
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    count = torch.export.Dim("candidates", min=1, max=100_000)
    # user_embedding, candidate_embeddings, candidate_features, in the graph's input order
    axes = ({0: batch}, {0: batch, 1: count}, {0: batch, 1: count})
    export_onnx(
        wrapper, example, Path(path), dict(zip(INPUT_NAMES, axes, strict=True)), [OUTPUT_NAME]
    )


def head_parity_shapes() -> list[tuple[int, int]]:
    """(batch, candidates) pairs, none of them the export example's (2, 9)."""
    return [(1, 1), (1, 200), (3, 7), (5, 50)]


def head_parity_batches(head: CtrHeadModel, seed: int = 0) -> Iterator[ParityBatch]:
    """Random (user, candidates, features) at ``head_parity_shapes``, features around the
    head's training statistics."""
    generator = torch.Generator().manual_seed(seed)
    d, f = head.config.dim, head.config.n_features
    for batch, count in head_parity_shapes():
        user = F.normalize(torch.randn(batch, d, generator=generator), dim=-1)
        candidates = torch.randn(batch, count, d, generator=generator)
        features = head.feature_mean + head.feature_std * torch.randn(
            batch, count, f, generator=generator
        )
        inputs = (user.numpy(), candidates.numpy(), features.numpy())
        yield f"batch {batch}, {count} candidates", inputs


def check_head_parity(head: CtrHeadModel, path: str | Path, seed: int = 0) -> float:
    """Max |onnxruntime - torch| of the served logits; raises past ``PARITY_TOLERANCE``."""
    session = CtrHead(path, device="cpu", feature_names=head.config.feature_names)
    reference = torch_function(InferenceHead(head))
    return check_parity(reference, session.score, head_parity_batches(head, seed), path)


# --------------------------------------------------------------------------- metadata encoder


def export_metadata_encoder(model: MetadataEncoderModel, path: str | Path) -> None:
    """Write ``metadata_encoder.onnx``: dynamic batch and token count, eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    example = (
        torch.randint(1, model.config.n_tokens, (2, 6), generator=generator),
        torch.rand(2, 6, generator=generator),
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    axes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
    export_onnx(
        model,
        example,
        Path(path),
        dict(zip(item_metadata.INPUT_NAMES, axes, strict=True)),
        [item_metadata.OUTPUT_NAME],
    )


def metadata_parity_shapes() -> list[tuple[int, int]]:
    """(batch, tokens) pairs, none of them the export example's (2, 6)."""
    return [(1, 1), (1, 9), (4, 3), (7, 40)]


def metadata_parity_batches(model: MetadataEncoderModel, seed: int = 0) -> Iterator[ParityBatch]:
    """Random token ids with ragged right padding (id 0, weight 0) at
    ``metadata_parity_shapes``."""
    generator = torch.Generator().manual_seed(seed)
    for batch, width in metadata_parity_shapes():
        ids = torch.randint(1, model.config.n_tokens, (batch, width), generator=generator)
        used = torch.randint(1, width + 1, (batch,), generator=generator)
        real = torch.arange(width)[None, :] < used[:, None]
        ids = torch.where(real, ids, torch.zeros_like(ids))
        weights = torch.rand(batch, width, generator=generator) * real
        yield f"batch {batch}, {width} tokens", (ids.numpy(), weights.numpy())


def check_metadata_encoder_parity(
    model: MetadataEncoderModel, path: str | Path, vocabulary: MetadataVocabulary, seed: int = 0
) -> float:
    """Max |onnxruntime - torch| of the item vectors; raises past ``PARITY_TOLERANCE``."""
    session = ItemMetadataEncoder(path, vocabulary, device="cpu")
    model.eval()
    return check_parity(
        torch_function(model), session.run, metadata_parity_batches(model, seed), path
    )
