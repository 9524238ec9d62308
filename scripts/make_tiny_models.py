"""Build tiny random-weight models for the engine tests, offline and deterministically.

    /opt/nebula/engines/vllm/bin/python scripts/make_tiny_models.py OUT_DIR

Run it with the ENGINE venv's Python: torch, transformers and tokenizers come with vLLM, and the models
must load with exactly the versions that will serve them. Writes:

    OUT_DIR/tiny-llama        LlamaForCausalLM, byte-level BPE tokenizer, ChatML chat template (generate)
    OUT_DIR/tiny-bert-embed   BertModel + sentence-transformers mean pooling (--convert embed)
    OUT_DIR/tiny-bert-rerank  BertForSequenceClassification, num_labels=1 cross-encoder (--convert classify)
    OUT_DIR/tiny-whisper      WhisperForConditionalGeneration + WhisperProcessor (speech to text: /v1/audio/*)
    OUT_DIR/tiny-llama-lora   a PEFT LoRA adapter for tiny-llama, rank 4 on q_proj and v_proj
    OUT_DIR/tiny-llama-lora-r16  the same at rank 16 (what an engine with --max-lora-rank=8 refuses)
    OUT_DIR/manifest.json     name -> task, for test fixtures
    OUT_DIR/.stamp            what the models were built from; a matching stamp makes the next run a no-op

Nothing comes from a hub: the tokenizers are trained here on the interpreter's own standard library
sources. The weights are random (seed 0), so a chat model talks nonsense and almost never emits EOS:
tests must always set max_tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

MODELS = {"tiny-llama": "generate", "tiny-bert-embed": "embed", "tiny-bert-rerank": "rerank",
          "tiny-whisper": "transcribe"}
# LoRA adapters of tiny-llama: directory -> rank.
ADAPTERS = {"tiny-llama-lora": 4, "tiny-llama-lora-r16": 16}
VOCAB = 4096
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# ChatML, as Qwen-style models use it. Content may be a string or a list of OpenAI content parts; only
# text parts can reach a text-only model. Tool definitions go into a system turn so that a request with
# tools still renders (vLLM's structured outputs, not the prompt, shape the tool call of a random model).
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{% set text = message['content'] %}"
    "{%- elif message['content'] %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\n') %}"
    "{%- else %}{% set text = '' %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_key() -> str:
    """What the output depends on: this script, the interpreter (its stdlib is the corpus) and the libraries.

    Read from package metadata rather than by importing them: importing torch takes seconds, and the
    up-to-date check should not.
    """
    from importlib.metadata import version

    h = hashlib.sha256(Path(__file__).read_bytes())
    # vllm: the tiny Whisper takes its language tokens from the engine that serves it.
    libs = "|".join(f"{d}={version(d)}" for d in ("torch", "transformers", "tokenizers", "vllm"))
    h.update(f"{sys.version}|{libs}".encode())
    return h.hexdigest()


def corpus() -> list[str]:
    # ~2 MB of local text: enough for 4096 BPE merges, sorted so training sees the same order every run.
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]


def fix_tokenizer_class(model_dir: Path) -> None:
    # transformers 5 writes tokenizer_class "TokenizersBackend", which older readers (vLLM's own tokenizer
    # loaders in some versions, llama.cpp converters) reject; the tokenizer.json is the same either way.
    p = model_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_chat(out: Path, files: list[str]) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train(files, trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=CHAT_SPECIALS,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                     pad_token="<|pad|>", model_max_length=2048)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    fix_tokenizer_class(out)
    # Some transformers versions keep the template only in chat_template.jinja; vLLM reads either, older
    # tools only tokenizer_config.json, so make sure it is there too.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in CHAT_SPECIALS}
    cfg_llama = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                            # a wide init gives varied logits, so sampling does not collapse onto one token
                            initializer_range=0.2,
                            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                            pad_token_id=ids["<|pad|>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg_llama)
    model.generation_config = GenerationConfig(bos_token_id=cfg_llama.bos_token_id,
                                               eos_token_id=cfg_llama.eos_token_id,
                                               pad_token_id=cfg_llama.pad_token_id)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_lora(out: Path, rank: int) -> int:
    """A PEFT LoRA adapter for tiny-llama, written without peft: adapter_config.json and the tensors under the
    names vLLM's loader reads (vllm/lora/utils.py parse_fine_tuned_lora_name:
    `base_model.model.<module>.lora_A.weight` of shape (r, in), `lora_B.weight` of shape (out, r))."""
    import torch
    from safetensors.torch import save_file

    hidden, heads, kv_heads, head_dim, layers = 128, 2, 1, 64, 2  # as make_chat's LlamaConfig
    shapes = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    gen = torch.Generator().manual_seed(rank)
    tensors = {}
    for layer in range(layers):
        for module, out_features in shapes.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.1
            # Non-zero B (PEFT starts it at zero): an adapter that changes nothing would prove nothing.
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama", "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": sorted(shapes), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True})
    return sum(t.numel() for t in tensors.values())


def wordpiece_vocab(files: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary counted here rather than by tokenizers' WordPieceTrainer.

    The trainer breaks ties between equally frequent pieces in hash-map order, which changes from one
    process to the next, so its vocabulary (and every token id) differs between runs. Here: the special
    tokens, every character seen (alone and as a ##continuation, so any word can be spelt), then the most
    frequent whole words, ties broken alphabetically.
    """
    import collections
    import re
    import unicodedata

    words: collections.Counter[str] = collections.Counter()
    chars: set[str] = set()
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace").lower()
        # What BertNormalizer(lowercase=True) does to the text before splitting: strip accents.
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        chars.update(c for c in text if not c.isspace())
        words.update(re.findall(r"[^\W_]+", text))
    pieces = [*BERT_SPECIALS, *sorted(chars), *(f"##{c}" for c in sorted(chars))]
    seen = set(pieces)
    for word, _n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(pieces) >= VOCAB:
            break
        if word not in seen:
            pieces.append(word)
            seen.add(word)
    return {p: i for i, p in enumerate(pieces)}


def make_bert(embed_out: Path, rerank_out: Path, files: list[str]) -> tuple[int, int]:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(wordpiece_vocab(files), unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    # The pair template is what a cross-encoder sees for (query, document).
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    bert_tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=512)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512, pad_token_id=0,
                     # wider than the default 0.02 so that scores and embeddings differ visibly between inputs
                     initializer_range=0.2)

    bert_tok.save_pretrained(embed_out)
    fix_tokenizer_class(embed_out)
    torch.manual_seed(0)
    embed = BertModel(cfg)
    embed.save_pretrained(embed_out)
    # sentence-transformers metadata: vLLM reads it to pick mean pooling + L2 normalisation.
    write_json(embed_out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    write_json(embed_out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": cfg.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False})
    write_json(embed_out / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": True})

    bert_tok.save_pretrained(rerank_out)
    fix_tokenizer_class(rerank_out)
    # num_labels=1: one relevance score per (query, document) pair, which is what /v1/rerank expects.
    cfg.num_labels = 1
    cfg.id2label = {0: "LABEL_0"}
    cfg.label2id = {"LABEL_0": 0}
    torch.manual_seed(0)
    rerank = BertForSequenceClassification(cfg)
    rerank.save_pretrained(rerank_out)
    return (sum(p.numel() for p in embed.parameters()), sum(p.numel() for p in rerank.parameters()))


def make_whisper(out: Path, files: list[str]) -> int:
    """A Whisper that vLLM serves on /v1/audio/transcriptions: the processor (80-bin log-mel features of 30 s
    at 16 kHz, as vLLM's whisper.py pads every clip to) and a byte-level BPE tokenizer with the special tokens
    vLLM writes into the decoder prompt (<|startoftranscript|><|en|><|transcribe|><|notimestamps|>), one
    language token for each language vLLM accepts. d_model 64, 2 + 2 layers: ~357k parameters, 1.4 MB."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from vllm.model_executor.models.whisper import ISO639_1_SUPPORTED_LANGS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train(files, trainers.BpeTrainer(vocab_size=512, min_frequency=2, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = WhisperTokenizer(vocab=trained["vocab"], merges=merges)  # bos = eos = unk = <|endoftext|>
    specials = ["<|startoftranscript|>", *(f"<|{lang}|>" for lang in sorted(ISO639_1_SUPPORTED_LANGS)),
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                "<|notimestamps|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(out)

    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
                        init_std=0.2, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                        decoder_start_token_id=sot, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                                               decoder_start_token_id=sot)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.monotonic()
    # Never reach for a hub, and keep CI logs free of progress bars and fork warnings.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(argv[1]).absolute()
    key = build_key()
    stamp = root / ".stamp"
    if stamp.is_file() and stamp.read_text().strip() == key and all((root / m).is_dir() for m in [*MODELS, *ADAPTERS]):
        print(f"make_tiny_models: up to date in {root}")
        return 0

    # Build beside the output and swap in at the end, so an interrupted run never leaves a directory
    # that looks complete; the stamp is written last.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = corpus()
        params = {"tiny-llama": make_chat(tmp / "tiny-llama", files)}
        params["tiny-bert-embed"], params["tiny-bert-rerank"] = make_bert(
            tmp / "tiny-bert-embed", tmp / "tiny-bert-rerank", files)
        params["tiny-whisper"] = make_whisper(tmp / "tiny-whisper", files)
        for name, rank in ADAPTERS.items():
            params[name] = make_lora(tmp / name, rank)
        write_json(tmp / "manifest.json", {m: {"task": t, "path": m} for m, t in MODELS.items()}
                   | {a: {"task": "lora", "base": "tiny-llama", "rank": r, "path": a} for a, r in ADAPTERS.items()})
        # safetensors files come out 0600; engines may run as an unprivileged user (nebula), so let
        # everyone read the models.
        for dirpath, _dirs, names in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for n in names:
                os.chmod(os.path.join(dirpath, n), 0o644)
        old = root.parent / f".{root.name}.old.{os.getpid()}"
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stamp.write_text(key + "\n")
    print(json.dumps({"out": str(root), "params": params, "total_s": round(time.monotonic() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
