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


#: XLA's collective operations; an asynchronous one appears as ``<name>-start``.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collectives(hlo_text):
    """``[(op, [operand shapes])]``: every collective of a compiled HLO module's text.

    Shapes are tuples of ints (``()`` for a scalar), read from the op's result
    type: a combined all-reduce (XLA merges small ones) lists every operand.
    """
    import re

    pattern = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    found = []
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if match:
            shapes = [tuple(int(d) for d in dims.split(",") if d)
                      for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), shapes))
    return found
