"""DeepSpeed's pipeline unit tests, re-expressed against stagewise (see README in common.py)."""
