"""Multi30k English→German for the examples: an offline loader and a word tokenizer.

Where the files come from: ``data_dir`` passed to :func:`load_multi30k`
(``--data-dir`` in scripts), else ``$TF_GRADMIX_DATA`` (the search of
``examples/data.py``).

A data directory holds ``multi30k/{train,val,test}.{en,de}`` (or those files
directly): one untokenized UTF-8 sentence a line, aligned by line (Multi30k
task 1, Elliott et al., 2016; ``test`` is the 2016 Flickr test set). The
files are read in place. There is no download fallback (the data is not in
TensorFlow Datasets); get the files from https://github.com/multi30k/dataset.

Validation: ``val.{en,de}`` (1,014 pairs) when the folder has them
(``val_source="auto"`` or ``"file"``); otherwise, or with
``val_source="holdout"``, ``val_size`` pairs held out of the training set
(fixed by ``seed``), and the training set shrinks by as many.

Tokenizer: lowercase, then words and single punctuation marks
(``\\w+|[^\\w\\s]``); a vocabulary per language built from the *training*
split only (ids: 0 padding, 1 unknown, 2 start, 3 end, then by frequency).

Example::

    data = load_multi30k()
    src_vocab = Vocab.build(data["train"][0]); tgt_vocab = Vocab.build(data["train"][1])
    train = encode_pairs(*data["train"], src_vocab, tgt_vocab, max_len=40)
    dataset = make_dataset(*train, batch_size=64, training=True)
"""

import collections
import re
from pathlib import Path

import numpy as np

from examples import data

__all__ = [
    "PAD", "UNK", "BOS", "EOS", "find_multi30k", "load_multi30k", "tokenize",
    "Vocab", "encode_pairs", "make_dataset",
]

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _folder_in(directory):
    directory = Path(directory).expanduser()
    for base in (directory / "multi30k", directory):
        if (base / "train.en").is_file() and (base / "train.de").is_file():
            return base
    return None


def find_multi30k(data_dir=None):
    """The folder with ``train.en``/``train.de``, or ``None`` if there is none.

    Raises:
        FileNotFoundError: ``data_dir`` or ``$TF_GRADMIX_DATA`` is set but
            holds no Multi30k files.
    """
    return data.find(
        data_dir, _folder_in, "Multi30k files", "multi30k/train.en and multi30k/train.de (or those files directly)"
    )


def _read(folder, split):
    src = (folder / f"{split}.en").read_text(encoding="utf-8").splitlines()
    tgt = (folder / f"{split}.de").read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise ValueError(f"{folder}/{split}.en has {len(src)} lines, {split}.de {len(tgt)}.")
    return src, tgt


def load_multi30k(data_dir=None, val_source="auto", val_size=1000, seed=0):
    """Multi30k En→De sentence pairs.

    Args:
        data_dir: see the module docstring.
        val_source: ``"auto"`` (the ``val`` files if present, else a
            hold-out), ``"file"`` or ``"holdout"``.
        val_size: pairs held out of the training set for ``"holdout"``.
        seed: seed of the hold-out.

    Returns:
        ``{"train": (en, de), "val": (en, de), "test": (en, de),
        "val_source": "file" | "holdout", "folder": Path}``, lists of
        strings.
    """
    folder = find_multi30k(data_dir)
    if folder is None:
        raise FileNotFoundError(
            "No Multi30k copy found: pass --data-dir or set TF_GRADMIX_DATA to a folder with "
            "multi30k/{train,val,test}.{en,de} (files: https://github.com/multi30k/dataset)."
        )
    if val_source not in ("auto", "file", "holdout"):
        raise ValueError(f"Invalid value for argument `val_source`: {val_source!r}.")
    train = _read(folder, "train")
    test = _read(folder, "test")
    has_val = (folder / "val.en").is_file() and (folder / "val.de").is_file()
    if val_source == "file" and not has_val:
        raise FileNotFoundError(f"val_source='file' but {folder} has no val.en/val.de.")
    if val_source in ("auto", "file") and has_val:
        val, used = _read(folder, "val"), "file"
    else:
        order = np.random.default_rng(seed).permutation(len(train[0]))
        held, kept = np.sort(order[:val_size]), np.sort(order[val_size:])
        val = ([train[0][i] for i in held], [train[1][i] for i in held])
        train = ([train[0][i] for i in kept], [train[1][i] for i in kept])
        used = "holdout"
    return {"train": train, "val": val, "test": test, "val_source": used, "folder": folder}


def tokenize(sentence):
    """Lowercased words and punctuation marks of ``sentence``."""
    return _TOKEN.findall(sentence.lower())


class Vocab:
    """A word vocabulary: ids 0-3 are padding, unknown, start and end."""

    def __init__(self, words):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, sentences, max_size=10000, min_count=2):
        """The ``max_size`` most frequent tokens seen at least ``min_count`` times."""
        counts = collections.Counter(t for s in sentences for t in tokenize(s))
        common = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= min_count]
        return cls(common[: max(0, max_size - len(SPECIALS))])

    def __len__(self):
        return len(self.words)

    def encode(self, sentence):
        return [self.index.get(t, UNK) for t in tokenize(sentence)]

    def decode(self, ids):
        """Tokens joined by spaces, up to the first end token."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self.words[i] if i < len(self.words) else SPECIALS[UNK])
        return " ".join(words)


def encode_pairs(src, tgt, src_vocab, tgt_vocab, max_len=40):
    """Padded id arrays ``(src [N, max_len], tgt_in [N, max_len+1], tgt_out [N, max_len+1])``.

    ``tgt_in`` is ``<s>`` + target, ``tgt_out`` is target + ``</s>`` (the
    decoder predicts the next token). Longer sentences are truncated.
    """
    n = len(src)
    src_ids = np.zeros((n, max_len), np.int32)
    tgt_in = np.zeros((n, max_len + 1), np.int32)
    tgt_out = np.zeros((n, max_len + 1), np.int32)
    for i, (s, t) in enumerate(zip(src, tgt)):
        s_ids = src_vocab.encode(s)[:max_len]
        t_ids = tgt_vocab.encode(t)[:max_len]
        src_ids[i, : len(s_ids)] = s_ids
        tgt_in[i, : len(t_ids) + 1] = [BOS] + t_ids
        tgt_out[i, : len(t_ids) + 1] = t_ids + [EOS]
    return src_ids, tgt_in, tgt_out


def make_dataset(src_ids, tgt_in, tgt_out, batch_size, training, seed=0):
    """``((src, tgt_in), tgt_out)`` batches, trimmed to each batch's longest sentence.

    Training shuffles (seeded, reshuffled each epoch) and drops the last
    partial batch; evaluation keeps the order and every pair.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(((src_ids, tgt_in), tgt_out))
    if training:
        dataset = dataset.shuffle(len(src_ids), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=training)

    def trim(inputs, target):
        src, dec = inputs
        s_len = tf.reduce_max(tf.reduce_sum(tf.cast(src != PAD, tf.int32), axis=1))
        t_len = tf.reduce_max(tf.reduce_sum(tf.cast(target != PAD, tf.int32), axis=1))
        s_len, t_len = tf.maximum(s_len, 1), tf.maximum(t_len, 1)
        return (src[:, :s_len], dec[:, :t_len]), target[:, :t_len]

    return dataset.map(trim, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
