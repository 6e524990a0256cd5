"""The cross-tokenizer tiny text models load in ms-swift 4.6, and their own templates' completions align.

Real components: the tiny Qwen2 student and Llama teacher of ``kdcompose.testing.tokenizer_pair``
(two different locally trained BPEs), loaded with ms-swift's ``get_model_processor`` and encoded with
each one's own ms-swift template (``qwen2_5`` / ``llama3``) in training mode, as a GKD run would.
No training run: one module-scoped load, many checks.
"""

from __future__ import annotations

import os

import pytest
import torch

from kdcompose.functional import generalized_jsd
from kdcompose.functional.cross_tokenizer import AlignedBatch, TeacherLogits, cross_tokenizer_loss
from kdcompose.teachers.alignment import align_token_ids, decode_bytes, same_tokenizer, vocab_mapping
from kdcompose.testing import tiny_run_env
from kdcompose.testing.tokenizer_pair import build_tiny_text_model, embedding_rows, recipe, swift_model_args

pytestmark = pytest.mark.swift

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is 12 + 345? Describe the shape."},
        {"role": "assistant", "content": "12 + 345 = 357. a large red square in the center. Café!"},
    ]
}


@pytest.fixture(scope="module")
def loaded():
    os.environ.update(tiny_run_env())
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()
    from swift.model import get_model_processor
    from swift.template import get_template

    out = {}
    for role in ("student", "teacher"):
        args = swift_model_args(role, build_tiny_text_model(role))
        model, processor = get_model_processor(
            args["model"], model_type=args["model_type"], torch_dtype=torch.float32, device_map="cpu"
        )
        template = get_template(processor, template_type=args["template"], max_length=None)
        template.set_mode("train")
        encoded = template.encode(CONVERSATION)
        out[role] = (model, processor, encoded)
    return out


def _completion(encoded) -> tuple[list[int], list[int]]:
    """(completion ids, their positions): the labelled tokens."""
    pos = [i for i, label in enumerate(encoded["labels"]) if label != -100]
    return [encoded["input_ids"][i] for i in pos], pos


def test_models_load_with_their_own_family_and_width(loaded) -> None:
    for role, cls in (("student", "Qwen2ForCausalLM"), ("teacher", "LlamaForCausalLM")):
        model, processor, _ = loaded[role]
        assert type(model).__name__ == cls == recipe(role).architecture
        assert model.get_output_embeddings().weight.shape[0] == embedding_rows(role)
        assert model.config.eos_token_id == processor.convert_tokens_to_ids(recipe(role).eos_token)
    assert not same_tokenizer(loaded["student"][1], loaded["teacher"][1])


def test_each_template_encodes_the_same_completion_text(loaded) -> None:
    (_, s_tok, s_enc), (_, t_tok, t_enc) = loaded["student"], loaded["teacher"]
    s_ids, _ = _completion(s_enc)
    t_ids, _ = _completion(t_enc)
    answer = CONVERSATION["messages"][1]["content"].encode()
    assert decode_bytes(s_tok, s_ids) == answer + b"<|im_end|>\n"  # ms-swift's ChatML labels
    assert decode_bytes(t_tok, t_ids) == answer + b"<|eot_id|>"  # ms-swift's Llama 3 labels
    a = align_token_ids(s_tok, s_ids, t_tok, t_ids)
    assert b"".join(g.text for g in a.groups) == answer + b"<|im_end|>\n"
    assert a.groups[-1].special and a.groups[-1].text == b"<|im_end|>\n"
    flags = a.one_to_one(vocab_mapping(s_tok, t_tok))
    assert 0 < sum(flags) < len(flags)  # digits and rare words split differently, common words not


def test_loss_on_the_real_models_trains_the_student_only(loaded) -> None:
    (s_model, s_tok, s_enc), (t_model, t_tok, t_enc) = loaded["student"], loaded["teacher"]
    s_ids, s_pos = _completion(s_enc)
    t_ids, t_pos = _completion(t_enc)
    s_logits = s_model(input_ids=torch.tensor([s_enc["input_ids"]])).logits[0]
    with torch.no_grad():
        t_logits = t_model(input_ids=torch.tensor([t_enc["input_ids"]])).logits[0]
    rows_s = torch.tensor(s_pos) - 1  # the logits that predicted each completion token
    rows_t = torch.tensor(t_pos) - 1
    a = align_token_ids(s_tok, s_ids, t_tok, t_ids)
    batch = AlignedBatch.from_alignments([a], vocab_mapping(s_tok, t_tok))
    result = cross_tokenizer_loss(s_logits[rows_s], TeacherLogits(t_logits[rows_t]), batch)
    assert torch.isfinite(result.loss) and result.loss > 0 and 0 < result.matched_frac < 1
    s_model.zero_grad()
    result.loss.backward()
    assert s_model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t_model.parameters())
    # The identity on real logits: the student against itself through the cross-tokenizer path.
    twin = build_tiny_text_model("student")
    from transformers import AutoTokenizer

    twin_tok = AutoTokenizer.from_pretrained(str(twin))
    same = align_token_ids(s_tok, s_ids, twin_tok, s_ids)
    other = s_logits[rows_s].detach() * 0.5
    got = cross_tokenizer_loss(
        s_logits[rows_s],
        TeacherLogits(other),
        AlignedBatch.from_alignments([same], vocab_mapping(s_tok, twin_tok)),
    )
    torch.testing.assert_close(got.loss, generalized_jsd(s_logits[rows_s], other), rtol=1e-5, atol=1e-7)
