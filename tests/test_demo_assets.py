"""Fast checks of the demo assets: task, tokenizers, tiny models, scoring (< 30 s on 2 CPUs)."""

import json
import os
import random

import pytest

from axolotl_gold.demo import task
from axolotl_gold.demo.tokenizers import build_bpe_tokenizer, build_char_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from axolotl_gold.demo.models import build_tiny_pair

    return build_tiny_pair(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_cross(tmp_path_factory):
    from axolotl_gold.demo.models import build_tiny_pair

    return build_tiny_pair(str(tmp_path_factory.mktemp("tiny_cross")), cross_tokenizer=True)


@pytest.fixture(scope="module")
def tokenizers_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    build_char_tokenizer(str(root / "char"))
    build_bpe_tokenizer(str(root / "bpe"))
    return {"char": str(root / "char"), "bpe": str(root / "bpe")}


# ----------------------------------------------------------------------------- task


def test_task_examples_and_scoring():
    rng = random.Random(0)
    prompt, answer = task.make_example(rng)
    word = task.parse_prompt(prompt)
    assert prompt.startswith(task.PREFIX) and len(word) == task.WORD_LEN
    assert answer == task.solve(word) == "".join(task.CIPHER[c] for c in word)
    assert sorted(task.CIPHER.values()) == list(task.ALPHABET)  # a permutation
    assert all(k != v for k, v in task.CIPHER.items())  # without fixed points
    assert task.score(" " + answer + "\n", answer)
    assert not task.score(answer[:-1], answer)
    assert not task.score("", answer)
    assert not task.score(answer + "x", answer)


def test_splits_deterministic_and_disjoint():
    a = task.make_split(50, seed=3)
    assert a == task.make_split(50, seed=3)
    assert len({p for p, _ in a}) == 50
    b = task.make_split(50, seed=4, exclude=[p for p, _ in a])
    assert not {p for p, _ in a} & {p for p, _ in b}
    restricted = task.make_split(20, seed=5, alphabet=task.STUDENT_LETTERS)
    assert all(set(task.parse_prompt(p)) <= set(task.STUDENT_LETTERS) for p, _ in restricted)


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_chat_template_prefix_property(kind, tokenizers_on_disk):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizers_on_disk[kind])
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for prompt, answer in task.make_split(20, seed=1):
        msgs = task.to_messages(prompt)
        p_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full_text = p_text + answer + tok.eos_token
        assert tok.apply_chat_template(task.to_messages(prompt, answer), tokenize=False) == full_text
        p_ids = tok(p_text, add_special_tokens=False).input_ids
        f_ids = tok(full_text, add_special_tokens=False).input_ids
        assert f_ids[: len(p_ids)] == p_ids
        assert f_ids[-1] == tok.eos_token_id
        assert tok.decode(f_ids[len(p_ids) :], skip_special_tokens=True) == answer
        # the assistant turn (answer + end token) is marked for completion-only losses
        out = tok.apply_chat_template(task.to_messages(prompt, answer), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert out["input_ids"] == f_ids
        assert out["assistant_masks"] == [0] * len(p_ids) + [1] * (len(f_ids) - len(p_ids))


def test_chat_template_roles():
    tok = build_char_tokenizer()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>S<|user|>U<|assistant|>A<|end|><|user|>V<|assistant|>"
    bpe = build_bpe_tokenizer()
    text = bpe.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[SYS]S[/SYS][INST]U[/INST]A</s>[INST]V[/INST]"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_offsets_present(kind, tokenizers_on_disk):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizers_on_disk[kind])
    text = tok.apply_chat_template(task.to_messages("encode: hello", "nwddz"), tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    assert len(offs) == len(enc["input_ids"])
    assert offs[-1][1] == len(text)
    for (s, e), tid in zip(offs, enc["input_ids"]):
        assert 0 <= s <= e <= len(text)
        if tid not in tok.all_special_ids:
            assert tok.decode([tid]) == text[s:e]


def test_tokenizers_differ():
    char, bpe = build_char_tokenizer(), build_bpe_tokenizer()
    assert len(char) != len(bpe)
    assert set(char.all_special_tokens).isdisjoint(bpe.all_special_tokens)
    # one token per character for the char tokenizer, merges for the BPE one
    text = "encode: abcde"
    assert len(char(text, add_special_tokens=False).input_ids) == len(text)
    assert len(bpe(text, add_special_tokens=False).input_ids) < len(text)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("which", ["tiny", "tiny_cross"])
def test_tiny_pair_loads(which, request):
    paths = request.getfixturevalue(which)
    ids = {}
    for role in ("teacher", "student"):
        model = transformers.AutoModelForCausalLM.from_pretrained(paths[role])
        tok = transformers.AutoTokenizer.from_pretrained(paths[role])
        cfg = model.config
        assert cfg.model_type == "qwen2"
        assert cfg.hidden_size // cfg.num_attention_heads == 64
        assert cfg.tie_word_embeddings is False
        assert cfg.vocab_size == len(tok)
        assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
        assert cfg.max_position_embeddings == 256
        text = tok.apply_chat_template(task.to_messages("encode: abcde"), add_generation_prompt=True,
                                       tokenize=False)
        ids[role] = tok(text, add_special_tokens=False).input_ids
        logits = model(torch.tensor([ids[role]])).logits
        assert logits.shape == (1, len(ids[role]), len(tok))
    t_cfg = transformers.AutoConfig.from_pretrained(paths["teacher"])
    s_cfg = transformers.AutoConfig.from_pretrained(paths["student"])
    assert s_cfg.num_hidden_layers < t_cfg.num_hidden_layers
    assert (ids["teacher"] != ids["student"]) == (which == "tiny_cross")
    for split, n in (("train", 64), ("eval", 16)):
        with open(paths[split]) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == n
        assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]


def test_model_dir_tokenizer_matches_in_memory(tiny_cross):
    # transformers 5 loads a tokenizer saved next to a qwen2 config.json as Qwen2Tokenizer;
    # the demo's tokenizers are built so that this gives exactly the same ids.
    text = "<s>[INST]encode: abc xyz\n é[/INST]nwddz</s>"
    loaded = transformers.AutoTokenizer.from_pretrained(tiny_cross["teacher"])
    assert loaded(text).input_ids == build_bpe_tokenizer()(text).input_ids
    text = "<|user|>encode: abc xyz\n é<|assistant|>nwddz<|end|>"
    loaded = transformers.AutoTokenizer.from_pretrained(tiny_cross["student"])
    assert loaded(text).input_ids == build_char_tokenizer()(text).input_ids


# ----------------------------------------------------------------------------- scoring


def test_score_model_random_and_adapter(tiny, tmp_path):
    from axolotl_gold.demo.score import score_model

    acc = score_model(tiny["student"], tiny["eval"], n=6, batch_size=4)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert acc == score_model(tiny["student"], tiny["eval"], n=6, batch_size=4)  # deterministic

    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["student"])
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter_dir = str(tmp_path / "adapter")
    lora.save_pretrained(adapter_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == tiny["student"]
    acc2 = score_model(adapter_dir, tiny["eval"], n=6, batch_size=4)
    assert acc2 == acc  # LoRA B starts at zero: same model


def test_scoring_counts_exact_matches(tiny):
    from axolotl_gold.demo import score as score_mod
    from axolotl_gold.demo.models import read_jsonl

    rows = read_jsonl(tiny["eval"], 4)
    model, tok = score_mod.load_model_and_tokenizer(tiny["student"])
    answers = iter([rows[0][1], "zzzzz", " " + rows[2][1] + " ", ""])
    orig = score_mod.generate_answers
    try:
        score_mod.generate_answers = lambda m, t, prompts, **kw: [next(answers) for _ in prompts]
        assert score_mod.accuracy(model, tok, rows) == 0.5
    finally:
        score_mod.generate_answers = orig


def test_build_demo_pipeline_and_cache(tmp_path):
    """The real build with tiny budgets: layout, scores.json, and an instant cached re-run."""
    from axolotl_gold.demo.pretrain import build_demo

    small = dict(n_train=16, n_eval=8, n_dev=4, batch_size=4, threads=1,
                 teacher={"max_steps": 2, "min_steps": 0, "eval_every": 2},
                 student={"max_steps": 2, "min_steps": 0, "eval_every": 2})
    out = str(tmp_path / "demo")
    scores = build_demo(out, log=lambda *_: None, **small)
    for key in ("teacher", "student"):
        assert 0.0 <= scores[key] <= 1.0
        assert os.path.exists(os.path.join(out, key, "config.json"))
        assert os.path.exists(os.path.join(out, key, "tokenizer.json"))
    assert scores["n_eval"] == 8 and scores["n_train"] == 16
    with open(os.path.join(out, "data", "eval.jsonl")) as f:
        assert sum(1 for _ in f) == 8
    mtime = os.path.getmtime(os.path.join(out, "teacher", "model.safetensors"))
    again = build_demo(out, log=lambda *_: None, **small)
    assert again == scores
    assert os.path.getmtime(os.path.join(out, "teacher", "model.safetensors")) == mtime
