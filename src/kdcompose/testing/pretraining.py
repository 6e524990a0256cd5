"""Tiny models that know something: the demo's trained teacher and the student built from it.

Why: distillation only shows when the teacher knows what the student does not. `kdcompose demo`
starts from two checkpoints built here once and cached under ``$KDCOMPOSE_CACHE``
(``~/.cache/kdcompose``), keyed by their recipe (every number below, the task, the versions
that change the bytes), as the random tiny models and datasets are cached:

- **The teacher** (``teachers/``): the tiny Qwen2-VL teacher (text 96 wide, 3 layers; vision
  tower 2 blocks) trained to caption thousands of synthetic pictures (`caption_task`): it sees
  size, colour, shape, position and background.
- **The student** (``students/``), built from the teacher the way DistilBERT is built from BERT:
  its language model keeps two of the teacher's three layers (the first and the last) with the
  teacher's embeddings, head and aligner; its vision tower is new, one block instead of two, and
  random. It speaks the captions' language and reads picture tokens like the teacher, but it
  cannot see: that is what it has to learn, from a few labelled pictures, with or without the
  teacher. (A student built from scratch needs thousands of pictures before it sees anything
  at all, far more than a one-minute CPU demo can train.)

Why the teacher trains in a plain torch loop and not ms-swift's SFT: speed on two CPU cores.
Three things make the loop about an order of magnitude cheaper than a stock trainer without
changing what is learned:

- **An exact softmax over 579 rows instead of 151936.** The tiny tokenizer can produce only its
  553 BPE tokens and Qwen's 26 special tokens; the other ~151k ids exist only because ms-swift's
  templates hard-code Qwen's special-token ids. Their LM-head rows are set to zero before training
  and kept there, so each of their logits is exactly 0 and the full-vocabulary log-partition is
  ``logsumexp([live logits, log(#zero rows)])``: the loss is the real 151936-way cross-entropy,
  computed at the cost of a 579-way one. The saved checkpoint has those zero rows; its
  distribution over the full vocabulary is the one that was trained.
- **Only the live embedding rows are trained** (the others are never looked up, so their gradient
  is zero anyway): the optimizer state is 0.4 M numbers instead of 15 M.
- **Pixels encoded in one batched call** (`caption_task.TaskEncoder`), identical to the image
  processor's output; one thread (the operations are too small to split).

Two aids train the teacher and are not part of it; the order matters:

- An *attribute probe*: four learned attention queries pool the picture's vision tokens (the
  aligner's output) and linear layers predict size, colour, shape and background from the
  pooled vector; thrown away after training. Pooling by attention is what the language model
  itself can do with the tokens, so features the probe can read, the language model can too.
- *Vision first*: the vision tower, aligner and probe train alone on many pictures (cheap: no
  language model runs), then the whole model trains on captions with the probe still on.
  Trained on captions from the start, the tiny vision tower learns colours quickly but shapes
  barely at all within the budget: the language model at first averages the picture's tokens,
  which hides the few that hold the shape, so the shape words get no useful gradient.

Position has no probe: it is read from where a token sits (multimodal RoPE; the demo's tiny
models use a RoPE base of 10 so that a 3x3 grid of tokens is distinguishable), which the
language model learns itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kdcompose.testing._cache import atomic_build, cache_root, content_key, is_complete, read_manifest
from kdcompose.testing.caption_task import TaskEncoder, TaskSpec, model_inputs, task_samples
from kdcompose.testing.tiny_models import (
    TinySpec,
    _versions,
    build_config,
    save_greedy_model,
    spec_key,
    tiny_spec,
)
from kdcompose.testing.tokenizer import (
    COLORS,
    FIRST_SPECIAL_ID,
    QWEN_ADDED_TOKENS,
    SHAPES,
    SIZES,
    bpe_vocab_and_merges,
    tokenizer_fingerprint,
)

#: Bump when what the training writes changes, so caches rebuild.
PRETRAINING_FORMAT_VERSION = 1
TRAINING_FILE = "kdcompose_pretraining.json"
"""Written next to the weights: the recipe and what the training measured."""

PROBED: Mapping[str, Sequence[str]] = {"size": SIZES, "color": COLORS, "shape": SHAPES, "background": COLORS}
"""Attributes the training-only probe predicts from the pooled vision tokens (not position)."""
DEMO_MODEL: tuple[tuple[str, Any], ...] = (("rope_theta", 2.0),)
"""`tiny_spec` overrides of the demo's teacher and student (see `TinySpec.rope_theta`)."""


@dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the trained teacher (and thus its cache key)."""

    family: str = "qwen2_vl"
    model: tuple[tuple[str, Any], ...] = DEMO_MODEL
    """`tiny_spec` overrides, as (name, value) pairs."""
    task: TaskSpec = field(default_factory=TaskSpec)
    vision_samples: int = 14400
    """Pictures the vision tower, aligner and probe see first, alone."""
    vision_batch_size: int = 16
    vision_learning_rate: float = 5e-3
    samples: int = 8000
    """Captioned pictures the whole model then sees (each one new: drawn, not repeated)."""
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    probe_queries: int = 4
    probe_weight: float = 1.0
    data_seed: int = 1
    init_seed: int = 0

    @property
    def steps(self) -> int:
        return self.samples // self.batch_size

    @property
    def vision_steps(self) -> int:
        return self.vision_samples // self.vision_batch_size

    def spec(self) -> TinySpec:
        return tiny_spec(self.family, "teacher", seed=self.init_seed, **dict(self.model))

    def key_payload(self) -> dict[str, Any]:
        return {
            "kind": "trained_teacher",
            "recipe": {**dataclasses.asdict(self), "model": dict(self.model)},
            "spec": spec_key(self.spec()),
            "format": PRETRAINING_FORMAT_VERSION,
            "versions": _versions(),
            "tokenizer": tokenizer_fingerprint(),
        }


@dataclass(frozen=True)
class StudentRecipe:
    """How the student is built from a teacher (DistilBERT-style, with a new vision tower)."""

    teacher_layers: tuple[int, ...] = (0, 2)
    """The teacher's language-model layers the student keeps, in order."""
    vision_depth: int = 1
    """Blocks of the student's new (random) vision tower."""
    init_seed: int = 0

    def spec(self, teacher: TinySpec) -> TinySpec:
        fields = dataclasses.asdict(teacher)
        fields.update(role="student", num_layers=len(self.teacher_layers), vision_depth=self.vision_depth)
        return TinySpec(**fields)


TEACHER_RECIPE = TeacherRecipe()
"""The demo's teacher: vision first, then captions of every picture it sees."""
STUDENT_RECIPE = StudentRecipe()
"""The demo's student: two of the teacher's three language layers, a new one-block vision tower."""


def live_token_ids() -> list[int]:
    """Ids any text can produce: the BPE tokens and Qwen's added tokens."""
    n_bpe = len(bpe_vocab_and_merges()[0])
    return [*range(n_bpe), *range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(QWEN_ADDED_TOKENS))]


def _modules():  # -> (LiveEmbedding, AttributeProbe) classes; torch is imported only when training
    import torch

    class LiveEmbedding(torch.nn.Module):
        """Looks ids up in a small trainable table of the live rows (stands in for the input
        embedding during training; the rows are written back before saving)."""

        def __init__(self, full: torch.nn.Embedding, live: torch.Tensor) -> None:
            super().__init__()
            self.table = torch.nn.Embedding.from_pretrained(full.weight.detach()[live].clone(), freeze=False)
            remap = torch.full((full.weight.shape[0],), -1, dtype=torch.long)
            remap[live] = torch.arange(len(live))
            self.register_buffer("remap", remap, persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table(self.remap[ids])

    class AttributeProbe(torch.nn.Module):
        """Attention-pools each picture's vision tokens and predicts the probed attributes."""

        def __init__(self, width: int, queries: int) -> None:
            super().__init__()
            self.query = torch.nn.Linear(width, queries)
            self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in PROBED.items()})

        def forward(self, tokens: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
            weights = torch.softmax(self.query(tokens), dim=1)  # [pictures, tokens, queries]
            pooled = (weights.unsqueeze(-1) * tokens.unsqueeze(2)).sum(dim=1).mean(dim=1)
            losses = [
                torch.nn.functional.cross_entropy(head(pooled), targets[k]) for k, head in self.heads.items()
            ]
            return torch.stack(losses).sum()

    return LiveEmbedding, AttributeProbe


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _targets(samples: Sequence[Any]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([v.index(getattr(s, k)) for s in samples]) for k, v in PROBED.items()}


def train_teacher(recipe: TeacherRecipe, out: Path, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Train the teacher of `recipe` and save it (weights, tokenizer, processor) into `out`;
    returns what the training measured. Deterministic for a recipe on one machine."""
    import torch
    from tqdm.auto import tqdm

    from kdcompose.testing.tiny_models import _model_class, build_processor

    live_embedding_cls, probe_cls = _modules()
    config = build_config(recipe.spec())
    processor = build_processor(recipe.family)
    encoder = TaskEncoder(processor, recipe.task)
    hidden = config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        model = _model_class(recipe.family)(config)
        probe = probe_cls(hidden, recipe.probe_queries)
    live = torch.tensor(live_token_ids())
    language = model.model.language_model
    full_embedding = language.embed_tokens
    language.embed_tokens = live_embedding_cls(full_embedding, live)
    head = torch.nn.Parameter(model.lm_head.weight.detach()[live].clone())
    model.lm_head.weight.requires_grad_(False)
    log_zero_rows = math.log(model.lm_head.weight.shape[0] - len(live))
    remap = language.embed_tokens.remap
    visual = model.model.visual
    bar_file = stream or sys.stderr
    model.train()

    # Stage 1: the vision tower, aligner and probe alone.
    optimizer = torch.optim.AdamW(
        [*visual.parameters(), *probe.parameters()], lr=recipe.vision_learning_rate, weight_decay=0.0
    )
    size = recipe.vision_batch_size
    pictures = task_samples(recipe.task, recipe.vision_steps * size, recipe.data_seed + 1)
    for step in tqdm(range(recipe.vision_steps), desc="teacher: vision", unit="step", file=bar_file):
        chunk = pictures[step * size : (step + 1) * size]
        pixels = encoder.pixels(chunk)
        tokens = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
        loss = probe(tokens.reshape(len(chunk), -1, hidden), _targets(chunk))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Stage 2: the whole model on captions (exact full-vocabulary loss), the probe still on.
    captured: dict[str, torch.Tensor] = {}
    hook = visual.merger.register_forward_hook(lambda _m, _i, out_: captured.__setitem__("tokens", out_))
    params = [p for p in model.parameters() if p.requires_grad] + [head, *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, recipe.steps, recipe.warmup_steps)
    )
    size = recipe.batch_size
    samples = task_samples(recipe.task, recipe.steps * size, recipe.data_seed)
    bar = tqdm(range(recipe.steps), desc="teacher: captions", unit="step", file=bar_file)
    caption_loss = torch.tensor(float("nan"))
    for step in bar:
        chunk = samples[step * size : (step + 1) * size]
        batch = encoder.with_captions(chunk)
        states = model.model(**model_inputs(batch)).last_hidden_state[:, :-1]
        labels = batch["labels"][:, 1:]
        where = labels != -100
        logits = states[where] @ head.T
        log_z = torch.logsumexp(
            torch.cat([logits, torch.full_like(logits[:, :1], log_zero_rows)], dim=1), dim=1
        )
        caption_loss = (log_z - logits.gather(1, remap[labels[where]][:, None])[:, 0]).mean()
        probe_loss = probe(captured["tokens"].reshape(len(chunk), -1, hidden), _targets(chunk))
        loss = caption_loss + recipe.probe_weight * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0:
            bar.set_postfix(caption_loss=f"{caption_loss.item():.3f}")
    bar.close()
    hook.remove()

    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[live] = head.detach()
        full_embedding.weight[live] = language.embed_tokens.table.weight.detach()
    language.embed_tokens = full_embedding
    measured = {
        "final_caption_loss": caption_loss.item(),
        "steps": recipe.steps,
        "vision_steps": recipe.vision_steps,
    }
    _save(model, processor, out, {"recipe": recipe.key_payload()["recipe"], "measured": measured})
    return measured


def derive_student(teacher_dir: Path, recipe: StudentRecipe, out: Path) -> None:
    """Build the student from the teacher in `teacher_dir` (see the module docstring) into `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kdcompose.compat import ensure_torchvision_importable
    from kdcompose.testing.tiny_models import _model_class

    ensure_torchvision_importable()
    teacher = AutoModelForImageTextToText.from_pretrained(str(teacher_dir), dtype=torch.float32)
    manifest = read_manifest(teacher_dir) or {}
    teacher_spec = TinySpec(**manifest.get("spec", {})) if "spec" in manifest else None
    if teacher_spec is None:
        raise ValueError(f"{teacher_dir} is not a kdcompose trained teacher (no build manifest)")
    spec = recipe.spec(teacher_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2 * recipe.init_seed)  # the student's stream, as `build_tiny_model` seeds it
        student = _model_class(teacher_spec.family)(build_config(spec))
    inherited = teacher.state_dict()
    state = {}
    for key, value in student.state_dict().items():
        if ".visual." in f".{key}" and ".merger." not in key:
            state[key] = value  # the new vision tower: random
        elif ".layers." in key and "language_model" in key:
            head, rest = key.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            state[key] = inherited[f"{head}.layers.{recipe.teacher_layers[int(index)]}.{tail}"]
        else:
            state[key] = inherited[key]  # embeddings, final norm, LM head, aligner
    student.load_state_dict(state)
    processor = AutoProcessor.from_pretrained(str(teacher_dir))
    _save(student, processor, out, {"recipe": dataclasses.asdict(recipe), "teacher": str(teacher_dir)})


def _save(model: Any, processor: Any, out: Path, record: Mapping[str, Any]) -> None:
    save_greedy_model(model, out)
    processor.save_pretrained(out)
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def trained_teacher_dir(recipe: TeacherRecipe = TEACHER_RECIPE) -> Path:
    """Where the teacher of `recipe` is cached (whether or not it has been trained yet)."""
    key = content_key(recipe.key_payload())
    return cache_root() / "teachers" / f"{recipe.family}-{key}"


def is_teacher_cached(recipe: TeacherRecipe = TEACHER_RECIPE) -> bool:
    """Whether `build_trained_teacher(recipe)` will take the teacher from the cache."""
    return is_complete(trained_teacher_dir(recipe), content_key(recipe.key_payload()))


def build_trained_teacher(
    recipe: TeacherRecipe = TEACHER_RECIPE,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    stream: TextIO | None = None,
) -> Path:
    """The teacher's directory: trained once per recipe (about a minute and a half on one CPU
    core, with progress bars on `stream`), then taken from the cache. Atomic, so concurrent
    callers are safe."""
    payload = recipe.key_payload()
    key = content_key(payload)
    final = Path(out_dir) if out_dir is not None else trained_teacher_dir(recipe)
    description = {**payload, "spec": dataclasses.asdict(recipe.spec())}
    return atomic_build(
        final, key, lambda tmp, _final: _one_thread(train_teacher, recipe, tmp, stream=stream), description
    )


def build_student(
    teacher_dir: str | os.PathLike[str],
    recipe: StudentRecipe = STUDENT_RECIPE,
    out_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The student built from the teacher in `teacher_dir` (seconds), cached per teacher and recipe."""
    teacher_dir = Path(teacher_dir)
    teacher_manifest = read_manifest(teacher_dir) or {}
    payload = {
        "kind": "derived_student",
        "recipe": dataclasses.asdict(recipe),
        "teacher_key": teacher_manifest.get("key"),
        "format": PRETRAINING_FORMAT_VERSION,
        "versions": _versions(),
    }
    key = content_key(payload)
    family = TinySpec(**teacher_manifest["spec"]).family if "spec" in teacher_manifest else "model"
    final = Path(out_dir) if out_dir is not None else cache_root() / "students" / f"{family}-{key}"
    return atomic_build(final, key, lambda tmp, _final: derive_student(teacher_dir, recipe, tmp), payload)


def _one_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` with one torch thread: the teacher's operations are too small to split (two
    threads cost ~50% more CPU for little gain on an idle machine, and several times the wall
    time on a busy one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
