"""Importable functions for tests/test_api.py (the workflow export names functions by
module, and workers import them by name)."""

import os


def add(x, y):
    return x + y


def pair(a):
    return {"s": a, "d": 2 * a}


def total(values, extra=0):
    return sum(values) + extra


def split3(n):
    return n, n + 1, n + 2


def fail(x, note="why"):
    raise ValueError(f"failing on purpose with {x}")


def touch(path):
    with open(path, "w") as file:
        file.write("ran")
    return path


def visible_gpus_of_worker():
    return os.environ.get("CUDA_VISIBLE_DEVICES")
