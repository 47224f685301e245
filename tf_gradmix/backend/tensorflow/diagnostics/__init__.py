"""The TensorFlow implementation of :mod:`tf_gradmix.diagnostics` (documented there).

* :mod:`.curvature`: the GGN trace (``tf.autodiff.ForwardAccumulator``), GGN-vector
  products, the empirical Fisher trace;
* :mod:`.noise_scale`: the gradient noise scale ``B_simple``;
* :mod:`.sample`: the batches both measure on.
"""
