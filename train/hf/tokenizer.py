"""A Loom (sentencepiece) vocabulary as a Hugging Face tokenizer directory, and back.

Export writes the sentencepiece model itself as `tokenizer.model` (what sentencepiece-based
clients and Loom read) and the same vocabulary as a `tokenizers` pipeline in `tokenizer.json`
(what `AutoTokenizer` and non-Python servers read), built from the model proto so it encodes
text to the same ids: the whole text is normalised the way sentencepiece does it (dummy "▁"
prefix, spaces to "▁", the model's precompiled character map such as NFKC, squeezed spaces)
before the model runs, so a text that starts with a space or a newline keeps its prefix piece.
A vocabulary whose character map rewrites one of its user-defined pieces (a newline under
nmt_nfkc) is refused: sentencepiece shields those pieces, tokenizers cannot.

Known differences: a control piece written literally in a text ("[MASK]", "<extra_id_0>",
"</s>") is that special token for Hugging Face clients (their convention, which fill-mask and T5
prompts rely on), while Loom's sentencepiece model never makes a control piece from text (its
pipelines insert them); unigram segmentations that tie in score (the same pieces of a run of
spaces or of punctuation, in another order) may be resolved differently, and on long texts
(thousands of characters) near-ties too, since sentencepiece sums scores in float32 and
`tokenizers` in float64: Hugging Face may pick a segmentation that scores slightly higher, with
a different number of tokens (measured in the README's export section); with a BPE
vocabulary, text right after a literal multi-character special piece ("[MASK]") gets a "▁" of
its own. For BERT, where "[MASK]" in text is the point,
[CLS]/[SEP]/[MASK] are split off first and the dummy prefix comes from a `Metaspace`
pre-tokenizer instead, which gets special pieces inside a text right but not the "▁" of a text
that starts with a space or one of them.

`tokenizer_config.json` names `PreTrainedTokenizerFast`, which loads `tokenizer.json` as it is:
from transformers 5 on, `LlamaTokenizer` rebuilds every vocabulary as BPE, which would silently
break Loom's default unigram vocabularies.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.tokenizer import BOS, EOS, MODEL_FILE, PAD, UNK, Tokenizer
from errors import DataError
from errors import CheckpointError, ConversionError, DependencyError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# sentencepiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType values
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_UNIGRAM, _BPE = 1, 2
BERT_PIECES = ("[CLS]", "[SEP]", "[MASK]")


def sentencepiece_proto(tokenizer: Tokenizer) -> Any:
    """The tokenizer's sentencepiece ModelProto: pieces, scores, types, normalizer settings."""
    from sentencepiece import sentencepiece_model_pb2   # deferred: protobuf, export only
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    return proto


def _bpe_merges(pieces: list[Any], ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two known pieces, by the merged piece's rank
    (sentencepiece BPE merges the pair whose result scores highest, and ranks are scores)."""
    ranked = []
    for merged, rank in ids.items():
        if pieces[rank].type != 1:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((rank, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def fast_tokenizer(tokenizer: Tokenizer, bert: bool = False, eos: bool = False) -> Any:
    """The vocabulary as a `tokenizers.Tokenizer` that encodes like the sentencepiece model,
    adding BOS in front (decoders), BERT's [CLS] A [SEP] (B [SEP]) around the text, or (`eos`,
    T5's encoder input) EOS after it."""
    # deferred: `tokenizers` is an optional dependency (pip install -e '.[hf]')
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, \
        processors
    from tokenizers import Tokenizer as FastTokenizer
    proto = sentencepiece_proto(tokenizer)
    pieces = list(proto.pieces)
    ids = {p.piece: i for i, p in enumerate(pieces)}
    byte_fallback = proto.trainer_spec.byte_fallback
    added = []
    if proto.trainer_spec.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces],
                               unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
        # user-defined pieces score 0, above every learned piece, so the lattice keeps them whole
    elif proto.trainer_spec.model_type == _BPE:
        model = models.BPE(ids, _bpe_merges(pieces, ids), unk_token=pieces[UNK].piece,
                           fuse_unk=True, byte_fallback=byte_fallback)
        # BPE cannot build multi-character user-defined pieces from merges: match them first
        added = [AddedToken(p.piece, special=False, normalized=False) for p in pieces
                 if p.type == _USER_DEFINED and len(p.piece) > 1]
    else:
        raise ConversionError(f"tokenizer {tokenizer.source}: sentencepiece model type "
                              f"{proto.trainer_spec.model_type} has no Hugging Face equivalent; "
                              "export needs a unigram or bpe vocabulary")
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        charsmap = normalizers.Precompiled(spec.precompiled_charsmap)
        steps.append(charsmap)
        # sentencepiece shields user-defined pieces from its character map; tokenizers cannot
        rewritten = [p.piece for p in pieces if p.type == _USER_DEFINED
                     and charsmap.normalize_str(p.piece) != p.piece]
        if rewritten:
            raise ConversionError(
                f"tokenizer {tokenizer.source}: its normalization ({spec.name}) rewrites the "
                f"user-defined pieces {rewritten[:3]}, which tokenizer.json cannot reproduce; "
                "export needs a vocabulary trained with normalization_rule_name=identity (as "
                "Loom trains them) or without such pieces")
    if spec.remove_extra_whitespaces:
        # sentencepiece trims and squeezes spaces only (not newlines or tabs)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    fast = FastTokenizer(model)
    if bert:   # "[MASK]" in text is split off first; only the text's first piece gets the "▁"
        fast.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if spec.add_dummy_prefix else "never",
            split=False)
    else:
        steps += [normalizers.Prepend("▁")] * spec.add_dummy_prefix
        steps.append(normalizers.Replace(" ", "▁"))
    fast.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(content=" ", left=1, right=0)] if spec.add_dummy_prefix else []
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), *strip])
    specials = [p.piece for p in pieces if p.type in (_UNKNOWN, _CONTROL)]
    specials += list(BERT_PIECES) * bert
    fast.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    fast.add_tokens([token for token in added if token.content not in specials])
    if bert:
        cls, sep = (tokenizer.piece_id(p) for p in ("[CLS]", "[SEP]"))
        fast.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    elif eos:
        end = pieces[EOS].piece
        fast.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {end}:0", pair=f"$A:0 {end}:0 $B:1 {end}:1",
            special_tokens=[(end, EOS)])
    else:
        bos = pieces[BOS].piece
        fast.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, BOS)])
    return fast


def write(tokenizer: Tokenizer, out: Path, max_len: int, bert: bool = False,
          eos: bool = False) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Encoding adds BOS and not EOS, as Loom's documents and prompts start with BOS; with `bert`,
    [CLS] and [SEP] as BERT's inputs have them; with `eos`, EOS and not BOS, as Loom's (and
    T5's) encoder inputs end with EOS.
    """
    try:
        fast = fast_tokenizer(tokenizer, bert, eos)
    except ImportError as e:
        raise DependencyError("exporting a tokenizer needs the `tokenizers` package: "
                              "pip install -e '.[hf]'") from e
    pieces = sentencepiece_proto(tokenizer).pieces
    tokenizer.save(out / MODEL_FILE)
    fast.save(str(out / TOKENIZER_JSON))
    names = {f"{role}_token": pieces[i].piece
             for role, i in (("bos", BOS), ("eos", EOS), ("unk", UNK), ("pad", PAD))}
    if bert:
        names.update(zip(("cls_token", "sep_token", "mask_token"), BERT_PIECES))
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(names, indent=2))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=not (bert or eos),
                  add_eos_token=eos, clean_up_tokenization_spaces=False,
                  model_max_length=max_len, **names,
                  model_input_names=["input_ids", "token_type_ids", "attention_mask"] if bert
                  else ["input_ids", "attention_mask"])
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))


def read(hf_dir: Path) -> Tokenizer:
    """The sentencepiece vocabulary of a Hugging Face directory (its `tokenizer.model`)."""
    path = hf_dir / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{hf_dir} has no {MODEL_FILE}: Loom trains and reads sentencepiece vocabularies "
            "only, so import needs the checkpoint's sentencepiece model (byte-level BPE "
            "vocabularies such as GPT-2's vocab.json/merges.txt cannot be used)")
    try:
        return Tokenizer.load(path)
    except DataError:
        raise CheckpointError(f"{path} is not a sentencepiece model") from None
