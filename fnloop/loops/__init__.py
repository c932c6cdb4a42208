"""The driver's loops: fit, evaluate, predict, and Lightning's loop rules as pure functions."""
