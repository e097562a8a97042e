from kolm_ray.train.data import IGNORE, bucket_batches, build_examples, collate, prompt_text


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
    batch = collate(exs, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(exs[0].input_ids)
    assert (batch["labels"][0, len(exs[0].input_ids):] == IGNORE).all()
