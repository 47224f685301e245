"""The paper's Transformer experiment: Multi30k En→De with Adam or LAMB and GradientMix.

The GradientMix paper (Figure 3) trains a Transformer encoder-decoder on
Multi30k English→German with Adam and LAMB at growing batch sizes, with the
inverse-square-root schedule and 4000 warmup steps at batch 64 scaled to
``4000 * 64 / B``. This script runs that setup in plain Keras 3 (no
keras-hub):

* data: ``examples/multi30k.py`` reads ``train/val/test.{en,de}`` in place
  from ``--data-dir`` or ``$TF_GRADMIX_DATA`` (a folder holding ``multi30k/``).
  Validation is the official ``val`` split when present, else
  (``--val-source holdout``) ``--val-size`` pairs held out of the training
  set; the choice is printed and stored in the result. Word-level tokenizer
  (lowercase, words and punctuation) with vocabularies built from the
  training split;
* model: pre-LayerNorm Transformer (Vaswani et al., 2017, with the
  LayerNorm before each sub-layer and a final one, which trains more stably
  at large learning rates), sinusoidal positions, ``--size base`` (6+6
  layers, d_model 512, 8 heads, FFN 2048) or ``--size small`` (3+3, 256, 4,
  1024; for CPUs), each setting overridable;
* optimizer: ``--optimizer adam`` (beta_2 0.98, epsilon 1e-9, Vaswani et
  al.) or ``lamb`` (``tf_gradmix.optimizers.LAMB``), schedule
  ``tf_gradmix.schedules.InverseSqrtWarmup`` with
  ``tf_gradmix.schedules.inverse_sqrt_warmup_steps(B)`` warmup steps and, by
  default, Vaswani's peak ``d_model^-0.5 * warmup^-0.5`` (which scales with
  ``sqrt(B)`` since the warmup shrinks as ``1/B``);
* GradientMix at the sample level with whole sentences as units (all tokens
  of a sentence share its weight); the loss is the token cross-entropy
  averaged over the non-padding tokens (``ignore_class=0``), which
  ``tf_gradmix.Model`` mixes exactly (it never normalises by the weights);
* reports: validation token accuracy (teacher forcing, padding excluded) and
  BLEU of greedy decoding with sacrebleu (13a tokenization, lowercased,
  since the vocabulary is lowercase) on validation and test; nothing is
  chosen on the test split.

Examples::

    python -m examples.multi30k_transformer --size base --batch-size 2048 \\
        --optimizer lamb --noise gaussian --stddev 1
    python -m examples.multi30k_transformer --size small --epochs 10   # CPU
    python -m examples.multi30k_transformer --quick                    # smoke test

The flags are the fields of :class:`Config`; from Python,
``run(Config(size="small", epochs=10))`` trains the same run and returns the
result dict.
"""

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples import data, mixing, multi30k, results, threads  # noqa: E402
from examples.config import check_choices, config_from_argv, flag_of, option, values_of  # noqa: E402

SIZES = {
    # layers (encoder = decoder), d_model, heads, FFN width, dropout
    "base": dict(layers=6, d_model=512, heads=8, ff=2048, dropout=0.1),
    "small": dict(layers=3, d_model=256, heads=4, ff=1024, dropout=0.1),
    "tiny": dict(layers=1, d_model=32, heads=2, ff=64, dropout=0.0),
}
VAL_SOURCES = ("auto", "file", "holdout")
OPTIMIZERS = ("adam", "lamb")
NOISES = ("none", "gaussian", "rademacher")


#: What ``--quick`` sets (it wins over the same flags given with it).
QUICK = dict(size="tiny", train_size=256, batch_size=32, epochs=2, max_len=20, bleu_size=16, vocab_size=2000)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of the trainer; each field is the flag ``--field-name`` (``--quick`` also ``--no-quick``)."""

    data_dir: Optional[str] = data.data_dir_field("folder with multi30k/")
    val_source: str = option("auto", choices=VAL_SOURCES, help="official val files, or a hold-out of the "
                             "training set", group="data")
    val_size: int = option(1000, help="pairs held out of training with --val-source holdout", group="data")
    train_size: Optional[int] = option(None, help="use only the first N training pairs (after any hold-out)",
                                       group="data")
    max_len: int = option(40, help="tokens per sentence (longer ones are truncated)", group="data")
    vocab_size: int = option(10000, group="data")
    min_count: int = option(2, group="data")
    size: str = option("small", choices=tuple(SIZES), group="model")
    layers: Optional[int] = option(None, help="override the --size value", group="model")
    d_model: Optional[int] = option(None, help="override the --size value", group="model")
    heads: Optional[int] = option(None, help="override the --size value", group="model")
    ff: Optional[int] = option(None, help="override the --size value", group="model")
    dropout: Optional[float] = option(None, help="override the --size value", group="model")
    optimizer: str = option("adam", choices=OPTIMIZERS, group="optimization")
    batch_size: int = option(64, help="sentences per step", group="optimization")
    epochs: int = option(10, group="optimization")
    lr: Optional[float] = option(None, help="peak learning rate (default d_model^-0.5 * warmup^-0.5)",
                                 group="optimization")
    warmup_steps: Optional[int] = option(None, help="default round(4000 * 64 / B)", group="optimization")
    weight_decay: float = option(0.0, help="LAMB's coupled weight decay", group="optimization")
    clipnorm: Optional[float] = option(None, group="optimization")
    noise: str = option("none", choices=NOISES, group="GradientMix")
    stddev: float = option(1.0, help="unused with --noise none", group="GradientMix")
    noise_batch_size: Optional[int] = option(None, help="instead of --stddev: sqrt(B / this - 1)",
                                             group="GradientMix")
    seed: int = option(0, group="run")
    bleu_size: Optional[int] = option(None, help="sentences decoded for BLEU per split (default: all)", group="run")
    out: Optional[str] = option(None, help="default runs/multi30k_transformer/<name>", affects_result=False,
                                group="run")
    json_out: Optional[str] = option(None, help="where to write the result (default <out>/result.json)",
                                     affects_result=False, group="run")
    threads: Optional[int] = threads.threads_field()
    verbose: Optional[int] = option(None, choices=(0, 1, 2), help="Keras fit verbosity (default: 1 on a "
                                    "terminal, else 2)", affects_result=False, group="run")
    quick: bool = option(False, help="tiny settings for a smoke test", group="run")

    def __post_init__(self):
        check_choices(self)
        if self.quick:
            for name, value in QUICK.items():
                object.__setattr__(self, name, value)
        shape = architecture(self)
        for name in ("layers", "d_model", "heads", "ff"):
            if shape[name] <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {shape[name]}")
        if not 0.0 <= shape["dropout"] < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {shape['dropout']}")
        if shape["d_model"] % shape["heads"]:
            raise ValueError(f"--d-model must be a multiple of --heads, got {shape['d_model']} and {shape['heads']}")
        for name in ("batch_size", "epochs", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        mixing.check_mixing(self)


def parse_args(argv=None):
    """The :class:`Config` of a command line (``sys.argv[1:]`` by default)."""
    return config_from_argv(Config, sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])


def architecture(config):
    """``{layers, d_model, heads, ff, dropout}``: the ``--size`` values, each overridden by its flag if given."""
    return {key: value if getattr(config, key) is None else getattr(config, key)
            for key, value in SIZES[config.size].items()}


def run_name(config):
    noise = "plain" if config.noise == "none" else f"{config.noise}{mixing.mixing_stddev(config):.3g}"
    return f"multi30k_{config.size}_{config.optimizer}_b{config.batch_size}_e{config.epochs}_{noise}_s{config.seed}"


# --------------------------------------------------------------------------
# The Transformer


def build_model(config, src_vocab_size, tgt_vocab_size):
    """A functional encoder-decoder: ``(src ids, target-in ids) -> logits``."""
    import keras
    from keras import layers, ops

    import tf_gradmix as gm

    shape = architecture(config)
    d_model, heads, ff, dropout = shape["d_model"], shape["heads"], shape["ff"], shape["dropout"]

    class Embed(layers.Layer):
        """Token embedding times sqrt(d_model) plus sinusoidal positions."""

        def __init__(self, vocab_size, max_len, **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.max_len = vocab_size, max_len
            self.tokens = layers.Embedding(vocab_size, d_model)
            position = np.arange(max_len)[:, None]
            rate = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2) / d_model)
            table = np.zeros((max_len, d_model), np.float32)
            table[:, 0::2], table[:, 1::2] = np.sin(position * rate), np.cos(position * rate)
            self.table = table

        def call(self, ids):
            length = ops.shape(ids)[1]
            return self.tokens(ids) * math.sqrt(d_model) + ops.convert_to_tensor(self.table)[None, :length]

        def get_config(self):
            return {**super().get_config(), "vocab_size": self.vocab_size, "max_len": self.max_len}

    class NotPad(layers.Layer):
        def call(self, ids):
            return ops.not_equal(ids, multi30k.PAD)

    def feed_forward(x, name):
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(x)
        h = layers.Dense(ff, activation="relu", name=f"{name}_dense1")(h)
        h = layers.Dense(d_model, name=f"{name}_dense2")(h)
        return layers.Add(name=f"{name}_add")([x, layers.Dropout(dropout)(h)])

    def attention(x, context, mask, name, causal=False):
        h = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(x)
        kv = h if context is None else context
        h = layers.MultiHeadAttention(heads, d_model // heads, dropout=dropout, name=f"{name}_mha")(
            h, kv, attention_mask=mask, use_causal_mask=causal
        )
        return layers.Add(name=f"{name}_add")([x, layers.Dropout(dropout)(h)])

    src = keras.Input((None,), dtype="int32", name="source")
    tgt = keras.Input((None,), dtype="int32", name="target_in")
    # [B, 1, S]: every query may attend to the source's non-padding tokens.
    src_mask = layers.Reshape((1, -1), name="source_mask")(NotPad(name="source_valid")(src))
    x = layers.Dropout(dropout)(Embed(src_vocab_size, config.max_len + 1, name="source_embed")(src))
    for i in range(shape["layers"]):
        x = attention(x, None, src_mask, f"enc{i}_self")
        x = feed_forward(x, f"enc{i}_ff")
    memory = layers.LayerNormalization(epsilon=1e-6, name="enc_final_ln")(x)
    y = layers.Dropout(dropout)(Embed(tgt_vocab_size, config.max_len + 1, name="target_embed")(tgt))
    for i in range(shape["layers"]):
        # Causal self-attention: padding comes after the sentence, so a real
        # token never sees it; padded positions are excluded from the loss.
        y = attention(y, None, None, f"dec{i}_self", causal=True)
        y = attention(y, memory, src_mask, f"dec{i}_cross")
        y = feed_forward(y, f"dec{i}_ff")
    y = layers.LayerNormalization(epsilon=1e-6, name="dec_final_ln")(y)
    logits = layers.Dense(tgt_vocab_size, name="logits")(y)
    model_class = keras.Model if config.noise == "none" else gm.Model
    return model_class([src, tgt], logits, name="transformer")


def make_loss():
    """Token cross-entropy averaged over the non-padding target tokens.

    Under GradientMix (``gm.Model``) every token of sentence ``b`` is weighted
    by the sentence's ``w_b``: one weight per sentence.
    """
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=multi30k.PAD)


class MaskedTokenAccuracy:
    """Factory of a Keras metric: accuracy over the non-padding target tokens."""

    @staticmethod
    def create(name="token_acc"):
        import keras
        from keras import ops

        class _Metric(keras.metrics.Metric):
            def __init__(self, name=name, **kwargs):
                super().__init__(name=name, **kwargs)
                self.correct = self.add_variable((), initializer="zeros", name="correct")
                self.count = self.add_variable((), initializer="zeros", name="count")

            def update_state(self, y_true, y_pred, sample_weight=None):
                y_true = ops.cast(y_true, "int32")
                valid = ops.cast(ops.not_equal(y_true, multi30k.PAD), "float32")
                hit = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true), "float32")
                self.correct.assign_add(ops.sum(hit * valid))
                self.count.assign_add(ops.sum(valid))

            def result(self):
                return ops.divide_no_nan(self.correct, self.count)

            def reset_state(self):
                self.correct.assign(0.0)
                self.count.assign(0.0)

        return _Metric()


def build_optimizer(config):
    import keras

    import tf_gradmix as gm

    warmup = config.warmup_steps or gm.schedules.inverse_sqrt_warmup_steps(config.batch_size)
    peak = config.lr if config.lr is not None else architecture(config)["d_model"] ** -0.5 * warmup ** -0.5
    schedule = gm.schedules.InverseSqrtWarmup(peak, warmup)
    if config.optimizer == "adam":
        inner = keras.optimizers.Adam(schedule, beta_1=0.9, beta_2=0.98, epsilon=1e-9, clipnorm=config.clipnorm)
    else:
        inner = gm.optimizers.LAMB(
            schedule, weight_decay=config.weight_decay, exclude_1d_variables=True, clipnorm=config.clipnorm
        )
    optimizer = inner if config.noise == "none" else gm.GradientMix(
        inner, level="sample", noise=config.noise, stddev=mixing.mixing_stddev(config), seed=config.seed + 1
    )
    return optimizer, peak, warmup


# --------------------------------------------------------------------------
# Decoding and BLEU


def greedy_decode(model, src_ids, max_len, batch_size=256):
    """Greedy translations (id arrays) of ``src_ids`` [N, S]."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def next_tokens(src, tokens, t):
        logits = model([src, tokens], training=False)
        return tf.argmax(logits[:, t], axis=-1, output_type=tf.int32)

    outputs = []
    for start in range(0, len(src_ids), batch_size):
        src = tf.constant(src_ids[start : start + batch_size])
        tokens = np.zeros((src.shape[0], max_len + 1), np.int32)
        tokens[:, 0] = multi30k.BOS
        done = np.zeros(src.shape[0], bool)
        for t in range(max_len):
            nxt = next_tokens(src, tf.constant(tokens), tf.constant(t)).numpy()
            tokens[:, t + 1] = np.where(done, multi30k.PAD, nxt)
            done |= nxt == multi30k.EOS
            if done.all():
                break
        outputs.append(tokens[:, 1:])
    return np.concatenate(outputs)


def bleu(model, src_sentences, references, src_vocab, tgt_vocab, max_len, limit=None):
    """Corpus BLEU (sacrebleu, 13a, lowercased) of greedy decoding, and examples."""
    import sacrebleu

    if limit:
        src_sentences, references = src_sentences[:limit], references[:limit]
    src_ids = np.zeros((len(src_sentences), max_len), np.int32)
    for i, s in enumerate(src_sentences):
        ids = src_vocab.encode(s)[:max_len]
        src_ids[i, : len(ids)] = ids
    hypotheses = [tgt_vocab.decode(row) for row in greedy_decode(model, src_ids, max_len)]
    score = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="13a", lowercase=True)
    return float(score.score), list(zip(src_sentences[:3], hypotheses[:3], references[:3]))


# --------------------------------------------------------------------------
# Training


def run(config):
    """Trains once as ``config`` says; writes the result to ``--json-out`` and returns it (a JSON-ready dict)."""
    threads.limit_threads(config.threads)
    import keras

    import tf_gradmix as gm

    wall_start = time.perf_counter()
    out = Path(config.out or Path("runs") / "multi30k_transformer" / run_name(config))
    out.mkdir(parents=True, exist_ok=True)
    corpus = multi30k.load_multi30k(config.data_dir, config.val_source, config.val_size, config.seed)
    train_src, train_tgt = corpus["train"]
    if config.train_size:
        train_src, train_tgt = train_src[: config.train_size], train_tgt[: config.train_size]
    src_vocab = multi30k.Vocab.build(train_src, config.vocab_size, config.min_count)
    tgt_vocab = multi30k.Vocab.build(train_tgt, config.vocab_size, config.min_count)
    train = multi30k.encode_pairs(train_src, train_tgt, src_vocab, tgt_vocab, config.max_len)
    val = multi30k.encode_pairs(*corpus["val"], src_vocab, tgt_vocab, config.max_len)
    test = multi30k.encode_pairs(*corpus["test"], src_vocab, tgt_vocab, config.max_len)
    if len(train[0]) < config.batch_size:
        raise SystemExit(f"--batch-size {config.batch_size} exceeds the {len(train[0])} training pairs")
    steps_per_epoch = len(train[0]) // config.batch_size

    keras.utils.set_random_seed(config.seed)
    model = build_model(config, len(src_vocab), len(tgt_vocab))
    optimizer, peak, warmup = build_optimizer(config)
    model.compile(
        optimizer=optimizer,
        loss=make_loss(),
        metrics=[MaskedTokenAccuracy.create()],
    )
    print(
        f"Run {run_name(config)}: {len(train[0])} training pairs, validation "
        f"{len(val[0])} ({'official val files' if corpus['val_source'] == 'file' else 'held out of training'}), "
        f"test {len(test[0])}; vocab en {len(src_vocab)} de {len(tgt_vocab)}; "
        f"{model.count_params():,} parameters; {steps_per_epoch} steps/epoch x {config.epochs}; "
        f"{config.optimizer} peak LR {peak:.3g}, warmup {warmup} steps; noise {config.noise} "
        f"stddev {mixing.mixing_stddev(config):.4g}.",
        flush=True,
    )
    train_ds = multi30k.make_dataset(*train, config.batch_size, training=True, seed=config.seed)
    val_ds = multi30k.make_dataset(*val, 256, training=False)
    fit_start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=config.epochs, validation_data=val_ds, verbose=results.fit_verbose(config.verbose),
        shuffle=False,  # the dataset shuffles itself, seeded (Keras would warn)
        callbacks=[
            keras.callbacks.BackupAndRestore(str(out / "backup")),
            keras.callbacks.CSVLogger(str(out / "log.csv"), append=True),
        ],
    )
    fit_seconds = time.perf_counter() - fit_start
    val_logs = model.evaluate(val_ds, verbose=0, return_dict=True)
    test_logs = model.evaluate(multi30k.make_dataset(*test, 256, training=False), verbose=0, return_dict=True)
    val_bleu, examples = bleu(model, *corpus["val"], src_vocab, tgt_vocab, config.max_len, config.bleu_size)
    test_bleu, _ = bleu(model, *corpus["test"], src_vocab, tgt_vocab, config.max_len, config.bleu_size)
    logs = history.history
    gammas = logs.get(gm.model.GAMMA_METRIC)
    result = {
        "config": values_of(config),
        "name": run_name(config),
        "seed": config.seed,
        "val_source": corpus["val_source"],
        "train_pairs": len(train[0]),
        "val_pairs": len(val[0]),
        "test_pairs": len(test[0]),
        "parameters": int(model.count_params()),
        "steps": steps_per_epoch * config.epochs,
        "peak_learning_rate": peak,
        "warmup_steps": warmup,
        "stddev": mixing.mixing_stddev(config),
        "val_token_acc": float(val_logs["token_acc"]),
        "val_loss": float(val_logs["loss"]),
        "val_bleu": val_bleu,
        "test_token_acc": float(test_logs["token_acc"]),
        "test_loss": float(test_logs["loss"]),
        "test_bleu": test_bleu,
        "bleu_sentences": config.bleu_size,
        # The accuracy fields every sweep row has: token accuracies; train = the last epoch's running value,
        # in training mode (dropout on), not re-evaluated.
        "train_acc": float(logs["token_acc"][-1]) if logs.get("token_acc") else None,
        "train_loss": float(logs["loss"][-1]) if logs.get("loss") else None,
        "val_acc": float(val_logs["token_acc"]),
        "test_acc": float(test_logs["token_acc"]),
        "gamma_bar": float(np.mean(gammas)) if gammas else (1.0 if config.noise == "none" else None),
        "fit_seconds": fit_seconds,
        "history": {k: [float(v) for v in vals] for k, vals in logs.items()},
        "examples": examples,
    }
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_out = Path(config.json_out or out / "result.json")
    results.write_result(result, json_out)
    for src, hyp, ref in examples:
        print(f"  EN  {src}\n  OUT {hyp}\n  REF {ref}")
    print(
        f"Done {result['name']}: validation token accuracy {100 * result['val_token_acc']:.1f}%, "
        f"BLEU val {val_bleu:.2f} / test {test_bleu:.2f}, fit {fit_seconds:.0f} s. Result in {json_out}.",
        flush=True,
    )
    return result


def main(argv=None):
    """Trains the Transformer run of the command line ``argv``; prints its result last, as one JSON line."""
    return results.main(run, parse_args, argv)


if __name__ == "__main__":
    main()
