"""Fidelity experiments: the paper's claims, reproduced with the project's own layer and chain.

Run ``python -m benchmarks.fidelity {quadratic,digits,lm} --json OUT`` (see ``__main__``).
"""
