"""Benchmarks behind ``kvpoll bench``. Figures are ratios against a baseline
measured in the same run, with medians and min-max over repeats."""
