"""Keras JAX train steps as jaxprs, for tests that check what a step computes."""


def conditionals(jaxpr):
    """How many ``cond`` equations a jaxpr holds, nested ones included."""
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name == "cond"
        for value in equation.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += conditionals(inner)
    return count


def traced_train_step(model, x, y):
    """The jaxpr of ``model``'s Keras JAX train step on ``(x, y)``."""
    import jax

    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    # A new function each call: JAX caches traces by function, and a model's hook installs
    # train_step once per instance, while the step traced may depend on a phase set around the call.
    return jax.make_jaxpr(lambda *args: model.train_step(*args))(state, (x, y)).jaxpr
