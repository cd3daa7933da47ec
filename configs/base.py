"""Every config key Loom knows, with its default and a one-line meaning.

Experiment files (`configs/*.py`) start from `get_config()` here and change a few fields.
`python -m train --help` prints the table in `HELP`, so a key without a line there is a bug.
"""
from ml_collections import ConfigDict

# Logical axis name -> mesh axes. Parameters use the plain names, activations the `act_` ones,
# so that `batch` (on data+fsdp) never collides with a parameter's fsdp-sharded `embed` axis.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
    ("type_vocab", None),
    ("embed_out", None),   # output side of a D x D' head or projection (pooler, MLM transform)
    ("seq", "sequence"),   # activations split along the length (sequence parallelism)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

HELP = {
    "model.family": "decoder (causal LM) | encoder (BERT: MLM, NSP/SOP) | encoder_decoder (T5) "
                    "| electra (generator + discriminator) | xlnet (two-stream permutation LM)",
    "model.vocab_size": "vocabulary size; 0 = take it from the tokenizer",
    "model.d_model": "residual stream width (D)",
    "model.n_heads": "query heads (H)",
    "model.n_kv_heads": "key/value heads for GQA/MQA; 0 = n_heads (plain multi-head)",
    "model.head_dim": "per-head width (K); 0 = d_model // n_heads",
    "model.n_layers": "transformer blocks",
    "model.d_ff": "MLP hidden width (F)",
    "model.mlp": "swiglu | gelu (tanh approximation) | gelu_exact (erf: BERT's, RoBERTa's) | "
                 "geglu (T5 v1.1 gated-gelu: gelu(x W0) * x W1) | relu (T5 1.0)",
    "model.norm": "rmsnorm | layernorm (pre-norm blocks unless model.post_norm)",
    "model.norm_eps": "epsilon of the norms",
    "model.pos": "rope | learned | sinusoidal | relative_bias (encoder_decoder: T5's bucketed "
                 "relative position bias, one table per stack shared by its layers)",
    "model.rope_theta": "RoPE base frequency",
    "model.max_len": "longest sequence the position scheme supports",
    "model.tie_embeddings": "share the input embedding with the output projection",
    "model.use_bias": "biases in dense layers",
    "model.dropout": "dropout rate on embeddings and residual branches",
    "model.dtype": "compute dtype: bfloat16 | float32 | float16",
    "model.param_dtype": "parameter (and optimizer state) dtype",
    "model.scan_layers": "stack blocks with nn.scan (compile time independent of depth)",
    "model.remat": "rematerialisation: none | full | dots | minimal",
    "model.attention": "attention kernel: auto (cudnn on GPU, else xla) | xla | cudnn",
    "model.cudnn_segments": "packed segments on cuDNN: lengths (cuDNN's packed layout, from "
                            "segment lengths and offsets) | mask (a dense T x T mask)",
    "model.init_std": "stddev of the normal initialiser of dense and embedding weights",
    "model.type_vocab_size": "encoder/electra: token-type (sentence A/B) embeddings; 0 = none",
    "model.post_norm": "post-LN blocks, norm(x + f(x)), instead of pre-norm, in every family: "
                       "BERT's (exact HF BERT) and the original Transformer's (decoder, "
                       "encoder_decoder; no final norm); needs learning-rate warmup "
                       "(opt.warmup_steps) or it diverges",
    "model.n_decoder_layers": "encoder_decoder: decoder blocks (n_layers counts the encoder's); "
                              "0 = n_layers",
    "model.generator_scale": "electra: generator d_model/heads/d_ff as a fraction of the "
                             "discriminator's (paper: 1/4 to 1/2)",
    # T5 as published (model/relative.py)
    "model.rel_buckets": "relative_bias: buckets of relative distance (T5: 32)",
    "model.rel_max_distance": "relative_bias: distance from which all offsets share the last "
                              "bucket (T5: 128)",
    "model.qk_scale": "divide attention logits by sqrt(head size); False = T5 (the factor is "
                      "folded into the query's init)",
    "model.scale_decoder_output": "encoder_decoder: multiply the decoder output by "
                                  "d_model^-0.5 before the output projection (T5 1.0, tied)",
    "model.embed_dim": "encoder (ALBERT): embeddings of this width E, projected up to d_model "
                       "(the MLM head projects back to E); 0 = d_model, no projection",
    "model.share_layers": "encoder (ALBERT): one block's parameters applied n_layers times "
                          "(compute still n_layers blocks); with or without scan_layers, remat",
    "data.source": "python_stdlib (offline corpus) | text_files (data.paths) | tfds "
                   "(data.tfds_name) | task_files (labelled JSONL/CoNLL, data.paths) | stdlib_task "
                   "(data.task.derived)",
    "data.paths": "globs of .txt/.jsonl/source files for source=text_files",
    "data.tfds_name": "name of a tfds dataset prepared in data.data_dir, for source=tfds",
    "data.text_field": "feature holding the text (tfds datasets, .jsonl files)",
    "data.mixture": "((spec, weight), ...) mixed by weight instead of data.source; spec = "
                    "python_stdlib | text_files:<glob> | tfds:<name>",
    "data.data_dir": "tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets",
    "data.train_split": "split to train on (tfds split syntax, e.g. train[:90%])",
    "data.eval_split": "split to evaluate on",
    "data.validation_percent": "local corpora: percent of documents (by content hash) held out",
    "data.max_docs": "local corpora: keep at most this many documents; 0 = all",
    "data.seq_len": "tokens per training sequence (T; the encoder length of encoder-decoders)",
    "data.target_len": "decoder length (S) of span_corruption/prefix_lm/denoise; 0 = derived "
                       "/ seq_len",
    "data.batch_size": "global batch size in sequences (B), across all devices and hosts",
    "data.packing": "pack several examples into each row (segment ids keep them apart) vs pad",
    "data.shuffle_seed": "seed of the document and row shuffles and of all masking choices",
    "data.interleave": "documents read at once, so a batch mixes pieces of many documents",
    "data.shuffle_window": "rows shuffled together after packing; 1 = no row shuffle",
    "data.num_epochs": "passes over the training data; 0 = repeat forever, N = the run stops "
                       "cleanly (checkpoint + eval) when the N-th pass ends",
    "data.worker_count": "grain worker processes for the train pipeline; 0 = in-process",
    "data.clean.normalize": "Unicode normal form applied to every document: NFC | NFKC | '' (none)",
    "data.clean.strip_control": "remove control characters (keeps tab and newline; CRLF -> LF)",
    "data.clean.collapse_whitespace": "collapse runs of spaces and blank lines (not for code)",
    "data.clean.min_chars": "drop documents shorter than this (after cleaning); 1 = drop empty",
    "data.clean.max_chars": "drop documents longer than this; 0 = no limit",
    "data.clean.dedup": "drop exact duplicate documents (by content hash) within a split",
    "data.mlm.rate": "mlm/electra: share of text tokens selected for prediction",
    "data.mlm.mask_fraction": "mlm/electra: share of selected tokens replaced by [MASK]",
    "data.mlm.random_fraction": "mlm/electra: share of selected tokens replaced by a random "
                                "piece (the rest stay unchanged)",
    "data.mlm.whole_word": "mlm/electra: select whole words (all pieces of a word or none)",
    "data.mlm.sentence_pairs": "mlm: none | nsp (50% random next) | sop (50% swapped order)",
    "data.spans.noise_density": "span_corruption: share of tokens hidden in spans",
    "data.spans.mean_length": "span_corruption: mean length of a hidden span",
    # BART-style denoising (data/noise.py); the three token rates are shares of a chunk's tokens
    "data.noise.mask_rate": "denoise: share of tokens replaced by [MASK] (token masking)",
    "data.noise.delete_rate": "denoise: share of tokens removed (token deletion)",
    "data.noise.infill_rate": "denoise: share of tokens hidden in spans, each span (Poisson "
                              "lengths) replaced by one [MASK] (text infilling)",
    "data.noise.infill_lambda": "denoise: mean (Poisson lambda) of infilled span lengths; a "
                                "zero-length span inserts a [MASK]",
    "data.noise.permute_rate": "denoise: share of a chunk's sentences shuffled among their "
                               "places (sentence permutation; 1 = all)",
    "data.noise.rotate_rate": "denoise: probability that a chunk is rotated to start at a "
                              "random token (document rotation)",
    "data.plm.predict_ratio": "plm (XLNet): share of each factorisation order predicted, its "
                              "last 1/K (K = 6: 1/6)",
    "data.eval_paths": "explicit evaluation files (globs) for source=task_files; empty = carve "
                       "validation from data.paths by hash (data.validation_percent)",
    "data.task.derived": "source=stdlib_task: docstring_package (classify) | token_types (tag) | "
                         "signature (text2text), derived from the Python standard library",
    "data.task.labels": "classify/tag: the label set in id order; () = built from the train "
                        "split (sorted) and stored in the run's config",
    "data.task.layout": "task rows: auto (from model.family) | cls ([CLS] text [SEP]) | causal "
                        "([BOS] text; input then target) | seq2seq (input to the encoder)",
    "data.tokenizer.path": "sentencepiece .model file; '' = train one on the train split",
    "data.tokenizer.vocab_size": "vocabulary size when training a tokenizer",
    "data.tokenizer.model_type": "unigram | bpe, when training a tokenizer",
    "data.tokenizer.sample_chars": "characters sampled from the train split to train it",
    "data.tokenizer.character_coverage": "share of characters kept whole when training it "
                                         "(1.0 for CJK); the rest fall back to bytes",
    "data.tokenizer.fingerprint": "the vocabulary's fingerprint; '' = the tokenizer's (recorded "
                                  "in checkpoints: resuming with another vocabulary fails)",
    "mesh.data": "data-parallel mesh axis size; -1 = fill with the remaining devices",
    "mesh.fsdp": "fully-sharded data-parallel axis size; -1 = fill",
    "mesh.sequence": "sequence (context) parallel axis size: activations split along the length, "
                     "K/V all-gathered for attention; data.seq_len must divide by it; -1 = fill",
    "mesh.tensor": "tensor-parallel axis size; -1 = fill",
    "mesh.rules": "logical axis name -> mesh axis (or tuple of axes, or None) table",
    "opt.lr": "peak learning rate",
    "opt.schedule": "cosine | linear | constant (after linear warmup)",
    "opt.warmup_steps": "linear warmup steps from 0 to opt.lr",
    "opt.min_lr_ratio": "final learning rate as a fraction of opt.lr",
    "opt.b1": "AdamW beta1",
    "opt.b2": "AdamW beta2",
    "opt.eps": "AdamW epsilon",
    "opt.weight_decay": "decoupled weight decay (norm scales, biases and positions exempt)",
    "opt.clip_norm": "global gradient norm clip; 0 = off",
    "opt.grad_accum": "micro-batches per optimizer step (data.batch_size is split in this many)",
    "train.steps": "optimizer steps in the whole run",
    "train.seed": "seed of parameter init and dropout",
    "train.objective": "clm (decoder) | mlm (encoder; + NSP/SOP given sentence pairs) | electra "
                       "(electra) | span_corruption, prefix_lm, denoise (encoder_decoder) | plm "
                       "(xlnet: permutation LM) | tasks: classify, tag (any family), text2text "
                       "(decoder, encoder_decoder)",
    "train.z_loss": "coefficient of the log(Z)^2 auxiliary loss; 0 = off",
    "train.pair_weight": "mlm: weight (lambda) of the NSP/SOP loss added to the MLM loss",
    "train.discriminator_weight": "electra: weight (lambda) of the discriminator loss added to "
                                  "the generator's (paper: 50)",
    "train.log_every": "steps between metric logs",
    "train.peak_tflops": "device peak TFLOP/s for MFU; 0 = look up a known accelerator",
    "train.nonfinite": "a NaN/Inf loss or gradient norm: halt (stop, naming the step and the "
                       "last good checkpoint) | skip (leave params and optimizer state unchanged, "
                       "counted as skipped_steps)",
    "train.preempt_grace_s": "SIGTERM/SIGINT: seconds to finish the step in flight and "
                             "checkpoint it before giving up (the scheduler's grace period)",
    "eval.every": "steps between evaluations on data.eval_split; 0 = only at the end",
    "eval.steps": "batches per evaluation",
    "eval.sample_prompt": "prompt of the text sample printed after training; '' = none",
    "eval.sample_tokens": "tokens generated for that sample",
    "eval.sample_temperature": "sampling temperature for that sample; 0 = greedy",
    "finetune.init_from": "backbone to start from: a Loom run dir (latest), DIR@best, DIR@STEP, "
                          "or a Hugging Face dir (as train.export from-hf); '' = from scratch",
    "finetune.mode": "full | frozen (backbone frozen, head trains; no optimizer state for it) | "
                     "lora (low-rank adapters on finetune.lora_targets + the head train) | "
                     "prompt (soft prompt + head train, the whole backbone frozen)",
    "finetune.prompt_length": "prompt: trained vectors read before every input (classify, tag)",
    "finetune.lora_rank": "lora: rank r of each adapter",
    "finetune.lora_alpha": "lora: the adapters' update is scaled by alpha / r",
    "finetune.lora_dropout": "lora: dropout on each adapter branch's input (training only); the "
                             "frozen product x W sees none",
    "finetune.lora_targets": "lora: names of the projections adapted (query, key, value, out, "
                             "wi, wo)",
    "finetune.unfreeze_after": "frozen for this many steps, then the whole model trains; 0 = off",
    "finetune.unfreeze_every": "gradual unfreezing: the top block (and final norm) unfreezes at "
                               "K steps, one more block below every K steps, embeddings last; "
                               "0 = off",
    "finetune.layer_lr_decay": "layer-wise LR decay: block l of L gets lr*decay^(L-l), embeddings "
                               "decay^L, head and final norm lr; 1 = off",
    "finetune.head_dropout": "dropout before the classification/tagging head",
    "finetune.metric": "validation metric for keep-best and early stopping: loss | accuracy | "
                       "macro_f1 | f1 | exact_match | bleu | chrf | rougeL; '' = the task's "
                       "default (accuracy, f1, chrf)",
    "finetune.patience": "early stopping: evaluations without improvement of finetune.metric "
                         "before the run stops; 0 = off",
    "finetune.eval_examples": "examples scored for the task metrics at each eval; 0 = all",
    "finetune.max_new_tokens": "text2text: tokens generated per example when scoring",
    # quantization (model/quant.py, train.compress quantize)
    "quant.mode": "none | qat (quantization-aware training: fake-quantized matmuls, straight-"
                  "through gradients, float weights) | ptq (set by train.compress quantize: the "
                  "checkpoint holds int weights and their scales)",
    "quant.weights": "int8 | int4: weight type of every dense projection, per-output-channel "
                     "absmax scales (embeddings and norms stay float)",
    "quant.activations": "'' (weights only) | int8: the projections' inputs too, int8 x int8 "
                         "matmuls; scales per token at run time, or static ones (below)",
    "quant.calibration_batches": "ptq with int8 activations: 0 = per-token scales computed at "
                                 "run time; N = one static scale per projection (and block), "
                                 "the input absmax over N train batches at quantization",
    # knowledge distillation (train/distill/)
    "distill.teacher": "teacher run to distil from: a Loom run dir (latest), DIR@best or "
                       "DIR@STEP, trained with the same train.objective and vocabulary; its "
                       "params are restored frozen onto this run's mesh; '' = no distillation",
    "distill.alpha": "weight of the soft loss T^2 * KL(teacher || student) at temperature T; "
                     "the hard-label loss gets 1 - alpha",
    "distill.temperature": "temperature T that softens both distributions of the soft loss",
    "distill.teacher_checkpoint": "set when the run starts: the teacher's checkpoint as "
                                  "ABSOLUTE_DIR@STEP (a resumed run must find the same one)",
    "ckpt.every": "steps between checkpoints; 0 = only at the end",
    "ckpt.keep": "most recent checkpoints kept",
    "ckpt.keep_best": "checkpoints with the lowest eval loss kept besides those",
    "ckpt.async_save": "write checkpoints in the background while training continues",
}

# Pruning (train/pruning.py): magnitude masks of the blocks' attention and MLP kernels, kept in
# the optimizer state, so checkpoints and resume carry them; pruned weights stay exactly zero.
HELP.update({
    "prune.target": "fraction of the blocks' attention/MLP kernel weights pruned by magnitude, "
                    "reached at prune.end; 0 = off (an N:M pattern: 1 - N/M, e.g. 0.5 for 2:4)",
    "prune.pattern": "unstructured | N:M (N kept of every M consecutive weights along the "
                     "kernel's input dimension, the 2:4 sparse tensor core layout)",
    "prune.scope": "unstructured: layer (each kernel of each layer to the same sparsity) | "
                   "global (one magnitude threshold over all pruned kernels)",
    "prune.start": "step of the first mask update (sparsity 0 before)",
    "prune.end": "step the sparsity reaches prune.target (cubic ramp from start, Zhu & Gupta); "
                 "start = end: prune once at that step",
    "prune.every": "steps between mask updates from prune.start to prune.end",
})


def get_config() -> ConfigDict:
    """Defaults: a GPT-style decoder with Llama-style blocks, sized like the 125M preset."""
    c = ConfigDict()
    c.model = ConfigDict(dict(
        family="decoder", vocab_size=0, d_model=768, n_heads=12, n_kv_heads=0, head_dim=0,
        n_layers=12, d_ff=2048, mlp="swiglu", norm="rmsnorm", norm_eps=1e-6, pos="rope",
        rope_theta=10000.0, max_len=2048, tie_embeddings=True, use_bias=False, dropout=0.0,
        dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="none",
        attention="auto", init_std=0.02, type_vocab_size=2, post_norm=False,
        n_decoder_layers=0, generator_scale=0.25,
        cudnn_segments="lengths",
    ))
    c.model.update(rel_buckets=32, rel_max_distance=128, qk_scale=True,   # T5 (model/relative.py)
                   scale_decoder_output=False)
    c.model.update(embed_dim=0, share_layers=False)   # ALBERT (encoder family)
    c.data = ConfigDict(dict(
        source="python_stdlib", paths=(), tfds_name="", text_field="text", mixture=(),
        data_dir="", train_split="train", eval_split="validation", validation_percent=2.0,
        max_docs=0, eval_paths=(), seq_len=1024, target_len=0, batch_size=32, packing=True,
        shuffle_seed=0, interleave=64, shuffle_window=1024, num_epochs=0, worker_count=0,
        clean=ConfigDict(dict(normalize="NFC", strip_control=True, collapse_whitespace=False,
                              min_chars=1, max_chars=0, dedup=True)),
        mlm=ConfigDict(dict(rate=0.15, mask_fraction=0.8, random_fraction=0.1, whole_word=False,
                            sentence_pairs="none")),
        spans=ConfigDict(dict(noise_density=0.15, mean_length=3.0)),
        noise=ConfigDict(dict(mask_rate=0.0, delete_rate=0.0, infill_rate=0.3,
                              infill_lambda=3.0, permute_rate=1.0, rotate_rate=0.0)),
        plm=ConfigDict(dict(predict_ratio=1 / 6)),   # XLNet permutation LM (data/plm.py)
        task=ConfigDict(dict(derived="docstring_package", labels=(), layout="auto")),
        tokenizer=ConfigDict(dict(path="", vocab_size=8192, model_type="unigram",
                                  sample_chars=5_000_000, character_coverage=0.9995,
                                  fingerprint="")),
    ))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1, rules=DEFAULT_RULES))
    c.opt = ConfigDict(dict(
        lr=3e-4, schedule="cosine", warmup_steps=200, min_lr_ratio=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum=1,
    ))
    c.train = ConfigDict(dict(
        steps=10_000, seed=0, objective="clm", z_loss=0.0, log_every=50, peak_tflops=0.0,
    ))
    c.train.update(nonfinite="halt", preempt_grace_s=30.0)   # surviving faults (train/preempt.py)
    c.train.update(pair_weight=1.0, discriminator_weight=50.0)   # loss weights (objectives.py)
    c.eval = ConfigDict(dict(
        every=1000, steps=20, sample_prompt="def ", sample_tokens=64, sample_temperature=0.7,
    ))
    c.finetune = ConfigDict(dict(
        init_from="", mode="full", prompt_length=16, lora_rank=8, lora_alpha=16.0,
        lora_dropout=0.0, lora_targets=("query", "value"), unfreeze_after=0, unfreeze_every=0,
        layer_lr_decay=1.0, head_dropout=0.1, metric="", patience=0, eval_examples=0,
        max_new_tokens=32,
    ))
    c.quant = ConfigDict(dict(mode="none", weights="int8", activations="",
                              calibration_batches=0))
    c.distill = ConfigDict(dict(teacher="", alpha=0.5, temperature=2.0, teacher_checkpoint=""))
    c.ckpt = ConfigDict(dict(every=1000, keep=3, keep_best=1, async_save=True))
    c.prune = ConfigDict(dict(target=0.0, pattern="unstructured", scope="layer", start=0, end=0,
                              every=100))
    return c
