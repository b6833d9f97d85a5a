"""Sizes of a federated OMC model from its selection plan alone
(``federated_scale.py``'s analytic tables).

Nothing is trained and nothing of the model is allocated: the model is built
on PyTorch's ``meta`` device (shapes without storage) with SpeechBrain's own
lobes, :func:`~speechbrain_omc.engine.selection.make_plan` decides per parameter
whether it travels compressed and in which format, and the bytes follow from
the plan:

* :func:`plan_sizes`: one client's plan: its parameter memory under OMC and
  the exact length of its wire message
  (:func:`~speechbrain_omc.federated.wire.entry_nbytes` of each entry);
* :func:`round_sizes`: a federated round of ``clients_per_round`` clients:
  bytes down and up, the server's memory with streaming aggregation (and
  without, as it was before), the clients' parameter memory.

The same numbers a real run measures: ``tests/test_sizes.py`` checks them
against the messages and the memory of a real server on a small model.

Presets (:data:`PRESETS`, built by :func:`conformer_ctc`):

``conformer_large``
    SpeechBrain's conformer_large encoder shape with a CTC head, as
    ``benchmarks/train_step.py``'s "large" setting: CNN front end,
    ``TransformerASR`` with 12 conformer layers (``RelPosMHAXL``), d_model
    512, 8 heads, FFN 2048, kernel 31, 32 outputs: 76.2M parameters.
``conformer_130m``
    The size the paper's group reports (about 130M parameters): the same
    layers, 20 of them, and a 5,000-token CTC head (SpeechBrain's
    LibriSpeech BPE vocabulary): 129.4M parameters.

Example
-------
>>> from speechbrain_omc import OMCConfig
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
>>> sizes = plan_sizes(model, OMCConfig(format="e3m7", fp32_fraction=0.0))
>>> sizes.parameters, sizes.float32_bytes, sizes.plan_bytes  # 11-bit weight
(2144, 8576, 3204)
>>> round(sizes.bits_per_parameter, 2), round(sizes.saving, 3)
(11.96, 0.626)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.selection import (
    compressed_nbytes,
    make_plan,
    parameter_roles,
    resolve_roles,
)
from speechbrain_omc.federated import wire

__all__ = [
    "PRESETS",
    "PlanSizes",
    "RoundSizes",
    "broadcast_meta",
    "conformer_ctc",
    "model_shapes",
    "plan_sizes",
    "reply_meta",
    "round_sizes",
]

#: Conformer-CTC shapes (see the module docstring).
PRESETS: dict[str, dict[str, Any]] = {
    "conformer_large": dict(
        d_model=512, nhead=8, layers=12, d_ffn=2048, kernel_size=31, vocab=32
    ),
    "conformer_130m": dict(
        d_model=512, nhead=8, layers=20, d_ffn=2048, kernel_size=31, vocab=5000
    ),
}

Shapes = Sequence[tuple[str, tuple[int, ...]]]


def conformer_ctc(
    preset: str | Mapping[str, Any] = "conformer_large", device: str = "meta"
) -> torch.nn.ModuleDict:
    """A Conformer-CTC of SpeechBrain's lobes, on ``meta`` by default.

    CNN front end (2 blocks, 64 and 32 channels, 80 mel bins), a
    ``TransformerASR`` conformer encoder (``RelPosMHAXL`` attention,
    pre-norm, no decoder) and a linear CTC head: how SpeechBrain's recipes
    and ``benchmarks/train_step.py`` build it.

    Arguments
    ---------
    preset : str or mapping
        A name of :data:`PRESETS` or its keys: ``d_model``, ``nhead``,
        ``layers``, ``d_ffn``, ``kernel_size``, ``vocab``.
    device : str
        ``"meta"``: shapes only, nothing allocated.

    Returns
    -------
    torch.nn.ModuleDict
        ``front``, ``asr`` and ``ctc``.

    Example
    -------
    >>> model = conformer_ctc("conformer_large")
    >>> sum(p.numel() for p in model.parameters()), next(model.parameters()).device
    (76237248, device(type='meta'))
    """
    from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
    from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

    shape = dict(PRESETS[preset] if isinstance(preset, str) else preset)
    with torch.device(device):
        front = ConvolutionFrontEnd(
            input_shape=(8, 10, 80), num_blocks=2, num_layers_per_block=1,
            out_channels=(64, 32), kernel_sizes=(3, 3), strides=(2, 2),
            residuals=(False, False),
        )  # fmt: skip
        asr = TransformerASR(
            tgt_vocab=shape["vocab"], input_size=640, d_model=shape["d_model"],
            nhead=shape["nhead"], num_encoder_layers=shape["layers"],
            num_decoder_layers=0, d_ffn=shape["d_ffn"], dropout=0.1,
            encoder_module="conformer", attention_type="RelPosMHAXL",
            normalize_before=True, causal=False, kernel_size=shape["kernel_size"],
        )  # fmt: skip
        ctc = torch.nn.Linear(shape["d_model"], shape["vocab"])
    return torch.nn.ModuleDict({"front": front, "asr": asr, "ctc": ctc})


def model_shapes(
    model: torch.nn.Module | Shapes, roles: Mapping[str, str] | None = None
) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Parameter names, shapes and roles (what a plan is made from).

    Arguments
    ---------
    model : torch.nn.Module or sequence of (name, shape)
        A module (on any device, ``meta`` included) or its shapes.
    roles : mapping, optional
        Roles to use over the module's own (see
        :func:`~speechbrain_omc.engine.selection.parameter_roles`).

    Returns
    -------
    shapes : list of (name, shape)
    roles : dict
        Name to role, for every parameter.

    Example
    -------
    >>> shapes, roles = model_shapes(torch.nn.LayerNorm(4))
    >>> shapes
    [('weight', (4,)), ('bias', (4,))]
    >>> roles
    {'weight': 'normalisation', 'bias': 'normalisation'}
    """
    if isinstance(model, torch.nn.Module):
        roles = {**parameter_roles(model), **(roles or {})}
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    else:
        shapes = [(str(n), tuple(int(d) for d in s)) for n, s in model]
    return shapes, resolve_roles(shapes, roles)


def broadcast_meta(round: int = 1, client: str = "client_000") -> dict:
    """Metadata of a server broadcast, with values of their real lengths.

    Arguments
    ---------
    round : int
    client : str

    Returns
    -------
    dict
        ``type``, ``round``, ``client``, ``seed`` (19 digits), ``config``,
        ``run`` and ``nonce`` (32 hex digits each).

    Example
    -------
    >>> sorted(broadcast_meta())
    ['client', 'config', 'nonce', 'round', 'run', 'seed', 'type']
    """
    return {
        "type": "global",
        "round": int(round),
        "client": str(client),
        "seed": 2**62 + 12345,
        "config": {"local_epochs": 1},
        "run": "0" * 32,
        "nonce": "0" * 32,
    }


def reply_meta(round: int = 1, client: str = "client_000") -> dict:
    """Metadata of a client's reply, with values of their real lengths.

    Arguments
    ---------
    round : int
    client : str

    Returns
    -------
    dict

    Example
    -------
    >>> reply_meta()["type"]
    'update'
    """
    return {
        "type": "update",
        "round": int(round),
        "client": str(client),
        "run": "0" * 32,
        "nonce": "0" * 32,
        "num_examples": 100,
        "metrics": {
            "train_loss": 12.345678901234567,
            "steps": 10,
            "skipped_updates": 0,
        },
    }


@dataclass(frozen=True)
class PlanSizes:
    """One client's plan in bytes.

    Arguments
    ---------
    parameters : int
        Parameter values.
    float32_bytes : int
        Their bytes in float32.
    plan_bytes : int
        Their bytes under the plan (packed codes, transforms, the float32
        ones): the client's parameter memory under OMC.
    compressed_parameters : int
        Values stored compressed.
    message_bytes : int
        Exact length of the wire message carrying them (with ``meta``).
    float32_message_bytes : int
        The same message with every entry in float32.
    largest_entry : int
        Values of the largest parameter.
    compressed : dict
        Name to format of the compressed parameters.
    """

    parameters: int
    float32_bytes: int
    plan_bytes: int
    compressed_parameters: int
    message_bytes: int
    float32_message_bytes: int
    largest_entry: int
    compressed: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def bits_per_parameter(self) -> float:
        """Average bits per value under the plan."""
        return 8 * self.plan_bytes / max(self.parameters, 1)

    @property
    def saving(self) -> float:
        """Fraction of the float32 parameter bytes saved."""
        return 1 - self.plan_bytes / max(self.float32_bytes, 1)


def plan_sizes(
    model: torch.nn.Module | Shapes,
    config: OMCConfig | None,
    round: int = 1,
    client: str = "client_000",
    roles: Mapping[str, str] | None = None,
    meta: Mapping | None = None,
) -> PlanSizes:
    """The sizes of one client's plan (see the module docstring).

    Arguments
    ---------
    model : torch.nn.Module or sequence of (name, shape)
        The model (e.g. on ``meta``) or its parameter shapes.
    config : OMCConfig or None
        The compression; ``None`` is float32.
    round : int
        Round of the plan (the random policy draws per round and client).
    client : str
        Client id.
    roles : mapping, optional
        Parameter roles (see :func:`model_shapes`).
    meta : mapping, optional
        The message's metadata; :func:`broadcast_meta` by default.

    Returns
    -------
    PlanSizes
    """
    shapes, roles = model_shapes(model, roles)
    return _plan_sizes(shapes, roles, config, round, client, meta)


def _plan_sizes(shapes, roles, config, round, client, meta=None) -> PlanSizes:
    formats: dict[str, str | None] = dict.fromkeys((n for n, _ in shapes), None)
    transform = "scale"
    if config is not None:
        plan = make_plan(shapes, config, round=round, client=client, roles=roles)
        formats.update({e.name: e.format for e in plan.compressed})
        transform = config.transform
    meta = broadcast_meta(round, client) if meta is None else meta
    numel = {name: math.prod(shape) for name, shape in shapes}
    compressed = {n: f for n, f in formats.items() if f is not None}
    plan_bytes = sum(
        compressed_nbytes(numel[n], formats[n], transform)
        if formats[n] is not None
        else 4 * numel[n]
        for n, _ in shapes
    )
    empty = wire.encoded_nbytes({}, meta)
    return PlanSizes(
        parameters=sum(numel.values()),
        float32_bytes=4 * sum(numel.values()),
        plan_bytes=plan_bytes,
        compressed_parameters=sum(numel[n] for n in compressed),
        message_bytes=empty + _entries_nbytes(shapes, formats, transform),
        float32_message_bytes=empty + _entries_nbytes(shapes, {}, transform),
        largest_entry=max(numel.values()),
        compressed=compressed,
    )


def _entries_nbytes(shapes: Shapes, formats: Mapping, transform: str) -> int:
    return sum(
        wire.entry_nbytes(name, shape, formats.get(name), transform)
        for name, shape in shapes
    )


@dataclass(frozen=True)
class RoundSizes:
    """A federated round of ``clients_per_round`` clients, in bytes.

    Arguments
    ---------
    clients_per_round : int
        Clients in the round.
    bytes_down, bytes_up : int
        The broadcasts' and the replies' total length.
    float32_bytes_down, float32_bytes_up : int
        The same with every entry in float32.
    largest_message : int
        The longest single message of the round.
    client_parameter_bytes : float
        A client's parameter memory under its plan (mean over the clients).
    client_float32_bytes : int
        The same in float32.
    server_streaming : dict
        The server's memory with streaming aggregation, by part: ``master``
        (the float32 global model), ``running`` (the running float32 sums),
        ``momentum`` (FedAvgM's, if any), ``broadcast`` (the round's
        compressed variables, compressed once and shared by its clients),
        ``message`` (the reply in hand), ``decoding`` (one decoded entry:
        float32 values, finiteness mask, two copies of its payload; an upper
        bound of the server's decoding buffers, which hold the largest
        entry's values and one copy of its payload, and need a mask only
        for a non-finite entry).
        The Python runtime, Flower's state and per-client bookkeeping are not
        included.
    server_before : dict
        The same for the server before streaming: ``master``,
        ``decoded`` (every accepted reply decoded to float32), ``messages``
        (every broadcast and every reply of the round held at once).
    """

    clients_per_round: int
    bytes_down: int
    bytes_up: int
    float32_bytes_down: int
    float32_bytes_up: int
    largest_message: int
    client_parameter_bytes: float
    client_float32_bytes: int
    server_streaming: dict[str, int]
    server_before: dict[str, int]

    @property
    def server_streaming_bytes(self) -> int:
        """Total of :attr:`server_streaming`."""
        return sum(self.server_streaming.values())

    @property
    def server_before_bytes(self) -> int:
        """Total of :attr:`server_before`."""
        return sum(self.server_before.values())


def round_sizes(
    model: torch.nn.Module | Shapes,
    config: OMCConfig | None,
    clients_per_round: int,
    round: int = 1,
    roles: Mapping[str, str] | None = None,
    momentum: bool = False,
    clients: Iterable[str] | None = None,
) -> RoundSizes:
    """The bytes of one federated round, from the plans alone.

    Every client's plan is made (the random policy differs per client), its
    broadcast and reply sized exactly (:func:`broadcast_meta`,
    :func:`reply_meta`).

    Arguments
    ---------
    model : torch.nn.Module or sequence of (name, shape)
        The model (e.g. on ``meta``) or its parameter shapes.
    config : OMCConfig or None
        The compression; ``None`` is float32.
    clients_per_round : int
        Clients in the round.
    round : int
        The round (plans of the random policy depend on it).
    roles : mapping, optional
        Parameter roles.
    momentum : bool
        Server momentum (FedAvgM) keeps one more float32 model.
    clients : iterable of str, optional
        The round's client ids; ``client_000``... by default.

    Returns
    -------
    RoundSizes

    Example
    -------
    >>> from speechbrain_omc.engine.config import OMCConfig
    >>> model = torch.nn.Linear(256, 256)
    >>> sizes = round_sizes(model, OMCConfig(format="e3m7", fp32_fraction=0.0), 100)
    >>> sizes.server_streaming["running"] == 4 * (256 * 256 + 256)
    True
    >>> sizes.server_before_bytes > 30 * sizes.server_streaming_bytes
    True
    """
    shapes, roles = model_shapes(model, roles)
    clients = (
        [f"client_{i:03d}" for i in range(clients_per_round)]
        if clients is None
        else list(clients)
    )
    if len(clients) != clients_per_round:
        raise ValueError(f"{len(clients)} client ids for {clients_per_round} clients")
    transform = "scale" if config is None else config.transform
    down = up = down32 = up32 = largest = 0
    client_bytes, broadcast = [], {}
    # Only the random policy draws per client; other plans are made once.
    same = config is None or config.fp32_policy != "random" or not config.fp32_fraction
    first = None
    for client in clients:
        if same and first is not None:
            # The same plan; only the client id in the metadata differs.
            meta = broadcast_meta(round, client)
            delta = wire.encoded_nbytes({}, meta) - wire.encoded_nbytes(
                {}, broadcast_meta(round, clients[0])
            )
            sizes = replace(
                first,
                message_bytes=first.message_bytes + delta,
                float32_message_bytes=first.float32_message_bytes + delta,
            )
        else:
            sizes = first = _plan_sizes(shapes, roles, config, round, client)
        # The reply: the same entries, other metadata (the plan is made once).
        extra = wire.encoded_nbytes({}, reply_meta(round, client)) - (
            wire.encoded_nbytes({}, broadcast_meta(round, client))
        )
        down, down32 = down + sizes.message_bytes, down32 + sizes.float32_message_bytes
        up += sizes.message_bytes + extra
        up32 += sizes.float32_message_bytes + extra
        largest = max(largest, sizes.message_bytes, sizes.message_bytes + extra)
        client_bytes.append(sizes.plan_bytes)
        broadcast.update(sizes.compressed)
    numel = {name: math.prod(shape) for name, shape in shapes}
    model_bytes = 4 * sum(numel.values())
    biggest = max(numel, key=numel.get)
    payload = (
        wire.entry_nbytes(biggest, dict(shapes)[biggest], broadcast[biggest], transform)
        if biggest in broadcast
        else 4 * numel[biggest]
    )
    streaming = {
        "master": model_bytes,
        "running": model_bytes,
        "momentum": model_bytes if momentum else 0,
        "broadcast": sum(
            wire.entry_nbytes(n, dict(shapes)[n], f, transform)
            - wire.entry_head_nbytes(n)
            for n, f in broadcast.items()
        ),
        "message": largest,
        "decoding": 5 * numel[biggest] + 2 * payload,
    }
    before = {
        "master": model_bytes + (model_bytes if momentum else 0),
        "decoded": clients_per_round * model_bytes,
        "messages": down + up,
    }
    return RoundSizes(
        clients_per_round=clients_per_round,
        bytes_down=down,
        bytes_up=up,
        float32_bytes_down=down32,
        float32_bytes_up=up32,
        largest_message=largest,
        client_parameter_bytes=statistics.fmean(client_bytes),
        client_float32_bytes=model_bytes,
        server_streaming=streaming,
        server_before=before,
    )
