"""A PyTorch training process for tests/library/backend/test_torch.py, configured by a JSON spec in argv[1].

Mode ``"ddp"``: process ``rank`` of ``world_size`` joined with the gloo
backend on 127.0.0.1; a plain ``keras.Model`` wrapped in
``torch.nn.parallel.DistributedDataParallel``; each process feeds its shard
(rows ``rank * b .. (rank + 1) * b``) of each global batch. A custom loop
trains with ``GradientMix(SGD(1.0))`` at the device level (the loss times
``device_weights()[rank]``) and at the sample level (each example's loss
times ``example_weights(b)``, this process's stream). Writes the initial and
final weights and the mixing weights of each step to ``out`` (npz).
"""

import datetime
import json
import os
import sys

SPEC = json.loads(sys.argv[1])
os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tf_gradmix as gm  # noqa: E402


def model_and_data(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, 3, n)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h)), x, y


def flat(model):
    return np.concatenate([keras.ops.convert_to_numpy(v.value).ravel() for v in model.trainable_variables])


def ddp():
    rank, world, batch, steps = SPEC["rank"], SPEC["world_size"], SPEC["batch"], SPEC["steps"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{SPEC['port']}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a lost peer fails, not hangs
    local = batch // world
    out = {}
    for level in ("device", "sample"):
        model, x, y = model_and_data(batch * steps)
        parallel = torch.nn.parallel.DistributedDataParallel(model)
        opt = gm.GradientMix(keras.optimizers.SGD(1.0), level=level, stddev=0.7, seed=5)
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        out[f"{level}/initial"] = flat(model)
        drawn = []
        for step in range(steps):
            rows = slice(step * batch + rank * local, step * batch + (rank + 1) * local)
            per_example = loss_fn(y[rows], parallel(x[rows]))
            if level == "device":
                weights = opt.device_weights()
                loss = keras.ops.mean(per_example) * weights[rank]
            else:
                weights = opt.example_weights(local)
                loss = keras.ops.mean(per_example * weights)
            drawn.append(keras.ops.convert_to_numpy(weights))
            model.zero_grad()
            loss.backward()  # DistributedDataParallel averages the processes' gradients here
            with torch.no_grad():
                opt.apply([v.value.grad for v in model.trainable_variables], model.trainable_variables)
        out[f"{level}/weights"] = np.stack(drawn)
        out[f"{level}/final"] = flat(model)
    out["world_size"] = np.array(opt.num_devices())
    np.savez(SPEC["out"], **out)
    dist.barrier()  # neither process tears the group down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    {"ddp": ddp}[SPEC["mode"]]()
