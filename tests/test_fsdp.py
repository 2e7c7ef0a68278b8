"""apply_lsce and lsce.linear_cross_entropy under FSDP2 (``fully_shard``), on real gloo groups.

A tiny Llama is trained for three SGD (momentum) steps on 2 CPU ranks (and on
4, under the wrappings of ``WRAPPINGS_4``), each rank on a batch of its own, under each wrapping: the LM head an FSDP2 unit of its own
(``fully_shard(model.lm_head)`` before the root, as torchtitan shards its
output layer), the head in the root unit, tied input and output embeddings,
the decoder layers under activation checkpointing, ``torch.compile`` of the
model (backend aot_eager: Dynamo and AOT autograd, without Inductor's C++
build), the fused loss called directly (``lsce.linear_cross_entropy`` inside
``lsce.integrations.fsdp.unsharded``), and mixed precision
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). Each fp32 run
is compared with the same model unsharded in one process, trained on the mean
of the ranks' losses (what FSDP2's gradient averaging computes): the losses
of every step and every parameter after the last step. The bf16 run is
compared with the fp32 truth against PyTorch's own loss under the same
FSDP2 bf16 setup (``F.cross_entropy`` on the materialised logits).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from test_distributed import GLOO_TIMEOUT_S, _spawn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

STEPS = 3
EPS = 0.1
WRAPPINGS = ("head own unit", "head in root", "tied", "checkpointing", "compile", "direct call", "bf16",
             "bf16 torch")
# On 4 ranks, the wrappings whose sharding of the head differs (its own unit, the root's, tied to the
# embedding, gathered around a direct call): each rank's shard of the 61×32 head is then 15-16 rows.
# The others (checkpointing, compile, bf16) do not depend on the rank count and stay on 2 ranks, for CI time.
WRAPPINGS_4 = ("head own unit", "tied", "direct call")


def _wrappings(world):
    return WRAPPINGS if world == 2 else WRAPPINGS_4


def _model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _batches(rank):
    """Each rank's (input_ids, labels) for each step; some labels ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 61, (2, 9), generator=g)
        labels = ids.clone()
        labels[0, :2] = -100
        out.append((ids, labels))
    return out


def _torch_loss(model, ids, labels):
    """PyTorch's label-smoothed causal-LM loss of the model's logits (what apply_lsce replaces)."""
    logits = model(input_ids=ids).logits.float()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), label_smoothing=EPS)


def _train(model, batches, loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)  # linear in the gradients: no sign flips of near-zero ones
    losses = []
    for step in range(STEPS):
        loss = loss_of(model, step, batches)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    return losses


def _unsharded(tied, world):
    """The reference: one process, the mean of every rank's loss per step; its losses per rank and parameters."""
    from lsce.integrations.transformers import apply_lsce

    model = apply_lsce(_model(tied), label_smoothing=EPS)
    batches = [_batches(r) for r in range(world)]
    per_rank = []

    def loss_of(model, step, _):
        losses = [model(input_ids=b[step][0], labels=b[step][1]).loss for b in batches]
        per_rank.append(torch.stack(losses).detach())
        return sum(losses) / world

    _train(model, None, loss_of)
    return torch.stack(per_rank), {k: v.detach().clone() for k, v in model.state_dict().items()}


class _FusedLoss(torch.nn.Module):
    """The model's decoder, then lsce.linear_cross_entropy on its LM head (an
    FSDP2 unit of its own), gathered by lsce.integrations.fsdp.unsharded."""

    def __init__(self, model, loss, unsharded):
        super().__init__()
        self.model, self.loss, self.unsharded = model, loss, unsharded

    def forward(self, input_ids, labels):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model.model(input_ids=input_ids).last_hidden_state
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        head = self.model.lm_head
        with self.unsharded(head):
            loss = self.loss(hidden, head.weight, shifted, label_smoothing=EPS)
        return CausalLMOutputWithPast(loss=loss)


def _sharded(wrapping, rank):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import lsce
    from lsce.integrations.fsdp import unsharded
    from lsce.integrations.transformers import apply_lsce

    model = _model(tied=wrapping == "tied")
    if not wrapping.endswith("torch") and wrapping != "direct call":
        apply_lsce(model, label_smoothing=EPS)
    if wrapping == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw = {}
    if wrapping.startswith("bf16"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if wrapping not in ("head in root", "tied"):
        fully_shard(model.lm_head, **kw)
    if wrapping == "direct call":  # a training module of one's own: the decoder, then the fused loss
        model = _FusedLoss(model, lsce.linear_cross_entropy, unsharded)
    fully_shard(model, **kw)
    run = torch.compile(model, backend="aot_eager") if wrapping.startswith("compile") else model

    def loss_of(model, step, batches):
        ids, labels = batches[step]
        if wrapping.endswith("torch"):
            return _torch_loss(run, ids, labels)
        return run(input_ids=ids, labels=labels).loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, _batches(rank), loss_of)
    fused_warnings = [str(w.message) for w in caught if "not fused" in str(w.message)]
    inner = model.model if wrapping == "direct call" else model
    state = {k: v.full_tensor().detach().float().clone() for k, v in inner.state_dict().items()}
    return dict(losses=torch.stack(losses), state=state, warnings=fused_warnings)


def _worker(rank, world, port, out_dir):
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    results = {}
    for wrapping in _wrappings(world):
        try:
            results[wrapping] = _sharded(wrapping, rank)
        except Exception as e:  # reported by the parent with the wrapping's name
            import traceback

            results[wrapping] = dict(error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _runs(world, tmp_path_factory):
    """On ``world`` ranks: each rank's results, and the unsharded references (tied or not)."""
    results = _spawn(world, tmp_path_factory.mktemp(f"fsdp{world}"), module="test_fsdp", deadline_s=400)
    return results, {tied: _unsharded(tied, world) for tied in (False, True)}


@pytest.fixture(scope="module")
def runs2(tmp_path_factory):
    return _runs(2, tmp_path_factory)


@pytest.fixture(scope="module")
def runs4(tmp_path_factory):
    return _runs(4, tmp_path_factory)


@pytest.mark.parametrize("world, wrapping", [(2, w) for w in WRAPPINGS if not w.startswith("bf16")]
                         + [(4, w) for w in WRAPPINGS_4])
def test_fsdp2_equals_unsharded(request, world, wrapping):
    runs, references = request.getfixturevalue(f"runs{world}")  # one run of the workers per world
    losses, state = references[wrapping == "tied"]
    assert len(runs) == losses.shape[1]  # every rank reported
    for rank, res in enumerate(runs):
        got = res[wrapping]
        assert "error" not in got, got.get("error")
        assert not got["warnings"], f"the head was not fused: {got['warnings']}"
        torch.testing.assert_close(got["losses"], losses[:, rank], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{wrapping}, rank {rank} losses: {m}")
        for name, value in state.items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{wrapping}, rank {rank}, {name} after {STEPS} steps: {m}")


def test_fsdp2_bf16_no_worse_than_pytorch(runs2):
    """Mixed precision: the losses and the parameters after three steps no further
    from the fp32 unsharded run than PyTorch's own loss under the same policy (plus slack)."""
    runs, references = runs2
    losses, state = references[False]
    for rank, res in enumerate(runs):
        ours, theirs = res["bf16"], res["bf16 torch"]
        assert "error" not in ours and "error" not in theirs, (ours.get("error"), theirs.get("error"))
        assert not ours["warnings"]
        err = (ours["losses"] - losses[:, rank]).abs().max()
        their_err = (theirs["losses"] - losses[:, rank]).abs().max()
        assert err <= 2 * their_err + 2.0**-8 * losses.abs().max(), (err, their_err)
        for name, value in state.items():
            e = (ours["state"][name] - value).abs().max()
            t = (theirs["state"][name] - value).abs().max()
            assert e <= 2 * t + 2.0**-8 * value.abs().max(), f"{name}: {e} vs PyTorch's {t}"
