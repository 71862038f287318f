r"""MMGCN (Hu et al., ACL 2021): multimodal fused graph convolution over a dialogue; github.com/hujingwen6666/MMGCN.

Every utterance of a dialogue becomes one node per modality; a deep GCNII stack propagates over a graph whose
edges are the angular similarity of the node features, and each utterance is classified from its nodes' outputs.

Architecture (``modalities="avl"``, hidden 200, GCN hidden 100; ``M`` modalities, ``N`` utterances in the batch)
----------------------------------------------------------------------------------------------------------------
* Encoders: lexical ``Linear(D_l, 200)`` -> 2-layer bidirectional LSTM (hidden 100 per direction, dropout between
  its layers) over each dialogue -> 200; acoustic / visual ``Linear(D, 200)`` (no LSTM, the authors'
  ``av_using_lstm`` off). A speaker embedding ``Embedding(num_speakers, 200)`` is added to the lexical nodes only.
* Graph: :func:`mmer_ext.ops.angular_adjacency` of the encoded node features ``[M, N, 200]`` (the features the GCN
  receives, as MMGCN builds its graph in the GCN's forward from its inputs): per dialogue, all pairs of utterances
  within a modality (self-loops included) and the same utterance across modalities, weight
  ``1 - arccos(0.99999 cos) / pi``, then ``D^-1/2 A D^-1/2``. It is kept in the block layout (one padded block per
  dialogue) and applied with :func:`mmer_ext.ops.block_graph_propagate`, so the ``O(N^2)`` dense matrix is never
  built; gradients flow through the adjacency into the encoders, as in the authors' code (which does not detach).
  Because cross-modality edges only join an utterance's own nodes, the blocks are split once per forward into the
  ``M`` intra-modality blocks and the cross-modality diagonals (``propagation="modal"``, default): a third of the
  propagation's multiply-adds of the full blocks (``"full"``), same result to rounding. The cross-modality edges
  are one batched ``[M, M] x [M, F]`` product per utterance. With the fused GCNII layers below, the 64-layer
  training step is ~24x the authors' loop-built dense graph with their module layers on 2 quiet CPU threads
  (``benchmarks/bench_mmgcn_step.py``; the README's performance notes give the committed run).
* Dropout (``dropout_rng="philox"``, default): each GCNII layer, with the dropout that follows it, is one
  :func:`mmer_ext.ops.gcnii_layer` call, whose masks are drawn inside the kernel from a Philox stream keyed by the
  global generator (no mask is drawn into memory or stored for the backward); the other three dropouts (nodes,
  ``h0`` before the first layer, classifier) are ``"uniform"``. ``"uniform"`` keeps an entry where a
  ``torch.rand_like`` draw is ``>= p``: the keep probability of ``F.dropout`` at a quarter of its CPU cost.
  ``"bernoulli"`` is ``F.dropout`` (the model before issue 17, the authors' ``nn.Dropout``). The three draw
  different masks for a given seed; the distribution is the same. ``variant=False`` layers are not what the fused
  op computes: with ``"philox"`` they run as modules with ``"uniform"`` masks.
* GCNII (the authors' ``variant=True``): ``x = dropout(nodes)``, ``h0 = ReLU(Linear(200, 100)(x))``; for
  ``l = 1..L`` (``L = 64`` as hard-coded upstream): ``h = dropout(h)``, ``hi = A h``,
  ``h = ReLU(theta_l [hi || h0] W_l + (1 - theta_l)((1 - alpha) hi + alpha h0))`` with
  ``theta_l = ln(lambda / l + 1)`` (``lambda`` 0.5, ``alpha`` 0.1; ``W_l`` 200 x 100, no bias); ``variant=False``
  is the original GCNII layer ``s = (1 - alpha) hi + alpha h0``, ``theta_l s W_l + (1 - theta_l) s``. Then
  ``dropout(h)`` and the node output ``[x || h]`` (300).
* Classifier: per utterance, the node outputs of the modalities concatenated in the order a, v, l (900) ->
  dropout -> ReLU -> ``Linear(900, C)`` -> ``log_softmax``.
* Loss: ``loss="nll"``: NLL with optional class weights (``class_weights="iemocap"``: ``1 / frequency`` of the six
  IEMOCAP-ERC classes, the authors' IEMOCAP setting; ``F.nll_loss`` with weights is the weighted mean
  ``sum w_y (-log p_y) / sum w_y``, as ``nn.NLLLoss(weight)``). ``loss="focal"``: the authors' MELD loss reproduced
  literally (:func:`mmgcn_focal_loss`), which is *not* the focal loss of Lin et al.

Deviations from the authors' code (each for correctness; the first changes the model's output at full data too):

* The text BiLSTM runs on packed sequences, so each dialogue's context is exactly its own utterances; the authors
  run it over the zero-padded batch, so the backward direction of a shorter dialogue starts in the padding
  (``Linear(0) = bias`` rows), which makes a dialogue's encoding depend on the other dialogues of its batch (issue
  15's review: outputs differ by 3.6e-3 on unequal lengths). ``text_lstm_input="padded"`` (recipe
  ``mmgcn-authors``) reproduces theirs.
* A zero feature vector has a defined edge weight (the op's rule: cosine 0, weight 0.5, zero gradient) instead
  of the NaN the authors' ``x / ||x||`` produces.
* The authors re-seed every RNG with 27350 at the start of every training and evaluation pass, so every epoch
  sees the same dropout masks and data order; the trainer re-seeds per ``(seed, epoch)`` unless the recipe's
  ``reseed_each_pass`` says otherwise (``mmgcn-authors``: 27350).

Missing modalities (beyond the paper)
-------------------------------------
The batch carries the input as given (missing modalities already zeroed by
:func:`~mmer_ext.data.corrupt_dialogue_batch`) and ``missing_index`` ``[N, 3]``. What becomes of a missing
modality's nodes is ``missing_nodes``:

* ``"zero"`` (default): its nodes stay in the graph with zero feature vectors. The encoders would map a zero input
  to their biases (plus, for text, an LSTM response and the speaker embedding): a constant, confidently "present"
  looking vector with edge weights near 1 to every other missing node. A zero node instead falls under the op's
  zero-vector rule: cosine 0 with everything, so edge weight 0.5 - the weight of an *uninformative* (orthogonal)
  neighbour - and it contributes ``x = 0`` to its utterance's classifier input. The graph keeps its shape, so the
  full-data model needs no change.
* ``"input"``: plain zero-imputation at the input (the encoders' output of a zero input is used as is), the
  protocol the utterance-level baselines are evaluated under.
* ``"isolate"``: as ``"zero"``, and additionally every edge between a missing node and another node is removed
  before the normalisation (the missing node keeps its self-loop), so present nodes receive no message from
  missing ones; the degrees of the present nodes are those of the graph of present modalities only.

Training with missing modalities (a ``DialogueConditionView`` in ``"train"`` mode) works with each of them.
Measured once on synthetic dialogues (:func:`~mmer_ext.data.make_synthetic_dialogues`, dims 60 / 50 / 40, 120 / 31
dialogues, a 16-layer model trained 20 epochs on full data, test weighted F1 under the six conditions azz, zvz, zzl,
avz, azl, zvl): ``"zero"`` .33 .26 .57 .36 .61 .59 (mean .455), ``"isolate"`` the same to .003 (mean .454),
``"input"`` .19 .11 .57 .23 .61 .59 (mean .385); .62 with everything present. Zero nodes help most where the
lexical modality (the strong one, with its LSTM and speaker embedding responding to a zero input) is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from mmer_ext.corpora import IEMOCAP_ERC_CLASS_FREQUENCIES
from mmer_ext.models.base import DATA_ORDER, MERModel
from mmer_ext.ops import angular_adjacency, block_graph_propagate, gcnii_layer

__all__ = ["GCNIILayer", "IEMOCAP_ERC_CLASS_WEIGHTS", "MMGCN", "gcnii_theta", "mmgcn_focal_loss",
           "parse_modalities"]

#: MMGCN's IEMOCAP class weights, ``1 / frequency`` of happy, sad, neutral, angry, excited, frustrated (the authors' code, github.com/hujingwen6666/MMGCN).
IEMOCAP_ERC_CLASS_WEIGHTS: tuple[float, ...] = tuple(1.0 / f for f in IEMOCAP_ERC_CLASS_FREQUENCIES)
MISSING_NODE_MODES = ("zero", "input", "isolate")
DROPOUT_RNGS = ("philox", "uniform", "bernoulli")
_LETTER = {"a": "A", "v": "V", "l": "L", "t": "L"}


def parse_modalities(modalities: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical modality tuple (subset of ``("A", "V", "L")``, in that order) of a spec like ``"avl"``, ``"al"``,
    ``"t"`` (MMGCN's ``t`` for text is accepted as ``l``) or ``("A", "L")``."""
    letters = [str(c).lower() for c in (modalities if not isinstance(modalities, str) else list(modalities))]
    bad = [c for c in letters if c not in _LETTER]
    if bad or not letters:
        raise ValueError(f"modalities must be a non-empty subset of a, v, l (t = l), got {modalities!r}")
    chosen = {_LETTER[c] for c in letters}
    if len(chosen) != len(letters):
        raise ValueError(f"modalities {modalities!r} names a modality twice")
    return tuple(m for m in DATA_ORDER if m in chosen)


def gcnii_theta(lam: float, layer: int) -> float:
    """GCNII's identity-mapping strength of layer ``layer`` (1-based): ``ln(lam / layer + 1)``."""
    if layer < 1:
        raise ValueError("layers are numbered from 1")
    return math.log(lam / layer + 1.0)


def mmgcn_focal_loss(log_probs: Tensor, target: Tensor, gamma: float = 2.5, alpha: float = 1.0) -> Tensor:
    r"""The focal loss of MMGCN's code (MELD), reproduced literally.

    With ``p = log_softmax(log_probs)`` (idempotent on log-probabilities) and ``y`` the one-hot target,
    ``loss = mean_{n, c} -alpha (1 - y_{nc} p_{nc})^gamma p_{nc}``: the mean runs over all ``N x C`` entries and
    every class contributes ``-log p_c`` - for the target class scaled by ``(1 - log p_y)^gamma >= 1``, for the other
    classes with factor 1, i.e. it also *rewards* probability mass on wrong classes. This is what produced the
    published MELD numbers, so it is kept; it is not Lin et al.'s ``-(1 - p_y)^gamma log p_y``.
    """
    logp = F.log_softmax(log_probs, dim=-1)
    onehot = F.one_hot(target, logp.shape[-1]).to(logp.dtype)
    return (-alpha * (1.0 - onehot * logp).pow(gamma) * logp).mean()


class GCNIILayer(nn.Module):
    """One GCNII layer with a fixed ``theta`` (see the module docstring); ``forward(hi, h0)`` with ``hi = A h``.

    ``variant=True`` (MMGCN): ``theta [hi || h0] W + (1 - theta)((1 - alpha) hi + alpha h0)``, ``W`` ``[2F, F]``;
    ``variant=False``: ``s = (1 - alpha) hi + alpha h0``, ``theta s W + (1 - theta) s``, ``W`` ``[F, F]``.
    ``W`` has no bias and is initialised ``U(-1/sqrt(F), 1/sqrt(F))`` as in GCNII.
    """

    def __init__(self, features: int, theta: float, alpha: float, variant: bool = True) -> None:
        super().__init__()
        self.theta, self.alpha, self.variant = float(theta), float(alpha), bool(variant)
        self.weight = nn.Parameter(torch.empty(2 * features if variant else features, features))
        bound = 1.0 / math.sqrt(features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, hi: Tensor, h0: Tensor) -> Tensor:
        # Same arithmetic as the formula, in fewer passes over memory (64 layers of it make up most of a step):
        # lerp = (1 - alpha) hi + alpha h0, and [hi || h0] W = hi W[:F] + h0 W[F:] without building the concat.
        mix = torch.lerp(hi, h0, self.alpha)
        if not self.variant:
            return torch.addmm(mix, mix, self.weight, beta=1.0 - self.theta, alpha=self.theta)
        f = hi.shape[-1]
        out = torch.addmm(mix, hi, self.weight[:f], beta=1.0 - self.theta, alpha=self.theta)
        return torch.addmm(out, h0, self.weight[f:], alpha=self.theta)

    def extra_repr(self) -> str:
        return f"theta={self.theta:.5f}, alpha={self.alpha}, variant={self.variant}"


class MMGCN(MERModel):
    """MMGCN over a dialogue batch of :func:`~mmer_ext.data.collate_dialogues` (see the module docstring).

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Utterance feature sizes (read from the data: IEMOCAP-ERC 1582 / 342 / 100, MELD 300 / 342 / 600).
    num_classes : int
    num_speakers : int
        Size of the speaker embedding (``DialogueDataset.num_speakers``: 2 for IEMOCAP, 9 for MELD).
    teacher : None
        Accepted for the common constructor signature; unused.
    modalities : str
        Subset of ``"avl"`` (``t`` = ``l``): ``a``, ``v``, ``l``, ``al``, ``vl``, ``av``, ``avl``.
    hidden : int
        Encoder output / node feature size (200).
    gcn_hidden : int
        GCNII width (100).
    num_layers : int
        GCNII depth (64, hard-coded in the authors' code; the ``--Deep_GCN_nlayers`` flag only renames runs).
    lam, alpha : float
        GCNII ``lambda`` (0.5) and ``alpha`` (0.1).
    variant : bool
        GCNII variant (residual concat ``[hi || h0]``), True as MMGCN.
    dropout : float
        Every dropout of the model and of the LSTM between its layers (0.4 on IEMOCAP).
    use_speaker : bool
        Add the speaker embedding to the lexical nodes (only when ``l`` is among the modalities).
    window : int, optional
        Intra-modality edges only between utterances at most ``window`` apart (None: all pairs, MMGCN).
    scale : float
        The ``0.99999`` inside the arccos.
    class_weights : None, "iemocap" or sequence of float
        NLL class weights (``"iemocap"`` needs 6 classes).
    loss : {"nll", "focal"}
    focal_gamma, focal_alpha : float
        Of :func:`mmgcn_focal_loss` (2.5, 1).
    missing_nodes : {"zero", "input", "isolate"}
        Treatment of a missing modality's nodes (module docstring).
    graph_layout : {"blocks", "dense"}
        How the adjacency is stored and applied; ``"dense"`` builds the ``[M N, M N]`` matrix (for checks and small
        batches), same result.
    text_lstm_input : {"packed", "padded"}
        "packed" (default): each dialogue's own utterances. "padded": the authors' zero-padded batch, padding rows
        ``Linear(0) = bias`` (module docstring).
    propagation : {"modal", "full"}
        How the block layout is applied per layer (module docstring); same maths.
    dropout_rng : {"philox", "uniform", "bernoulli"}
        Where dropout masks come from (module docstring); different masks for the same seed. "philox" also runs
        each GCNII layer as one fused op.
    """

    clip_grad_norm = None
    # Runs saved before "philox" became the default drew "uniform" masks: they resume with that stream.
    legacy_defaults = {"dropout_rng": "uniform"}

    def __init__(
        self,
        dims,
        num_classes: int,
        *,
        num_speakers: int,
        teacher=None,
        modalities: str | Sequence[str] = "avl",
        hidden: int = 200,
        gcn_hidden: int = 100,
        num_layers: int = 64,
        lam: float = 0.5,
        alpha: float = 0.1,
        variant: bool = True,
        dropout: float = 0.4,
        use_speaker: bool = True,
        window: int | None = None,
        scale: float = 0.99999,
        class_weights: None | str | Sequence[float] = None,
        loss: str = "nll",
        focal_gamma: float = 2.5,
        focal_alpha: float = 1.0,
        missing_nodes: str = "zero",
        graph_layout: str = "blocks",
        text_lstm_input: str = "packed",
        propagation: str = "modal",
        dropout_rng: str = "philox",
    ) -> None:
        super().__init__()
        del teacher
        dims = tuple(int(d) for d in dims)
        if len(dims) != 3:
            raise ValueError(f"dims must give the A, V, L feature sizes, got {dims}")
        self.dims = dims
        self.num_classes = int(num_classes)
        self.num_speakers = int(num_speakers)
        if self.num_classes < 2 or self.num_speakers < 1:
            raise ValueError("num_classes must be >= 2 and num_speakers >= 1")
        self.modalities = parse_modalities(modalities)
        self.hidden, self.gcn_hidden, self.num_layers = int(hidden), int(gcn_hidden), int(num_layers)
        if hidden % 2:
            raise ValueError("hidden must be even (the bidirectional LSTM has hidden // 2 units per direction)")
        if num_layers < 0:
            raise ValueError("num_layers must be >= 0")
        if loss not in ("nll", "focal"):
            raise ValueError(f"loss must be 'nll' or 'focal', got {loss!r}")
        if missing_nodes not in MISSING_NODE_MODES:
            raise ValueError(f"missing_nodes must be one of {MISSING_NODE_MODES}, got {missing_nodes!r}")
        if graph_layout not in ("blocks", "dense"):
            raise ValueError(f"graph_layout must be 'blocks' or 'dense', got {graph_layout!r}")
        if text_lstm_input not in ("packed", "padded"):
            raise ValueError(f"text_lstm_input must be 'packed' or 'padded', got {text_lstm_input!r}")
        self.text_lstm_input = text_lstm_input
        if propagation not in ("modal", "full"):
            raise ValueError(f"propagation must be 'modal' or 'full', got {propagation!r}")
        if dropout_rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout_rng must be one of {DROPOUT_RNGS}, got {dropout_rng!r}")
        self.propagation, self.dropout_rng = propagation, dropout_rng
        if window is not None and int(window) < 0:
            raise ValueError("window must be None or >= 0")
        self.dropout = float(dropout)
        self.window = None if window is None else int(window)
        self.scale = float(scale)
        self.loss_kind, self.focal_gamma, self.focal_alpha = loss, float(focal_gamma), float(focal_alpha)
        self.missing_nodes, self.graph_layout = missing_nodes, graph_layout

        self.proj = nn.ModuleDict({m: nn.Linear(dims[DATA_ORDER.index(m)], hidden) for m in self.modalities})
        self.text_lstm = None
        self.speaker_embedding = None
        if "L" in self.modalities:
            self.text_lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True,
                                     dropout=self.dropout)
            if use_speaker:
                self.speaker_embedding = nn.Embedding(self.num_speakers, hidden)
        self.fc0 = nn.Linear(hidden, gcn_hidden)
        self.layers = nn.ModuleList(
            GCNIILayer(gcn_hidden, gcnii_theta(lam, k + 1), alpha, variant) for k in range(num_layers))
        self.node_dim = hidden + gcn_hidden
        self.utterance_dim = self.node_dim * len(self.modalities)
        self.classifier = nn.Linear(self.utterance_dim, self.num_classes)

        weights = None
        if isinstance(class_weights, str):
            if class_weights != "iemocap":
                raise ValueError(f"class_weights must be None, 'iemocap' or a sequence, got {class_weights!r}")
            if self.num_classes != len(IEMOCAP_ERC_CLASS_WEIGHTS):
                raise ValueError(f"class_weights='iemocap' holds 6 IEMOCAP-ERC weights, the model has "
                                 f"{self.num_classes} classes")
            weights = torch.tensor(IEMOCAP_ERC_CLASS_WEIGHTS, dtype=torch.float32)
        elif class_weights is not None:
            weights = torch.as_tensor([float(w) for w in class_weights], dtype=torch.float32)
            if weights.numel() != self.num_classes or bool((weights < 0).any()):
                raise ValueError(f"class_weights must be {self.num_classes} non-negative numbers")
        self.register_buffer("class_weights", weights)

    @property
    def thetas(self) -> list[float]:
        """``theta_l`` of each GCNII layer, ``l = 1..num_layers``."""
        return [layer.theta for layer in self.layers]

    # ------------------------------------------------------------------ pieces
    def _presence(self, batch: Mapping[str, Tensor], n: int, device) -> Tensor | None:
        """``[M, N]`` presence of the model's modalities, or None when the batch says nothing is missing."""
        mi = batch.get("missing_index")
        if mi is None:
            return None
        cols = [DATA_ORDER.index(m) for m in self.modalities]
        return mi[:, cols].to(device=device).T.bool()

    def node_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Encoded node features ``[M, N, hidden]`` (modalities in a, v, l order), the GCN input; with
        ``missing_nodes`` ``"zero"`` / ``"isolate"`` the nodes of missing modalities are zero vectors."""
        lengths = batch["lengths"]
        feats = []
        for m in self.modalities:
            h = self.proj[m](batch[m])
            if m == "L":
                h = self._context(h, lengths)
                if self.speaker_embedding is not None:
                    speaker = batch["speaker"].to(h.device)
                    if speaker.numel() and int(speaker.max()) >= self.num_speakers:
                        raise ValueError(f"speaker id {int(speaker.max())} >= num_speakers={self.num_speakers}")
                    h = h + self.speaker_embedding(speaker)
            feats.append(h)
        nodes = torch.stack(feats)
        if self.missing_nodes != "input":
            present = self._presence(batch, nodes.shape[1], nodes.device)
            if present is not None:
                nodes = nodes * present.unsqueeze(-1).to(nodes.dtype)
        return nodes

    def _context(self, h: Tensor, lengths: Tensor) -> Tensor:
        """The 2-layer BiLSTM over each dialogue (packed, or the authors' padded batch), back in the concatenated
        utterance order."""
        lens = lengths.detach().to("cpu", torch.int64)
        if self.text_lstm_input == "padded":
            return self._padded_context(h, lens)
        packed = pack_sequence(list(torch.split(h, lens.tolist())), enforce_sorted=False)
        out, _ = self.text_lstm(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True)  # [G, Lmax, hidden], dialogues in input order
        valid = torch.arange(padded.shape[1])[None, :] < lens[:, None]
        return padded[valid.to(padded.device)]

    def _padded_context(self, h: Tensor, lens: Tensor) -> Tensor:
        # The authors project the zero-padded [G, Lmax, D] input, so a padding row is Linear(0) = the bias.
        g, lmax = lens.numel(), int(lens.max()) if lens.numel() else 0
        valid = (torch.arange(lmax)[None, :] < lens[:, None]).to(h.device)
        bias = self.proj["L"].bias
        pad_row = bias if bias is not None else h.new_zeros(h.shape[-1])
        padded = pad_row.to(h.dtype).expand(g, lmax, h.shape[-1]).masked_scatter(valid.unsqueeze(-1), h)
        out, _ = self.text_lstm(padded)
        return out[valid]

    def adjacency(self, nodes: Tensor, lengths: Tensor, present: Tensor | None = None,
                  layout: str | None = None) -> Tensor:
        """The normalised graph of ``nodes`` ``[M, N, hidden]`` in ``layout`` (default ``graph_layout``);
        ``present`` ``[M, N]`` is only used by ``missing_nodes="isolate"``."""
        layout = layout or self.graph_layout
        isolate = self.missing_nodes == "isolate" and present is not None
        adj = angular_adjacency(nodes, lengths, scale=self.scale, normalize=not isolate, window=self.window,
                                layout=layout)
        if isolate:
            adj = _isolate_and_normalize(adj, present, lengths, layout)
        return adj

    def _propagate(self, adj: Tensor, h: Tensor, lengths: Tensor, num_modalities: int) -> Tensor:
        return block_graph_propagate(adj, h, lengths, num_modalities) if adj.dim() == 3 else adj @ h

    def _propagator(self, adj: Tensor, lengths: Tensor, m: int):
        """``h -> A h`` for the layer loop. ``propagation="modal"`` splits the block layout once per forward into
        what MMGCN's graph holds: the ``M`` intra-modality ``L x L`` blocks of each dialogue and the cross-modality
        edges, which only join the same utterance (diagonal sub-blocks). Each layer then costs ``M`` GEMMs per
        dialogue instead of ``M^2`` (and so does the adjacency gradient); same maths, only the structural zeros of
        the off-diagonal sub-blocks are skipped."""
        if adj.dim() != 3 or self.propagation == "full" or m == 1:
            return lambda h: self._propagate(adj, h, lengths, m)
        g, s, _ = adj.shape
        lmax = s // m
        b = adj.view(g, m, lmax, m, lmax)
        # [M, G, Lmax, Lmax] -> M * G single-modality "dialogues" whose node order is x's (modality-major).
        intra = torch.diagonal(b, dim1=1, dim2=3).permute(3, 0, 1, 2).reshape(m * g, lmax, lmax)
        lengths_rep = lengths.repeat(m)
        off = 1.0 - torch.eye(m, dtype=adj.dtype, device=adj.device)
        valid = (torch.arange(lmax, device=adj.device)[None, :]
                 < lengths.to(device=adj.device, dtype=torch.int64)[:, None])
        # cross[k, a, b]: weight of the edge from utterance k's node in modality b to its node in modality a (zero
        # diagonal: the self-loop is in the intra block).
        cross = (torch.diagonal(b, dim1=2, dim2=4) * off[None, :, :, None]).permute(0, 3, 1, 2)[valid]

        def propagate(h: Tensor) -> Tensor:
            f = h.shape[-1]
            out = block_graph_propagate(intra, h, lengths_rep, 1).view(m, -1, f)
            # All cross-modality edges as one batched product of each utterance's [M, M] weights with its [M, F]
            # node features: per-pair products cost an element-wise pass (and two in the backward) per ordered pair.
            return (out + torch.bmm(cross, h.view(m, -1, f).transpose(0, 1)).transpose(0, 1)).view(-1, f)

        return propagate

    def _dropout(self, x: Tensor) -> Tensor:
        """Inverted dropout (outside the fused GCNII layers). ``dropout_rng="uniform"`` and ``"philox"`` keep
        ``u >= p`` of a ``torch.rand_like`` draw (the global generator, so seeding works as before): the same
        keep-probability as ``F.dropout`` in about a quarter of its CPU time, forward and backward (``bernoulli_`` is
        the slow part), but a different stream of masks; ``"bernoulli"`` is ``F.dropout``."""
        if not self.training or self.dropout == 0.0 or self.dropout_rng == "bernoulli":
            return F.dropout(x, self.dropout, self.training)
        if self.dropout >= 1.0:
            return x * 0.0
        # The mask is built in place in the uniform draw (two cheap passes) and is all the backward keeps.
        return x * torch.rand_like(x).ge_(self.dropout).mul_(1.0 / (1.0 - self.dropout))

    def node_outputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """GCN node outputs ``[M, N, hidden + gcn_hidden]`` (``[dropout(x) || h]``)."""
        lengths = batch["lengths"]
        nodes = self.node_features(batch)
        m, n, _ = nodes.shape
        present = self._presence(batch, n, nodes.device) if self.missing_nodes == "isolate" else None
        adj = self.adjacency(nodes, lengths, present)
        propagate = self._propagator(adj, lengths, m)
        x = self._dropout(nodes.reshape(m * n, -1))
        h0 = F.relu(self.fc0(x))
        h = self._dropout(h0)
        if self.dropout_rng == "philox" and self.layers and self.layers[0].variant and self.dropout < 1.0:
            # Layer l's output dropout is layer l + 1's input dropout (and the last one's is the final dropout).
            p = self.dropout if self.training else 0.0
            for layer in self.layers:
                h = gcnii_layer(propagate(h), h0, layer.weight, layer.theta, layer.alpha, p)
        else:
            for i, layer in enumerate(self.layers):
                h = F.relu(layer(propagate(h if i == 0 else self._dropout(h)), h0))
            if self.layers:
                h = self._dropout(h)
        return torch.cat([x, h], -1).reshape(m, n, -1)

    def utterance_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[N, M * (hidden + gcn_hidden)]``: each utterance's node outputs, concatenated a, v, l (900)."""
        out = self.node_outputs(batch)
        return out.permute(1, 0, 2).reshape(out.shape[1], -1)

    # ------------------------------------------------------------------ MERModel interface
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Log-probabilities ``[N_total, C]``, one row per utterance of the batch (dialogues in order)."""
        z = F.relu(self._dropout(self.utterance_features(batch)))
        return F.log_softmax(self.classifier(z), dim=-1)

    def loss_from_log_probs(self, log_probs: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.loss_kind == "focal":
            loss = mmgcn_focal_loss(log_probs, target, self.focal_gamma, self.focal_alpha)
            return loss, {"focal": loss.detach()}
        loss = F.nll_loss(log_probs, target, weight=self.class_weights)
        return loss, {"nll": loss.detach()}

    def training_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_from_log_probs(self(batch), batch["label"])


def _slot_nodes(lengths: Tensor, m: int, n: int, device) -> tuple[Tensor, Tensor]:
    """``(node [G, M * Lmax], valid [G, M * Lmax])``: the global node (``mod * N + utterance``) of every slot of
    the block layout, and which slots are real."""
    lengths = lengths.to(device=device, dtype=torch.int64)
    l_max = int(lengths.max())
    pos = torch.arange(l_max, device=device)
    valid = pos[None, :] < lengths[:, None]
    utt = (torch.cumsum(lengths, 0) - lengths)[:, None] + pos[None, :]
    node = torch.arange(m, device=device)[None, :, None] * n + utt[:, None, :]
    valid = valid[:, None, :].expand(-1, m, -1)
    return torch.where(valid, node, 0).reshape(lengths.numel(), -1), valid.reshape(lengths.numel(), -1)


def _isolate_and_normalize(adj: Tensor, present: Tensor, lengths: Tensor, layout: str) -> Tensor:
    """Cut every edge that touches a missing node (self-loops stay), then ``D^-1/2 A D^-1/2``."""
    m, n = present.shape
    flat = present.reshape(-1)
    if layout == "dense":
        keep = (flat[:, None] & flat[None, :]) | torch.eye(m * n, dtype=torch.bool, device=adj.device)
        adj = adj * keep.to(adj.dtype)
        d = adj.sum(-1).clamp_min(torch.finfo(adj.dtype).tiny).rsqrt()
        return adj * d[:, None] * d[None, :]
    node, valid = _slot_nodes(lengths, m, n, adj.device)
    p = flat[node] & valid  # [G, S]
    eye = torch.eye(adj.shape[-1], dtype=torch.bool, device=adj.device)
    keep = (p[:, :, None] & p[:, None, :]) | (eye & valid[:, :, None])
    adj = adj * keep.to(adj.dtype)
    deg = adj.sum(-1)
    d = torch.where(valid, deg.clamp_min(torch.finfo(adj.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    return adj * d[:, :, None] * d[:, None, :]
