"""DeepSpeed through `kdcompose train` on a machine without GPUs (docs/engines.md).

Real DeepSpeed, real ms-swift, the tiny Qwen2-VL pair, three optimizer steps each:

- config checks: `deepspeed` with `use_cpu: true` is refused before any model loads (exit 2,
  naming `training.use_cpu`);
- `prepare_engine`: the one-process launcher variables (free port) and nothing without DeepSpeed;
- `gathered_lm_head` / `call_through_head` under a real ZeRO-3 engine (one process, gloo): the
  fused JSD's value and gradients equal the unsharded reference (a bare gather around the loss is
  not enough for a trainable head: docs/engines.md);
- runs: ZeRO-2 / ZeRO-3 on NPROC_PER_NODE=2 (batch 2 per rank) == one process without DeepSpeed
  that sees the same 4 samples a step as 2 micro-batches of 2: per-step loss and per-term metrics
  within 1e-4 (measured: identical to every logged digit, as DDP on 2 ranks is; DDP's own 2-rank
  run is checked against one process in tests/swift/test_preemption.py).
  Composition: fused lm_jsd (the loss runs as the LM head's forward, so ZeRO-3 gathers the head
  for it), a fused top-8 lm_jsd, a fused lm_kd (skew_rkl), ce, visual_kd on the aligner and
  hidden_kd on a decoder layer,
  both through trainable linear projectors (part of the student: optimized, and sharded under
  ZeRO-3), and a term that goes NaN at step 1 with `on_nonfinite: skip_step`: every run skips
  that update the same way (weights and optimizer state kept, LR schedule advanced).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from swift_support import kdcompose_command, run_command, sections, step_logs, train_as_user, write_config
from torch import nn

from kdcompose.training import engines

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]
deepspeed = pytest.importorskip("deepspeed")

STEPS = 3
SKIPPED = 1
"""The global_step whose update every run skips (`on_nonfinite: skip_step`)."""
LAYER_S, LAYER_T = "model.language_model.layers.1", "model.language_model.layers.2"
LOSS_TERMS = {
    "lm_jsd": {"fused": True},
    "lm_topk": {"type": "lm_jsd", "weight": 0.2, "topk": 8, "fused": True},
    "kd_skew": {"type": "lm_kd", "divergence": "skew_rkl", "weight": 0.2, "fused": True},
    "ce": {"weight": 0.3},
    "visual_kd": {"weight": 0.5, "aligner": {"distance": "mse", "projector": "linear"}},
    "hidden_kd": {"weight": 0.5, "pairs": [{"student": LAYER_S, "teacher": LAYER_T, "projector": "linear"}]},
    # NaN in the value only at one step: the gradients stay finite, so DeepSpeed's own overflow
    # check cannot see it and only kdcompose's verdict (taken before the engine steps) skips it.
    "nan": {"type": "nan_probe", "kind": "nan_value", "at_steps": [SKIPPED], "on_nonfinite": "skip_step"},
}
KEYS = ("loss", "llm_kd_loss", "lm_topk_loss", "kd_skew_loss", "sft_loss", "vision_kd_loss", "hidden_kd_loss")
PROBE_PLUGIN = str(Path(__file__).parents[1] / "support" / "nan_probe_plugin.py")


def _config(tmp_path: Path, name: str, **overrides) -> tuple[Path, Path]:
    out = tmp_path / name
    data = sections(
        out,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        seed=42,
        logging_steps=1,
        rlhf={"loss_terms": LOSS_TERMS},
        freeze_vit=False,
        freeze_aligner=False,
        **overrides,
    )
    data = {"plugins": [PROBE_PLUGIN], **data}
    return write_config(tmp_path / f"{name}.yaml", data), out


def _train(tmp_path: Path, name: str, nproc: int | None = None, **overrides) -> list[dict]:
    config, out = _config(tmp_path, name, **overrides)
    result = train_as_user(config, tmp_path, nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return step_logs(out)


def _assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == STEPS
    for row_a, row_b in zip(a, b, strict=True):
        for key in KEYS:
            assert row_a[key] == pytest.approx(row_b[key], abs=1e-4), (key, row_a, row_b)
        # the schedule advanced over the skipped step as it does without DeepSpeed
        rates = ([r["learning_rate"] for r in a], [r["learning_rate"] for r in b])
        assert row_a["learning_rate"] == pytest.approx(row_b["learning_rate"], rel=1e-6), rates
    for rows in (a, b):  # the skip happened, once, in both runs (logged from the skipped step on)
        assert [row["nonfinite_skipped_steps"] for row in rows] == [0, 1, 1], rows


# ------------------------------------------------------------------------------- config, env


@pytest.mark.swift
def test_deepspeed_with_use_cpu_is_refused(tmp_path):
    config, _ = _config(tmp_path, "refused", deepspeed="zero2", use_cpu=True)
    result = run_command(kdcompose_command("train", str(config)), tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training.use_cpu" in result.stderr and "deepspeed" in result.stderr


@pytest.mark.swift
def test_skip_step_without_zero_is_refused_naming_the_term(tmp_path):
    """ZeRO stage 0 has no overflow-skip path: refused by the preflight, before any model loads."""
    config, out = _config(tmp_path, "zero0", deepspeed="zero0")
    result = run_command(kdcompose_command("train", str(config)), tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rlhf.loss_terms.nan.on_nonfinite" in result.stderr and "ZeRO stage 1, 2 or 3" in result.stderr
    assert "Traceback" not in result.stderr and not list(out.glob("**/logging.jsonl"))  # no model loaded


def test_engine_issues_only_for_deepspeed():
    assert engines.engine_issues({"use_cpu": True}, {}) == []
    issues = engines.engine_issues({"deepspeed": "zero3", "use_cpu": "true"}, {"use_cpu": "training.use_cpu"})
    assert [i.path for i in issues] == ["training.use_cpu"]


def test_single_process_env(monkeypatch):
    for key in engines.SINGLE_PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    env = engines.single_process_env()
    assert env["RANK"] == env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert 0 < int(env["MASTER_PORT"]) < 65536
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: the launcher's values stand
    assert engines.single_process_env() == {}


def test_prepare_engine_is_a_no_op_without_deepspeed(monkeypatch):
    for key in engines.SINGLE_PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    kwargs = {"use_cpu": True}
    assert engines.prepare_engine(kwargs) is kwargs
    assert "RANK" not in os.environ


# ------------------------------------------------------------------------------- ZeRO-3 LM head

# Runs in a child process: a DeepSpeed engine initialises a process group and the launcher variables
# for its world of one, which must not leak into this test session (later tests start their own).
ZERO3_CHECK = r"""
import copy, os, sys
import deepspeed, torch
from torch import nn
from deepspeed.utils import safe_get_full_grad
from kdcompose.functional import fused_linear_generalized_jsd
from kdcompose.training import engines

V, H, T = 50, 8, 6

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=True)
    def forward(self, x):
        return self.body(x)
    def get_output_embeddings(self):
        return self.head

def fused(head, hidden, teacher_hidden, teacher_weight, labels):
    return fused_linear_generalized_jsd(
        hidden, head.weight, teacher_hidden, teacher_weight, labels, student_bias=head.bias, chunk_size=2
    )

os.environ.update(engines.single_process_env())
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = Tiny()
reference = copy.deepcopy(model)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
g = torch.Generator().manual_seed(3)
x, th, tw = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
labels = torch.tensor([1, -100, 3, 4, 5, 6])
expected = fused(reference.head, reference(x), th, tw, labels)
expected.backward()
head = engine.module.head
assert engines.is_sharded(head) and head.weight.numel() == 0, "partitioned outside a forward"
with engines.gathered_lm_head(engine.module) as gathered:
    assert gathered.weight.shape == (V, H), "the full weight inside the block"
loss = engines.call_through_head(head, lambda h, hidden: fused(h, hidden, th, tw, labels), engine(x))
engine.backward(loss)
assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item()), (loss.item(), expected.item())
for name, param in engine.module.named_parameters():
    torch.testing.assert_close(safe_get_full_grad(param), dict(reference.named_parameters())[name].grad)
print("ZERO3-OK")
"""


def test_gathered_lm_head_is_a_no_op_unsharded():
    model = nn.Sequential()
    model.weight = nn.Parameter(torch.zeros(3, 2))
    with engines.gathered_lm_head(model) as head:
        assert head is model
    assert not engines.is_sharded(model)


@pytest.mark.swift
def test_zero3_fused_jsd_through_the_head_matches_reference(tmp_path):
    """A real ZeRO-3 engine (one process, gloo): the head is partitioned outside a forward, gathered
    inside `gathered_lm_head`, and the fused JSD run through `call_through_head` gives the loss and
    every (full) gradient of the unsharded model."""
    import subprocess

    import forked_cli

    env = {k: v for k, v in os.environ.items() if k not in engines.SINGLE_PROCESS_ENV}
    python, env = forked_cli.python(env)  # a process of its own, forked: tests/support/forked_cli.py
    result = subprocess.run(
        [python, "-c", ZERO3_CHECK], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0 and "ZERO3-OK" in result.stdout, result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """No DeepSpeed, one process, 2 micro-batches of 2 per step: the 4 samples 2 ranks see."""
    tmp = tmp_path_factory.mktemp("one")
    return _train(tmp, "one", gradient_accumulation_steps=2)


@pytest.mark.swift
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_ranks_equal_one_process(tmp_path, one_process, stage):
    """Under ZeRO-3 the teacher is partitioned too (`teacher_deepspeed`): the fused loss reads the
    teacher's head as its forward saw it gathered (a copy: ZeRO-3 frees the gathered storage)."""
    teacher = {"teacher_deepspeed": "zero3"} if stage == "zero3" else {}
    _assert_same_steps(_train(tmp_path, stage, nproc=2, deepspeed=stage, **teacher), one_process)
