from kolm_ray.train.data import IGNORE, bucket_batches, build_examples, collator, prompt_text


def test_bucket_batches_cover_every_index_once_and_group_lengths():
    lengths = [i % 97 for i in range(1000)]
    batches = bucket_batches(lengths, 8, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 from 0..96 would spread ~70


def test_bucket_batches_are_seeded():
    lengths = list(range(100))
    assert bucket_batches(lengths, 4, 1) == bucket_batches(lengths, 4, 1)
    assert bucket_batches(lengths, 4, 1) != bucket_batches(lengths, 4, 2)


def test_loss_only_on_response_tokens(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    [ex] = build_examples(tok, "Route it.", [("my card failed", "billing")], max_length=256)
    n_prompt = len(tok(prompt_text(tok, "Route it.", "my card failed"), add_special_tokens=False).input_ids)
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode(ex.labels[n_prompt:]) == "billing<|im_end|>"


def test_long_prompts_are_cut_from_the_left(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    [ex] = build_examples(tok, "Summarize.", [("word " * 500, "short answer")], max_length=64)
    assert len(ex.input_ids) == 64
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == "short answer<|im_end|>"


def test_collate_pads_right_and_masks(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    exs = build_examples(tok, "T", [("a", "b"), ("a much longer input here", "c")], max_length=128)
    batch = collator(tok)(exs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(exs[0].input_ids)
    assert (batch["labels"][0, len(exs[0].input_ids):] == IGNORE).all()


def _by_hand(examples, pad_id):
    """The batch the fit trains on, written out: right-padded ids, mask, labels padded with -100."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    pad = [width - len(e.input_ids) for e in examples]
    return {
        "input_ids": torch.tensor([e.input_ids + [pad_id] * n for e, n in zip(examples, pad)]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * n for e, n in zip(examples, pad)]),
        "labels": torch.tensor([e.labels + [IGNORE] * n for e, n in zip(examples, pad)]),
    }


def test_collated_batches_are_exactly_the_padded_examples(tiny_base):
    import torch
    from transformers import AutoTokenizer

    from kolm_ray.testing.corpus import routing_rows, tldr_rows

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = tldr_rows(6, seed=1) + routing_rows(6, seed=1)
    exs = build_examples(tok, "T", [(r.input, r.output) for r in rows], max_length=256)
    collate = collator(tok)
    for batch in ([exs[0]], exs[:3], exs[5:9], exs):
        got, want = collate(batch), _by_hand(batch, tok.pad_token_id)
        assert list(got) == ["input_ids", "attention_mask", "labels"]
        for k in want:
            assert got[k].dtype == torch.long and torch.equal(got[k], want[k]), k


def test_a_tokenizer_that_pads_left_still_gets_right_padded_batches_and_is_left_alone(tiny_base):
    """Some bases pad on the left for generation (Phi-3); a causal LM trains right-padded."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base, padding_side="left")
    exs = build_examples(tok, "T", [("a", "b"), ("a much longer input here", "c")], max_length=128)
    got = collator(tok)(exs)
    assert all(torch.equal(got[k], v) for k, v in _by_hand(exs, tok.pad_token_id).items())
    assert tok.padding_side == "left"
