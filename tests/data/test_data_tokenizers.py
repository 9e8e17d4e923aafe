"""Tokenizers: round trips (English and Chinese), special tokens, chat templates vs transformers,
built-ins, load_tokenizer dispatch, and one-line errors naming the bad file."""

import json

import pytest
from tiny_tokenizers import train_bpe_dir, train_sentencepiece

from jaxselm.data import tokenizer as tk
from jaxselm.data import tokenizer_base as tb
from jaxselm.errors import DataError, TokenizerError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "我们今天去北京看长城。",
    "Mixed 中英文 text: machine learning 机器学习, 42!",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? Machine learning is fun.",
    "我们今天去北京看长城。你好，世界！今天天气很好。",
    "机器学习 and deep learning 深度学习 are popular.",
] * 10

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "你好！What is 2 + 2? "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "再说一遍 {{ not a template }}"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer.json and a tokenizer_config.json with a chat template."""
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "__type": "AddedToken"},
        "pad_token": "<pad>",
        "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    d = train_bpe_dir(tmp_path_factory.mktemp("hf_tok"), CORPUS, 400, config)
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny SentencePiece BPE model trained on English + Chinese, with byte fallback."""
    d = tmp_path_factory.mktemp("sp_tok")
    train_sentencepiece(d, CORPUS, "tokenizer", pad_id=3)
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": TEMPLATE,
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )
    return d


def test_hf_round_trip_and_specials(hf_dir):
    tok = tk.load_tokenizer(hf_dir)
    assert isinstance(tok, tk.HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        with_specials = tok.encode(text, add_bos=True, add_eos=True)
        assert with_specials == [0, *ids, 1]
        assert tok.decode(with_specials) == text
    # Special-token strings written by a chat template map to their single ids.
    assert tok.encode("<s>hi</s>")[0] == 0 and tok.encode("<s>hi</s>")[-1] == 1


def test_sentencepiece_round_trip(sp_dir):
    tok = tk.load_tokenizer(sp_dir)
    assert isinstance(tok, tk.SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == 400
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True)
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
        assert tok.decode(ids) == text
    # Chinese characters absent from the training corpus go through byte fallback.
    assert tok.decode(tok.encode("鳄鱼很少见")) == "鳄鱼很少见"
    ids = tok.encode("<s>你好</s>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")


@pytest.mark.parametrize("which", ["hf", "sp"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(which, add_generation_prompt, hf_dir, sp_dir):
    transformers = pytest.importorskip("transformers")
    d = hf_dir if which == "hf" else sp_dir
    ours = tk.load_tokenizer(d).apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt
    )
    theirs = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith("<s><|system|>\nAnswer briefly.</s>\n")
    assert ("<|assistant|>\n" in ours[-15:]) == add_generation_prompt


def test_chat_template_jinja_file_takes_precedence(tmp_path, hf_dir):
    transformers = pytest.importorskip("transformers")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role | upper }}] {{ m.content | tojson }}\n{% endfor %}",
        encoding="utf-8",
    )
    ours = tk.load_tokenizer(tmp_path).apply_chat_template(MESSAGES)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        MESSAGES, tokenize=False
    )
    assert ours == theirs
    assert '"你好！What is 2 + 2? "' in ours  # tojson keeps non-ASCII text


def test_chat_template_errors(hf_dir, tmp_path):
    tok = tk.load_tokenizer(hf_dir)
    bad_order = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    with pytest.raises(TokenizerError, match="system message must come first") as e:
        tok.apply_chat_template(bad_order)
    assert "tokenizer_config.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"messages\[0\].*role"):
        tok.apply_chat_template([{"content": "no role"}])
    # The sandbox refuses attribute tricks.
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="chat_template.jinja"):
        tk.load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: .*syntax error"):
        tk.load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_tokenizer_files(tmp_path, hf_dir):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError) as e:
        tk.load_tokenizer(tmp_path)
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "not valid JSON" in msg and "\n" not in msg

    bad.write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        tk.load_tokenizer(bad)

    bad.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("not json at all")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: field 'bos_token'"):
        tk.load_tokenizer(tmp_path)

    sp = tmp_path / "other" / "tokenizer.model"
    sp.parent.mkdir()
    sp.write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        tk.load_tokenizer(sp.parent)
    with pytest.raises(TokenizerError, match="file not found"):
        tk.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        tk.load_tokenizer(_empty(tmp_path))
    with pytest.raises(TokenizerError, match="has no chat template"):
        _no_template(tmp_path, hf_dir).apply_chat_template([{"role": "user", "content": "x"}])


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _no_template(tmp_path, hf_dir):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    return tk.load_tokenizer(d)


def test_builtin_tokenizers():
    b = tk.load_tokenizer("builtin:bytes")
    for text in TEXTS:
        ids = b.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == b.bos_id and ids[-1] == b.eos_id and max(ids) < b.vocab_size
        assert b.decode(ids) == text
    assert (
        b.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        == "a b"
    )

    w = tb.WordTokenizer(["sort", "=", "1", "2"])
    assert w.words[:4] == (tb.PAD, tb.BOS, tb.EOS, tb.UNK) and w.vocab_size == 8
    assert w.encode("sort 2 1 =", add_bos=True) == [1, 4, 7, 6, 5]
    assert w.encode("sort 9") == [4, w.unk_id]
    assert w.decode([1, 4, 7, 6, 5, 2, 0, 0]) == "sort 2 1 ="
    # Same words, same ids: no files, no state.
    assert tb.WordTokenizer(["sort", "=", "1", "2"]).encode("2 1") == w.encode("2 1")
    assert tk.load_tokenizer("builtin:task:sort").encode("sort 3 1 =") == [4, 9, 7, 5]
    with pytest.raises(TokenizerError, match="duplicate vocabulary word"):
        tb.WordTokenizer(["a", "a"])
    with pytest.raises(TokenizerError, match="unknown built-in"):
        tk.load_tokenizer("builtin:nope")


LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
NAMESPACE_BREAK = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% if m.role == 'assistant' %}{% set ns.n = ns.n + 1 %}{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}"
    "    {{ m.role }}={{ dict(c=m.content) | tojson }};\n"
    "{% endfor %}[{{ ns.n }}]{{ pad_token }}"
)


@pytest.mark.parametrize(
    "template", [LLAMA3, ZEPHYR, NAMESPACE_BREAK], ids=["llama3", "zephyr", "namespace_break"]
)
def test_real_world_templates_match_transformers(template, tmp_path, hf_dir):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    ours = tk.load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for add in (False, True):
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add) == expected


def test_hf_save_loads_back_and_in_transformers(hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tk.load_tokenizer(hf_dir)
    assert tok.save(tmp_path / "out") == tmp_path / "out"
    names = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == names
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    again = tk.load_tokenizer(tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in [*TEXTS, "<s>hi</s>", "  spaces  "]:
        ids = tok.encode(text)
        assert again.encode(text) == ids == theirs.encode(text, add_special_tokens=False)
    for add in (False, True):
        ours = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=add))
        assert again.encode(again.apply_chat_template(MESSAGES, add_generation_prompt=add)) == ours
        ids = theirs.apply_chat_template(
            MESSAGES, add_generation_prompt=add, tokenize=True, return_dict=False
        )
        assert list(ids) == ours


def test_sentencepiece_save_copies_the_model(sp_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tk.load_tokenizer(sp_dir)
    tok.save(tmp_path)
    names = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert (tmp_path / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    again = tk.load_tokenizer(tmp_path)
    assert again.special_token_ids == tok.special_token_ids and again.add_bos_token
    for text in TEXTS:
        assert again.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        expected
    )


def test_builtin_tokenizers_have_nothing_to_save(tmp_path):
    with pytest.raises(TokenizerError, match="builtin:bytes: this tokenizer has no files"):
        tk.load_tokenizer("builtin:bytes").save(tmp_path)
