"""Tests of tf_gradmix.schedules against float64 NumPy references."""

import keras
import numpy as np
import pytest

from tf_gradmix import schedules

# float32 schedule against float64 reference.
RTOL = 2e-6


def eq15(t, peak, total, warmup, init=0.0, end=0.0, p_w=1.0, p_d=2.0):
    """The paper's Eq. 15 in float64, written from its statement."""
    if t < warmup:
        return init + (peak - init) * (t / warmup) ** p_w
    if t <= total:
        if total == warmup:
            return end  # the decay interval is the single point t = T
        return end + (peak - end) * (1 - (t - warmup) / (total - warmup)) ** p_d
    return end


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(peak_learning_rate=3.2, total_steps=50, warmup_steps=10),
        dict(peak_learning_rate=1.0, total_steps=40, warmup_steps=7, initial_learning_rate=0.1,
             end_learning_rate=1e-3, warmup_power=2.0, decay_power=1.5),
        dict(peak_learning_rate=0.5, total_steps=20, warmup_steps=0, end_learning_rate=0.01),
        dict(peak_learning_rate=0.5, total_steps=20, warmup_steps=20, initial_learning_rate=0.05,
             end_learning_rate=0.02),
        dict(peak_learning_rate=2.0, total_steps=1, warmup_steps=0),
    ],
)
def test_polynomial_warmup_decay_matches_eq15(kwargs):
    schedule = schedules.PolynomialWarmupDecay(**kwargs)
    total = kwargs["total_steps"]
    steps = np.arange(total + 6)
    actual = keras.ops.convert_to_numpy(schedule(keras.ops.convert_to_tensor(steps)))
    expected = np.array([
        eq15(t, kwargs["peak_learning_rate"], total, kwargs["warmup_steps"],
             kwargs.get("initial_learning_rate", 0.0), kwargs.get("end_learning_rate", 0.0),
             kwargs.get("warmup_power", 1.0), kwargs.get("decay_power", 2.0))
        for t in steps
    ])
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * kwargs["peak_learning_rate"])
    # Reaches the peak at t = T_w (when T_w < T) and stays at the end rate after T.
    if kwargs["warmup_steps"] < total:
        assert actual[kwargs["warmup_steps"]] == pytest.approx(kwargs["peak_learning_rate"], rel=1e-6)
    assert np.all(actual[total:] == np.float32(kwargs.get("end_learning_rate", 0.0)))


def test_schedule_of_a_scalar_step_and_int64():
    schedule = schedules.PolynomialWarmupDecay(1.0, total_steps=10, warmup_steps=4)
    value = schedule(keras.ops.convert_to_tensor(2, dtype="int64"))
    assert float(value) == pytest.approx(0.5)


def test_inverse_sqrt_warmup_matches_reference():
    schedule = schedules.InverseSqrtWarmup(peak_learning_rate=0.002, warmup_steps=16)
    steps = np.arange(100)
    actual = keras.ops.convert_to_numpy(schedule(keras.ops.convert_to_tensor(steps)))
    t1 = steps.astype(np.float64) + 1
    expected = 0.002 * np.minimum(t1 / 16, np.sqrt(16 / t1))
    np.testing.assert_allclose(actual, expected, rtol=RTOL)
    assert actual.argmax() == 15 and actual[15] == pytest.approx(0.002, rel=1e-6)


def test_scaled_learning_rate():
    assert schedules.scaled_learning_rate(0.1, 256, 32768) == pytest.approx(12.8)
    assert schedules.scaled_learning_rate(1e-3, 200, 100) == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.PolynomialWarmupDecay(2.5, total_steps=100, warmup_steps=5,
                                        initial_learning_rate=0.1, end_learning_rate=1e-4,
                                        warmup_power=1.5, decay_power=3.0),
        schedules.InverseSqrtWarmup(1e-3, warmup_steps=4000),
    ],
)
def test_config_round_trip(schedule):
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule))
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored.get_config() == schedule.get_config()


@pytest.mark.parametrize(
    "make, argument, value",
    [
        (lambda: schedules.PolynomialWarmupDecay(-1.0, 10, 2), "peak_learning_rate", -1.0),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 0, 0), "total_steps", 0),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, 11), "warmup_steps", 11),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, -1), "warmup_steps", -1),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10.5, 1), "total_steps", 10.5),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, 2, end_learning_rate=-0.1),
         "end_learning_rate", -0.1),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, 2, initial_learning_rate=-0.1),
         "initial_learning_rate", -0.1),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, 2, decay_power=0.0), "decay_power", 0.0),
        (lambda: schedules.PolynomialWarmupDecay(1.0, 10, 2, warmup_power=-1.0),
         "warmup_power", -1.0),
        (lambda: schedules.InverseSqrtWarmup(1.0, 0), "warmup_steps", 0),
        (lambda: schedules.InverseSqrtWarmup(float("inf"), 10), "peak_learning_rate", float("inf")),
        (lambda: schedules.scaled_learning_rate(0.1, 0, 10), "base_batch_size", 0),
        (lambda: schedules.scaled_learning_rate(-0.1, 256, 10), "base_learning_rate", -0.1),
        (lambda: schedules.scaled_learning_rate(0.1, 256, -4), "batch_size", -4),
    ],
)
def test_bad_input_names_the_argument(make, argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        make()
    assert repr(value) in str(error.value)
