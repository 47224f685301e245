"""Smoke tests of the paper's examples and of the reproduction sweep.

* ``examples/cifar_train.py --quick`` and
  ``examples/multi30k_transformer.py --quick`` run a few steps on tiny
  settings (their ``main(argv)``, in process), on the real data in ``$TF_GRADMIX_DATA`` or
  ``../shared/data`` (skipped only when there is none; nothing downloads);
* ``examples/multi30k.py`` (loader, tokenizer, batches) in process;
* ``experiments/sweep.py`` (plan, resume, stddev chosen on validation) and
  ``experiments/plot.py`` on a synthetic results file, without training.
"""

import importlib
import json
import math

import numpy as np
import pytest

from examples import cifar10, cifar_train, mixing, multi30k
from experiments import plot, runner, sweep

import real_data

pytestmark = pytest.mark.backends("tensorflow")


def _run(module, capsys, *flags):
    """Runs ``python -m module`` with ``flags``, as the README says, in this process (its ``main(argv)``).

    In process: the script's logic is what is tested, and a new interpreter would import TensorFlow again.
    """
    capsys.readouterr()
    importlib.import_module(module).main(list(flags))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def multi30k_folder():
    folder = multi30k.find_multi30k()
    if folder is None:
        real_data.missing("Multi30k")
    return folder


# --------------------------------------------------------------------------
# examples/cifar_train.py


@pytest.mark.slow
def test_cifar_train_quick_run(tmp_path, capsys):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    out = tmp_path / "run"
    result_path = tmp_path / "result.json"
    stdout = _run(
        "examples.cifar_train", capsys, "--quick", "--noise", "rademacher",
        "--stddev", "0.5", "--ggn-size", "8", "--ggn-probes", "2", "--verbose", "0",
        "--out", str(out), "--json-out", str(result_path),
    )
    assert "Done" in stdout
    result = json.loads(result_path.read_text())
    # --quick: 128 training images held apart from 64 validation images, 100 test.
    assert (result["train_examples"], result["val_examples"], result["test_examples"]) == (128, 64, 100)
    assert result["steps"] == 128 // 32 * 2
    assert result["config"]["optimizer"] == "nesterov" and result["config"]["model"] == "resnet8"
    # §5.1 schedule: 0.1 at batch 200, scaled linearly; warmup 20/200 of the steps.
    assert result["peak_learning_rate"] == pytest.approx(0.1 * 32 / 200)
    assert result["warmup_steps"] == round(0.1 * result["steps"])
    for key in ("train_acc", "val_acc", "test_acc"):
        assert 0.0 <= result[key] <= 1.0
    for key in ("train_loss", "val_loss", "test_loss"):
        assert math.isfinite(result[key])
    # gamma = mean(w^2) with w = 1 +- 0.5: expectation 1.25, 256 draws.
    assert abs(result["gamma_bar"] - 1.25) < 0.25
    assert "ggn_error" not in result and math.isfinite(result["log_ggn_trace"])
    # Logs: CSV (one row an epoch) and TensorBoard; the backup is removed once finished.
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 2
    assert any((out / "tensorboard").rglob("*"))
    assert not any((out / "backup").rglob("*.weights.h5"))


def test_cifar_train_flags_and_schedule():
    args = cifar_train.parse_args(
        ["--batch-size", "8192", "--noise", "gaussian", "--noise-batch-size", "1024", "--epochs", "200"]
    )
    assert mixing.mixing_stddev(args) == pytest.approx(math.sqrt(8192 / 1024 - 1))
    settings = cifar_train.schedule_settings(args, steps_per_epoch=6)
    assert settings["peak_learning_rate"] == pytest.approx(0.1 * 8192 / 200)
    assert settings["total_steps"] == 1200 and settings["warmup_steps"] == 120
    for name, base in (("lars", 0.1), ("adam", 1e-3), ("lamb", 1e-3)):
        a = cifar_train.parse_args(["--optimizer", name, "--batch-size", "400", "--epochs", "10"])
        assert cifar_train.schedule_settings(a, 5)["peak_learning_rate"] == pytest.approx(2 * base)
    assert mixing.mixing_stddev(cifar_train.parse_args(["--stddev", "3"])) == 0.0  # --noise none


def test_cifar_train_tfds_path_with_mock_data():
    """CIFAR-100 goes through TFDS (mocked here: nothing downloads)."""
    import tensorflow_datasets as tfds

    args = cifar_train.parse_args(["--dataset", "cifar100", "--batch-size", "16"])
    with tfds.testing.mock_data(num_examples=40):
        arrays = cifar_train.load_arrays(args)
    (x, y), (x_test, y_test) = arrays
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8 and x_test.shape == (40, 32, 32, 3)
    assert y.dtype == np.int64 and 0 <= y.min() and y.max() < 100
    (x_tr, y_tr), val, test = cifar_train.split_data(args, arrays)
    assert val is None and len(y_tr) == 40 and len(test[1]) == 40
    images, labels = next(iter(cifar_train.make_dataset(args, x_tr, y_tr, 16, training=True)))
    assert images.shape == (16, 32, 32, 3) and images.dtype.name == "float32"
    with pytest.raises(SystemExit):
        cifar_train.parse_args(["--dataset", "cifar100", "--data-dir", "/nonexistent"])


# --------------------------------------------------------------------------
# examples/multi30k.py and examples/multi30k_transformer.py


def test_multi30k_loader_and_tokenizer(multi30k_folder):
    data = multi30k.load_multi30k(val_source="holdout", val_size=500, seed=3)
    assert data["val_source"] == "holdout"
    (tr_en, tr_de), (va_en, va_de) = data["train"], data["val"]
    assert len(va_en) == len(va_de) == 500 and len(tr_en) == len(tr_de)
    full = multi30k.load_multi30k(val_source="holdout", val_size=0)["train"][0]
    # The hold-out and the rest partition the training file.
    assert sorted(tr_en + va_en) == sorted(full)
    assert multi30k.tokenize("Zwei Männer, im Freien.") == ["zwei", "männer", ",", "im", "freien", "."]
    vocab = multi30k.Vocab.build(tr_de[:2000], max_size=500)
    assert len(vocab) <= 500 and vocab.words[:4] == list(multi30k.SPECIALS)
    src, tin, tout = multi30k.encode_pairs(tr_en[:4], tr_de[:4], vocab, vocab, max_len=6)
    assert src.shape == (4, 6) and tin.shape == tout.shape == (4, 7)
    assert np.all(tin[:, 0] == multi30k.BOS)
    # tgt_out is tgt_in shifted by one, ending in </s>.
    np.testing.assert_array_equal(tin[:, 1:][tout[:, :-1] != 0], tout[:, :-1][tout[:, :-1] != 0])
    assert np.all((tout == multi30k.EOS).sum(axis=1) == 1)
    (s, t), o = next(iter(multi30k.make_dataset(src, tin, tout, 2, training=False)))
    assert s.shape[0] == 2 and t.shape == o.shape


def test_multi30k_transformer_optimizers_and_schedule():
    import tf_gradmix as gm
    from examples import multi30k_transformer as mt

    args = mt.parse_args(["--optimizer", "lamb", "--batch-size", "1024", "--noise", "rademacher", "--size", "base"])
    optimizer, peak, warmup = mt.build_optimizer(args)
    assert isinstance(optimizer, gm.GradientMix) and optimizer.noise.name == "rademacher"
    assert isinstance(optimizer.inner_optimizer, gm.optimizers.LAMB)
    assert warmup == round(4000 * 64 / 1024)
    assert peak == pytest.approx(512 ** -0.5 * warmup ** -0.5)
    shape = mt.architecture(args)
    assert (shape["layers"], shape["d_model"], shape["heads"], shape["ff"]) == (6, 512, 8, 2048)
    plain, _, _ = mt.build_optimizer(mt.parse_args(["--stddev", "2"]))
    assert not isinstance(plain, gm.GradientMix)


@pytest.mark.slow
def test_multi30k_transformer_quick_run(tmp_path, multi30k_folder, capsys):
    result_path = tmp_path / "result.json"
    _run(
        "examples.multi30k_transformer", capsys, "--quick", "--noise", "gaussian",
        "--stddev", "1", "--verbose", "0", "--out", str(tmp_path / "run"),
        "--json-out", str(result_path),
    )
    result = json.loads(result_path.read_text())
    expected_source = "file" if (multi30k_folder / "val.en").is_file() else "holdout"
    assert result["val_source"] == expected_source
    assert result["train_pairs"] == 256 and result["steps"] == 256 // 32 * 2
    # Warmup 4000 steps at batch 64, scaled to batch 32.
    assert result["warmup_steps"] == 8000
    assert 0.0 <= result["val_token_acc"] <= 1.0 and 0.0 <= result["test_token_acc"] <= 1.0
    assert 0.0 <= result["val_bleu"] <= 100.0 and 0.0 <= result["test_bleu"] <= 100.0
    assert math.isfinite(result["val_loss"])
    # One weight per sentence: gamma = mean(w^2) over 32 sentences a step.
    assert abs(result["gamma_bar"] - 2.0) < 0.6


def test_multi30k_transformer_mixes_one_weight_per_sentence():
    """The example's model and loss under GradientMix: every token of sentence
    b weighs w_b (gamma alone cannot tell per-sentence from per-token weights).

    One SGD(1.0) step on synthetic padded sentences against the gradient of
    ``sum_b w_b sum_t ce_bt / (valid tokens)``, computed by hand.
    """
    import keras
    import tensorflow as tf

    import tf_gradmix as gm
    from examples import multi30k_transformer as mt

    from oracles import assert_float32_close, flat, weights_of

    args = mt.parse_args(["--quick", "--noise", "gaussian", "--stddev", "1"])
    keras.utils.set_random_seed(0)
    model = mt.build_model(args, 30, 30)
    assert isinstance(model, gm.Model)
    ref = mt.build_model(mt.parse_args(["--quick"]), 30, 30)  # --noise none: a keras.Model
    ref.set_weights(model.get_weights())

    rng = np.random.default_rng(0)
    batch, length = 8, 6
    src = np.zeros((batch, length), "int32")
    tgt_in = np.zeros((batch, length), "int32")
    tgt_out = np.zeros((batch, length), "int32")
    for b, n in enumerate(rng.integers(2, length + 1, batch)):  # ragged sentences
        src[b, :n] = rng.integers(4, 30, n)
        tgt_in[b, :n] = rng.integers(4, 30, n)
        tgt_out[b, :n] = rng.integers(4, 30, n)
    optimizer = gm.GradientMix(keras.optimizers.SGD(1.0), stddev=1.0, seed=4)
    model.compile(optimizer, loss=mt.make_loss())
    before = flat(weights_of(model))
    model.fit((src, tgt_in), tgt_out, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    w = optimizer.example_weights(batch, step=0, replica_id=0).numpy()
    valid = (tgt_out != multi30k.PAD).astype("float32")
    with tf.GradientTape() as tape:
        logits = ref((src, tgt_in), training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tgt_out, logits=logits)
        loss = tf.reduce_sum(ce * valid * w[:, None]) / valid.sum()
    expected = flat(tape.gradient(loss, ref.trainable_variables))
    assert_float32_close(update, expected)


# --------------------------------------------------------------------------
# experiments/sweep.py and experiments/plot.py (no training)


def _sweep_args(tmp_path, *extra):
    return sweep.parse_args(["--results", str(tmp_path / "r.jsonl"), "--dry-run", *extra])


def _record(run, train, val, test):
    """The row the runner writes for ``run`` (a sweep.make_config), with made-up numbers."""
    return {
        "key": sweep.key_of(run), "trainer": run.trainer, "config": runner.result_values(run.config),
        "role": run.labels["role"], "seed": run.config.seed, "train_acc": train, "val_acc": val, "test_acc": test,
        "gamma_bar": 1.0 + run.config.stddev ** 2, "wall_seconds": 60.0,
        "log_ggn_trace": 3.0,
    }


def test_the_sweep_computes_the_noise_equivalent_stddev_as_the_library_does(tmp_path):
    from tf_gradmix import noise

    for small, large in ((64, 512), (128, 1024), (1024, 2048), (96, 1000), (32, 32)):
        args = _sweep_args(tmp_path, "--small-batch", str(small), "--large-batch", str(large))
        assert sweep.noise_equivalent_stddev(args) == noise.stddev_for_noise_batch_size(large, small), (small, large)
    with pytest.raises(ValueError, match="noise_batch_size"):  # the library's error: mixing only adds noise
        sweep.noise_equivalent_stddev(_sweep_args(tmp_path, "--small-batch", "512", "--large-batch", "64"))


def test_sweep_flags_reach_the_example(tmp_path):
    args = _sweep_args(tmp_path)
    run = sweep.make_config(args, 512, "rademacher", 2.5, seed=1, role="select")
    assert run.trainer == "examples.cifar_train" and run.labels == {"role": "select"}
    parsed = cifar_train.parse_args(runner.command_of(run)[2:])
    assert parsed == run.config
    assert (parsed.batch_size, parsed.noise, parsed.stddev, parsed.seed) == (512, "rademacher", 2.5, 1)
    assert (parsed.train_size, parsed.val_size, parsed.model, parsed.augment) == (2048, 1000, "resnet8", False)
    assert parsed.epochs == 40 and parsed.test_size is None
    assert parsed.bn_momentum == 0.9 and parsed.ggn_size == args.ggn_size
    # Logs and backup in a folder of the run's own; logging only, not part of the run's key.
    assert parsed.out == str(args.run_dir / sweep.run_name(args, parsed))
    assert (parsed.tensorboard, parsed.validation_freq, parsed.verbose) == (False, 10, 2)
    assert sweep.key_of(run) == runner.key_of(run.trainer, cifar_train.Config(**{
        **{k: getattr(parsed, k) for k in ("batch_size", "noise", "stddev", "seed", "ggn_size")},
        **{k: getattr(sweep.COMMON, k) for k in ("model", "train_size", "val_size", "augment", "epochs")},
    }))


def test_sweep_multi30k_flags_reach_the_example(tmp_path):
    args = _sweep_args(tmp_path, "--task", "multi30k", "--optimizer", "lamb")
    run = sweep.make_config(args, 1024, "gaussian", 1.5, seed=2, role="select")
    from examples import multi30k_transformer

    parsed = multi30k_transformer.parse_args(runner.command_of(run)[2:])
    assert parsed == run.config and run.trainer == "examples.multi30k_transformer"
    assert (parsed.batch_size, parsed.noise, parsed.stddev, parsed.seed) == (1024, "gaussian", 1.5, 2)
    assert (parsed.optimizer, parsed.epochs, parsed.layers, parsed.d_model) == ("lamb", 8, 2, 128)
    assert parsed.train_size == 10000 and parsed.val_source == "auto"
    # Peak rate scaled as sqrt(B), warmup as 1/B, from 1e-3 and 250 steps at batch 64.
    assert parsed.lr == pytest.approx(1e-3 * 4) and parsed.warmup_steps == 16
    # Flags of the CIFAR example are refused for the Transformer, by name.
    with pytest.raises(SystemExit):
        _sweep_args(tmp_path, "--task", "multi30k", "--widths", "8", "16", "32")
    with pytest.raises(SystemExit):
        _sweep_args(tmp_path, "--task", "multi30k", "--optimizer", "nesterov")


def test_plot_keeps_a_multi30k_sweep_in_one_setup(tmp_path):
    # Its rate and warmup follow the batch size, yet both batches are one setup.
    args = _sweep_args(tmp_path, "--task", "multi30k")
    records = [_record(c, 0.6, 0.55, 0.55) for c in sweep.gap_configs(args, [0])]
    for r, bleu in zip(records, (20.0, 14.0)):
        r.update(val_bleu=bleu, test_bleu=bleu - 1, log_ggn_trace=None)
    assert len(plot.by_setup(records)) == 1
    table = plot.table(records)
    assert "val BLEU | test BLEU |" in table and "log Tr(G)" not in table
    assert "| 20.00 | 19.00 |" in table and "| 14.00 | 13.00 |" in table


def test_sweep_resumes_and_chooses_stddev_on_validation(tmp_path):
    args = _sweep_args(tmp_path)
    assert sweep.candidate_stddevs(args) == [0.5, 1.0, round(math.sqrt(512 / 64 - 1), 6)]
    assert sweep.candidate_stddevs(_sweep_args(tmp_path, "--stddevs", "1", "--no-noise-equivalent")) == [1.0]
    select = sweep.select_configs(args)
    assert len(select) == 6 and {c.config.batch_size for c in select} == {512}
    gap = sweep.gap_configs(args, [0])
    # Validation prefers stddev 1 for Gaussian; the test set would prefer 0.5.
    scores = {0.5: (0.60, 0.70), 1.0: (0.65, 0.60), round(math.sqrt(7), 6): (0.55, 0.50)}
    records = [_record(c, 1.0, 0.6, 0.6) for c in gap]
    for c in select:
        val, test = scores[c.config.stddev]
        records.append(_record(c, 1.0, val, test))
    with open(args.results, "w") as f:
        for r in records[:-1]:  # the last selection run is "interrupted"
            f.write(json.dumps(r) + "\n")
    assert sweep.pending(args, gap + select) == [select[-1]]
    results = sweep.load_results(args.results)
    chosen = sweep.chosen_stddevs(args, results)
    assert chosen["gaussian"] == 1.0
    seeds = sweep.seed_configs(args, results)
    assert {c.config.seed for c in seeds} == {1}
    assert [c.config.stddev for c in seeds if c.config.noise == "gaussian"] == [1.0]
    sweep.main(["--results", str(args.results), "--dry-run", "--phase", "all"])  # prints the plan only
    assert len(sweep.load_results(args.results)) == len(records) - 1
    # The curve phase reuses the stddev chosen at the large batch at other batch sizes.
    curve_args = _sweep_args(tmp_path, "--phase", "curve", "--curve-batches", "64", "1024", "--seeds", "0")
    curve = sweep.curve_configs(curve_args, results)
    assert [(c.config.batch_size, c.config.noise, c.config.stddev) for c in curve] == [
        (64, "none", 0.0), (64, "gaussian", 1.0), (64, "rademacher", chosen["rademacher"]),
        (1024, "none", 0.0), (1024, "gaussian", 1.0), (1024, "rademacher", chosen["rademacher"]),
    ]
    assert sweep.pending(curve_args, curve)[0].config.batch_size == 64 and len(sweep.pending(curve_args, curve)) == 5
    with pytest.raises(SystemExit, match="run --phase select first"):
        sweep.curve_configs(_sweep_args(tmp_path, "--large-batch", "256"), results)


def test_plot_table_and_figures(tmp_path):
    args = _sweep_args(tmp_path)
    records = [_record(c, 1.0, 0.6, 0.55 + 0.01 * c.config.seed) for c in sweep.gap_configs(args, [0, 1])]
    records += [_record(c, 0.9, 0.62, 0.6) for c in sweep.select_configs(args)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # A LAMB run at a non-recipe rate (phase lr) is its own row, in the same table.
    lamb = _sweep_args(tmp_path, "--optimizer", "lamb", "--phase", "lr", "--base-lrs", "0.01")
    records += [_record(c, 0.9, 0.5, 0.5) for c in sweep.lr_configs(lamb)]
    assert sweep.best_base_lr(lamb, {r["key"]: r for r in records}) == 0.01
    # Every configuration gets its own run folder (a folder's backup is resumed by a rerun).
    probes = sweep.lr_configs(_sweep_args(tmp_path, "--optimizer", "lamb", "--base-lrs", "0.01", "0.03"))
    runs = probes + sweep.select_configs(args) + sweep.gap_configs(args, [0, 1])
    names = {sweep.run_name(lamb, c.config) for c in runs}
    assert len(names) == 2 + 6 + 4
    wide = _sweep_args(tmp_path, "--widths", "8", "16", "32")
    assert sweep.run_name(wide, sweep.make_config(wide, 64).config) == "b64_none0_s0_nesterov_n2048_e40_widths8-16-32"
    # A second setup (80 epochs) gets its own table and figures.
    longer = _sweep_args(tmp_path, "--epochs", "80")
    records += [_record(c, 1.0, 0.5, 0.5) for c in sweep.gap_configs(longer, [0])]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot.main([str(path), "--out", str(tmp_path)])
    setups = plot.by_setup(plot.load(path))
    assert [plot.setup_label(s) for s in setups] == ["n2048_e40", "n2048_e80"]
    table = plot.table(next(iter(setups.values())))
    assert "| nesterov | 64 | – | none | 0 |  | 0,1 | 100.0 ± 0.0 |" in table
    assert "| 60.0 | 5.0 (n=1) |" in table  # selection run vs the plain seed-0 run (55%)
    assert "55.5 ± 0.7" in table
    assert "| lamb@0.01 | 512 | – | none | 0 |  | 0 | 90.0 | 50.0 | 50.0 |" in table
    # The 80-epoch runs (seed 0, test 50%) are in their own table, not averaged in here.
    longer_table = plot.table(list(setups.values())[1])
    assert len(longer_table.splitlines()) == 4 and "| 0 | 100.0 | 50.0 | 50.0 |" in longer_table
    for stem in ("r_n2048_e40", "r_n2048_e80"):
        assert (tmp_path / f"{stem}_accuracy_vs_batch.png").stat().st_size > 0
    assert (tmp_path / "r_n2048_e40_large_batch.png").stat().st_size > 0
    assert "**n2048_e80**" in plot.tables(plot.load(path))
