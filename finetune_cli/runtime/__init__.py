"""The runtime: devices, precision, XLA and tf.distribute topologies."""
